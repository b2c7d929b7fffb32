"""The model: the HE2RNA network and its one-file bundle, converters of published checkpoints, training
(folds, scaling, the linear baseline, fitting), evaluation against the untrained null and the training-data
check.

Until 0.2 ``napari_he2rna.model`` was the bundle module; its names are still found here, with a
DeprecationWarning, until 0.3 (use ``napari_he2rna.model.bundle``).
"""

from .._compat import stage_getattr

__getattr__ = stage_getattr(__name__, "model")
