"""The transform JSON of ``he2rna align`` (read by ``he2rna compare --transform``): its one schema.

:func:`read_transform_json` reads the file and :func:`validate_transform` checks every field it uses, so that
a hand-edited or damaged file is refused in one sentence naming the file, the field and what would work, never
half-used: types, shapes, finite values, pixel sizes a microscope produces
(:data:`~napari_he2rna.slides.backends.PLAUSIBLE_MPP`), an affine whose last row is ``0 0 1`` (a projective
row is refused, not dropped) and a ``flipped`` flag that agrees with the sign of the matrix. Nothing here
imports Qt.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..slides.backends import PLAUSIBLE_MPP

__all__ = ["read_transform_json", "validate_transform", "MAX_TRANSFORM_BYTES", "TRANSFORM_FORMAT"]

#: Format version of the transform JSON (``"version"``); a file of a later version is refused.
TRANSFORM_FORMAT = 1

#: A transform JSON is a few kB; a larger file is not one (and is not read into memory).
MAX_TRANSFORM_BYTES = 1_000_000
#: How far the last row of a 3x3 affine may be from ``0 0 1`` (rounding of a written file).
LAST_ROW_TOLERANCE = 1e-9
#: The optional numbers a transform records, with the range each must lie in.
_NUMBERS = {
    "similarity": (-1.0, 1.0),
    "tissue_dice": (0.0, 1.0),
    "mutual_information": (-math.inf, math.inf),
    "working_um_per_px": (0.0, math.inf),
    "seconds": (0.0, math.inf),
}
_STRINGS = ("method", "fixed", "moving", "direction", "format")
_WHAT_WORKS = "write it again with `he2rna align FIXED MOVING --out FILE`, or fix that field"
_WRITE_AGAIN = "give the JSON that `he2rna align FIXED MOVING --out FILE` writes"


def read_transform_json(path: str | Path) -> dict[str, Any]:
    """Read a transform JSON file and return :func:`validate_transform`'s fields, or :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"the transform file {path} does not exist (or is a folder); give the JSON of he2rna align."
        )
    if path.stat().st_size > MAX_TRANSFORM_BYTES:
        raise DataError(
            f"{path.name} is {path.stat().st_size:,} bytes, not a transform JSON (a few kB); give the JSON "
            "that he2rna align wrote."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not a readable transform JSON ({exc}); {_WRITE_AGAIN}.") from None
    except RecursionError:
        raise DataError(f"{path.name} is nested too deeply to be a transform JSON; {_WRITE_AGAIN}.") from None
    return validate_transform(data, path.name)


def validate_transform(data: Any, source: str = "the transform") -> dict[str, Any]:
    """Check a transform's fields (as parsed from JSON) and return them typed.

    Parameters
    ----------
    data
        The parsed JSON: an object with ``affine_px`` (3x3, or 2x3 without the last row) and optionally
        ``mpp_fixed``, ``mpp_moving``, ``fixed_dimensions``, ``moving_dimensions``, ``similarity``,
        ``tissue_dice``, ``mutual_information``, ``working_um_per_px``, ``seconds``, ``method``, ``fixed``,
        ``moving``, ``landmarks``, ``flipped`` and ``affine_um`` (checked against the rest when present).
    source
        The file's name, for the messages.

    Returns
    -------
    dict
        ``affine_px`` (3x3 float64), ``mpp_fixed``/``mpp_moving`` (float or None), the dimensions as int
        pairs ((0, 0) when absent), the numbers as floats (NaN when absent), the strings, ``landmarks`` (a
        dict) and ``flipped`` (bool; absent means the sign of the matrix, so a file written before the flag
        existed reads as not flipped).

    Raises
    ------
    DataError
        One sentence naming ``source``, the field and what would work.
    """
    if not isinstance(data, dict):
        raise DataError(
            f"{source} is not a transform: it holds {_kind(data)} where he2rna align writes an object with "
            f"'affine_px' (the 3x3 moving-to-fixed pixel matrix); {_WRITE_AGAIN}."
        )
    if "affine_px" not in data:
        raise DataError(f"{source} has no 'affine_px' (the 3x3 moving-to-fixed px matrix); {_WRITE_AGAIN}.")
    version = data.get("version", TRANSFORM_FORMAT)
    if not _is_number(version) or not float(version).is_integer() or not 1 <= version <= TRANSFORM_FORMAT:
        raise DataError(
            f"{source}: 'version' is {_kind(version)}, but this napari-he2rna reads transform version "
            f"{TRANSFORM_FORMAT}; write the file again with this version's he2rna align."
        )
    out: dict[str, Any] = {"affine_px": _affine(data["affine_px"], source, "affine_px")}
    for key in ("mpp_fixed", "mpp_moving"):
        out[key] = _mpp(data.get(key), source, key)
    for key in ("fixed_dimensions", "moving_dimensions"):
        out[key] = _dimensions(data.get(key), source, key)
    for key, (lo, hi) in _NUMBERS.items():
        out[key] = _number(data.get(key), source, key, lo, hi)
    for key in _STRINGS:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source}: '{key}' must be a string, not {_kind(value)}; {_WHAT_WORKS}.")
        out[key] = value or ""
    out["landmarks"] = _landmarks(data.get("landmarks"), source)
    mirrored = bool(np.linalg.det(out["affine_px"][:2, :2]) < 0)
    flipped = data.get("flipped")
    if flipped is not None and not isinstance(flipped, bool):
        raise DataError(f"{source}: 'flipped' must be true or false, not {_kind(flipped)}; {_WHAT_WORKS}.")
    if flipped is not None and flipped != mirrored:
        raise DataError(
            f"{source}: 'flipped' is {str(flipped).lower()} but 'affine_px' "
            f"{'mirrors' if mirrored else 'does not mirror'} the image (its determinant is "
            f"{'negative' if mirrored else 'positive'}); {_WHAT_WORKS}."
        )
    out["flipped"] = mirrored
    if data.get("affine_um") is not None:
        _check_affine_um(data["affine_um"], out, source)
    return out


