"""Features: the backbone registry and hub loading, tile extraction, the zarr cache, precision and devices,
and the per-slide tasks of a cohort extraction (here or on dask.distributed).

Until 0.2 ``napari_he2rna.features`` was the extraction module; its names are still found here, with a
DeprecationWarning, until 0.3 (use ``napari_he2rna.features.extraction``).
"""

from .._compat import stage_getattr

__getattr__ = stage_getattr(__name__, "features")
