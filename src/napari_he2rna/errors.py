"""Errors a user can act on.

Every exception here carries one clear sentence meant for a person: the napari widgets show it as a
notification and the CLI prints it on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class He2rnaError(Exception):
    """Base class of all user-facing errors of napari-he2rna."""


class SlideError(He2rnaError):
    """A slide cannot be opened or read (missing, truncated, unsupported, not a slide)."""


class MissingMPPError(SlideError):
    """The slide does not say its pixel size; the user must give it (µm/px)."""


class TissueError(He2rnaError):
    """No tissue was found where tissue was expected."""


class TileSizeError(He2rnaError):
    """A tile size is not plausible (not a size, under a few pixels, or larger than the slide)."""


class CacheError(He2rnaError):
    """A feature cache is unreadable, stale or belongs to another slide/backbone."""


class WeightsError(He2rnaError):
    """Backbone weights are missing, unsafe or do not fit the network."""


class MissingExtraError(He2rnaError):
    """An optional dependency is not installed; the message names the ``pip install`` that brings it."""


class ModelError(He2rnaError):
    """A model bundle is malformed, tampered with or does not fit the features."""


class GeneError(He2rnaError):
    """A gene or gene set is not known to the model."""


class DataError(He2rnaError):
    """A cohort table, annotation or ground-truth file is malformed or does not match the slide."""


class Cancelled(He2rnaError):
    """A long job was cancelled by the user; nothing half-written was left behind."""


class AlignmentError(He2rnaError):
    """An automatic alignment failed (the fit found leaves the slides unlike each other).

    ``result`` is the rejected :class:`~napari_he2rna.validation.align.AlignmentResult` (for diagnosis), or
    None.
    """

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


class He2rnaWarning(UserWarning):
    """Base class of the warnings meant for a person (the CLI prints each as one ``he2rna: warning:``)."""


class CacheWarning(He2rnaWarning):
    """A feature cache was unsound (corrupt, stale, unfinished) and is being recomputed."""


@contextlib.contextmanager
def unreadable_as(cls: type[He2rnaError], what: str) -> Iterator[None]:
    """Inside the block, an error of any other kind (not ``cls``, not Ctrl-C) becomes one sentence for the
    user, ``cls(f"{what} ({type}: {message}).")``: a file a parser cannot read, say. ``cls`` passes as is.
    """
    try:
        yield
    except cls:
        raise
    except Exception as exc:  # noqa: BLE001 - parser / zip / JSON errors of every kind: one sentence
        raise cls(f"{what} ({type(exc).__name__}: {exc}).") from None