# ------------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A short description of a JSON value for a message: ``the string 'abc'``, ``a list of 2``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 30 else value[:27] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _as_list(value: Any) -> Any:
    """Lists as JSON gives them; a tuple or array (a transform built in Python) as a list."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return [_as_list(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _affine(value: Any, source: str, key: str) -> np.ndarray:
    """A 3x3 float64 from a JSON 3x3 (last row ``0 0 1``) or 2x3 of finite numbers, invertible."""
    value = _as_list(value)
    what = (
        f"'{key}' must be a 3x3 matrix of numbers (rows [a, b, tx], [c, d, ty], [0, 0, 1]) or its first two "
        "rows"
    )
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise DataError(f"{source}: {what}, not {_kind(value)}; {_WHAT_WORKS}.")
    for i, row in enumerate(value):
        row = _as_list(row)
        if not isinstance(row, list) or len(row) != 3 or not all(_is_number(v) for v in row):
            raise DataError(f"{source}: {what}; its row {i + 1} is {_kind(row)}; {_WHAT_WORKS}.")
    a = np.array([_as_list(row) for row in value], dtype=float)
    if not np.all(np.isfinite(a)):
        raise DataError(
            f"{source}: '{key}' holds a value that is not finite (NaN or infinity); {_WHAT_WORKS}."
        )
    if a.shape == (2, 3):
        a = np.vstack([a, [0.0, 0.0, 1.0]])
    elif np.abs(a[2] - [0.0, 0.0, 1.0]).max() > LAST_ROW_TOLERANCE:
        raise DataError(
            f"{source}: the last row of '{key}' is {a[2].tolist()}, not [0, 0, 1]: a projective "
            f"(perspective) map is not an affine and cannot be applied; {_WHAT_WORKS}."
        )
    if abs(np.linalg.det(a[:2, :2])) < 1e-12:
        raise DataError(f"{source}: '{key}' is singular (it squashes the slide onto a line); {_WHAT_WORKS}.")
    return a


def _mpp(value: Any, source: str, key: str) -> float | None:
    if value is None:
        return None
    lo, hi = PLAUSIBLE_MPP
    if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise DataError(
            f"{source}: '{key}' must be a pixel size between {lo:g} and {hi:g} µm/px (0.25 at 40x, 0.5 at "
            f"20x) or null when unknown, not {_kind(value)}; {_WHAT_WORKS}."
        )
    return float(value)


def _dimensions(value: Any, source: str, key: str) -> tuple[int, int]:
    if value is None:
        return (0, 0)
    value = _as_list(value)
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_number(v) and math.isfinite(v) and v >= 0 and float(v).is_integer() for v in value)
    )
    if not ok:
        raise DataError(
            f"{source}: '{key}' must be the slide's [width, height] in pixels (two whole numbers), not "
            f"{_kind(value)}; {_WHAT_WORKS}."
        )
    return (int(value[0]), int(value[1]))


def _number(value: Any, source: str, key: str, lo: float, hi: float) -> float:
    if value is None:
        return math.nan
    if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        span = (
            f"a number between {lo:g} and {hi:g}"
            if math.isfinite(lo + hi)
            else (f"a number of at least {lo:g}" if math.isfinite(lo) else "a finite number")
        )
        raise DataError(f"{source}: '{key}' must be {span} or null, not {_kind(value)}; {_WHAT_WORKS}.")
    return float(value)


def _landmarks(value: Any, source: str) -> dict[str, Any]:
    """``{"aligned": {"n": 69, "median_px": ...}, "unaligned": {...}}``: objects of numbers (or null)."""
    if value is None:
        return {}
    ok = isinstance(value, dict) and all(
        isinstance(part, dict)
        and all(v is None or (_is_number(v) and math.isfinite(v)) for v in part.values())
        for part in value.values()
    )
    if not ok:
        raise DataError(
            f'{source}: \'landmarks\' must be an object like {{"aligned": {{"n": 12, "median_px": 3.1}}}} '
            f"(landmark errors by name, numbers or null), not {_kind(value)}; remove it or {_WHAT_WORKS}."
        )
    return {str(k): dict(v) for k, v in value.items()}


def _check_affine_um(value: Any, fields: dict[str, Any], source: str) -> None:
    """``affine_um``, when given, must be a valid affine and agree with ``affine_px`` and the pixel sizes."""
    a_um = _affine(value, source, "affine_um")
    mf = fields["mpp_fixed"] or fields["mpp_moving"] or 1.0
    mm = fields["mpp_moving"] or fields["mpp_fixed"] or 1.0
    expected = np.diag([mf, mf, 1.0]) @ fields["affine_px"] @ np.diag([1 / mm, 1 / mm, 1.0])
    if not np.allclose(a_um, expected, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(expected).max()))):
        raise DataError(
            f"{source}: 'affine_um' disagrees with 'affine_px' and the pixel sizes (was one edited by "
            "hand?); 'affine_px' is the one used: remove 'affine_um' or write the file again with he2rna "
            "align."
        )
