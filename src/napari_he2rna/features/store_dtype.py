"""The dtype a feature store keeps its tile features in: float32, or float16 for half the disk and read time.

A store records its dtype twice: as its ``features`` array's dtype and as its ``dtype`` attribute (stores
written before there was a choice have no attribute and are float32). Readers always return float32, so
training, ``spatialize``, ``predict`` and the viewer do not know which one they read.

Asking for no dtype (``None``, the default) makes new stores float32 and uses an existing store in whichever
dtype it has; asking for one re-extracts a store kept in the other (float16 cannot give back what float32
held, and one store per slide keeps training, which asks for none, from ever finding two).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import numpy as np

from ..errors import CacheError, DataError

__all__ = [
    "STORE_DTYPES",
    "FLOAT16_MAX",
    "check_dtype",
    "new_store_dtype",
    "stored_dtype",
    "dtype_mismatch",
    "to_store",
]

STORE_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger magnitudes become inf in float16


def check_dtype(dtype) -> str | None:
    """``dtype`` as ``"float32"`` / ``"float16"`` (None stays None); DataError for any other."""
    if dtype is None:
        return None
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in STORE_DTYPES:
        raise DataError(f"Features are stored as float32 or float16, not {dtype!r}.")
    return name


def new_store_dtype(dtype: str | None) -> str:
    """The dtype a new store is written in when ``dtype`` is asked (None: float32)."""
    return check_dtype(dtype) or "float32"


def stored_dtype(attrs: dict, array_dtype, where: str) -> str:
    """The dtype of a store's features, from its attribute (absent: float32) and its array, which must agree;
    CacheError naming ``where`` when they do not, or when the array is neither float32 nor float16."""
    said = str(attrs.get("dtype", "float32"))
    held = np.dtype(array_dtype).name
    if held not in STORE_DTYPES or held != said:
        raise CacheError(f"the feature cache {where} holds {held} features but says {said}.")
    return held


def dtype_mismatch(stored: str, asked: str | None) -> str | None:
    """Why a store kept in ``stored`` does not serve a request for ``asked`` (None serves any), else None."""
    if asked is None or check_dtype(asked) == stored:
        return None
    return f"its features are {stored}, {asked} were asked"


def to_store(features: np.ndarray, dtype: str, backbone: str, slide: str) -> np.ndarray:
    """``features`` cast to the store's ``dtype``; CacheError, before anything is written, when float16 would
    turn some of them into inf (magnitudes beyond 65504), naming the backbone and the slide."""
    if dtype == "float16":
        # NaN is left to the store's own check of missing values, as in a float32 store
        peak = float(np.max(np.abs(features), initial=0.0, where=~np.isnan(features)))
        if peak > FLOAT16_MAX:
            raise CacheError(
                f"The backbone {backbone} gives features up to {peak:.4g} on {slide}, beyond float16's range "
                f"(±{FLOAT16_MAX:g}): extract this slide's features as float32 (--dtype float32)."
            )
        return features.astype(np.float16)
    return np.asarray(features, dtype=np.float32)
