"""Landmarks: matched points on two slides, and the error of a transform between them.

Landmarks (ANHIR/BIRL CSV with ``X, Y`` columns, BIRL ``.pts``, QuPath point GeoJSON or TSV with ``x, y``)
give the error of a transform: :func:`landmark_errors` reports the median and maximum distance in µm and as a
fraction of the fixed image's diagonal (ANHIR's relative target registration error, rTRE).

Coordinates are level-0 pixels (x before y).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

#: What a landmark file may be, for the messages.
_LANDMARK_FORMATS = (
    "landmarks are a QuPath GeoJSON of Point features, a CSV/TSV with X and Y columns (ANHIR) or a BIRL .pts"
)


def read_landmarks(path: str | Path) -> pd.DataFrame:
    """Read landmark points as a table with columns ``x``, ``y`` (level-0 px) indexed by landmark id.

    Parameters
    ----------
    path
        ANHIR/BIRL CSV (an index column, then ``X``, ``Y``), any CSV/TSV with ``x``/``y`` columns (QuPath's
        point export), BIRL ``.pts`` (``point``, the count, then ``x y`` per line) or a QuPath GeoJSON of
        points. Without an index column the id is the row order (0, 1, ...).

    Returns
    -------
    pandas.DataFrame
        Columns ``x``, ``y`` (float); the index is the id used by :func:`match_landmarks`.

    Raises
    ------
    DataError
        One sentence when the file is missing or is not landmarks (:func:`landmark_table` and
        :func:`geojson_landmarks` check the content).
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"the landmark file {path} is missing or empty.")
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path.name} is not valid GeoJSON ({exc}); {_LANDMARK_FORMATS}.") from None
        except RecursionError:
            raise DataError(
                f"{path.name} is nested too deeply to be landmarks; {_LANDMARK_FORMATS}."
            ) from None
        return landmark_table(geojson_landmarks(data, path.name), path.name)
    if suffix == ".pts":
        lines = [ln.split() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        nums = []
        for parts in lines:
            try:
                vals = [float(v) for v in parts]
            except ValueError:
                continue
            if len(vals) >= 2:
                nums.append(vals[:2])
        return landmark_table(nums, path.name)
    sep = "\t" if suffix in (".tsv", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(
            f"{path.name} is not a readable landmark table ({exc}); {_LANDMARK_FORMATS}."
        ) from None
    cols = {str(c).strip().lower(): c for c in table.columns}
    if "x" not in cols or "y" not in cols:
        raise DataError(
            f"{path.name} has no X and Y columns (its columns are: {', '.join(map(str, table.columns))}); "
            f"{_LANDMARK_FORMATS}."
        )
    first = table.columns[0]
    ids = None
    if str(first).startswith("Unnamed") or str(first).strip() == "":
        ids = table[first].tolist()
    return landmark_table(list(zip(table[cols["x"]], table[cols["y"]], strict=True)), path.name, ids)


def landmark_table(points: Any, source: str, ids: Any = None) -> pd.DataFrame:
    """The one check of a landmark file's points, whatever its format: a table ``x``, ``y`` by id.

    Parameters
    ----------
    points
        A sequence of (x, y) pairs as read (numbers, or strings of numbers from a table).
    source
        The file's name, for the messages.
    ids
        The landmark ids (an ANHIR CSV's index column), one per point, or None: ids are then the order.

    Returns
    -------
    pandas.DataFrame
        Columns ``x``, ``y`` (float); ``attrs["has_ids"]`` says whether the ids came from the file.

    Raises
    ------
    DataError
        No points, a point whose x or y is not a finite number (named by its row: a dropped row would shift
        every pair matched by order), or an id given twice.
    """
    xy = []
    for i, point in enumerate(points):
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            x = y = math.nan
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DataError(
                f"landmark {i + 1} of {source} has no finite x and y ({_shown(point)}); every landmark needs "
                "both, in level-0 pixels."
            )
        xy.append((x, y))
    if not xy:
        raise DataError(f"{source} holds no landmark; {_LANDMARK_FORMATS}.")
    out = pd.DataFrame(xy, columns=["x", "y"], dtype=float)
    if ids is not None:
        index = pd.Index(list(ids), name="id")
        if index.has_duplicates:
            twice = index[index.duplicated()][0]
            raise DataError(f"{source} gives the landmark id {twice} twice; each landmark needs its own id.")
        out.index = index
    out.attrs["has_ids"] = ids is not None
    return out


def geojson_landmarks(data: Any, source: str) -> list[tuple[float, float]]:
    """The points of a parsed QuPath GeoJSON (a FeatureCollection, a Feature, a list of Features, or a bare
    Point/MultiPoint geometry), in file order; anything else (a polygon, a point without coordinates, a
    number) is a :class:`DataError` naming the feature."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Point", "MultiPoint"):
        features = [{"type": "Feature", "geometry": data}]
    else:
        features = data
    if not isinstance(features, list):
        raise DataError(f"{source} is not point GeoJSON (it holds {_shown(data)}); {_LANDMARK_FORMATS}.")
    rows: list[tuple[float, float]] = []
    for i, feat in enumerate(features, start=1):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        kind = geom.get("type") if isinstance(geom, dict) else None
        coords = geom.get("coordinates") if isinstance(geom, dict) else None
        if kind == "Point" and _is_position(coords):
            rows.append((float(coords[0]), float(coords[1])))
        elif kind == "MultiPoint" and isinstance(coords, list) and coords and all(map(_is_position, coords)):
            rows.extend((float(p[0]), float(p[1])) for p in coords)
        else:
            if not isinstance(feat, dict):
                found = f"{_shown(feat)}, not a GeoJSON Feature"
            elif kind in ("Point", "MultiPoint"):
                found = f"a {kind} without numeric coordinates [x, y]"
            elif kind is not None:
                found = f"a {kind}, not a point"
            else:
                found = "a feature without a geometry"
            raise DataError(f"feature {i} of {source} is {found}; {_LANDMARK_FORMATS}.")
    if not rows:
        raise DataError(f"{source} contains no points; {_LANDMARK_FORMATS}.")
    return rows


def _is_position(value: Any) -> bool:
    """A GeoJSON position: [x, y] or [x, y, z] of finite numbers."""
    return (
        isinstance(value, list)
        and len(value) in (2, 3)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _shown(value: Any) -> str:
    """A JSON value or table row, short, for a message."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def match_landmarks(fixed: pd.DataFrame, moving: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The landmarks both files have: ((K, 2) fixed x/y, (K, 2) moving x/y).

    Matched by id when both files have an id column (ANHIR CSV), else by order. ANHIR lists may differ in
    length (the rat-kidney H&E has 71, its IHC 69): only the shared ids (or the first K of each) are kept.
    """
    if not (fixed.attrs.get("has_ids") and moving.attrs.get("has_ids")):
        k = min(len(fixed), len(moving))
        return fixed[["x", "y"]].to_numpy(float)[:k], moving[["x", "y"]].to_numpy(float)[:k]
    common = fixed.index.intersection(moving.index, sort=False)
    if len(common) < 1:
        raise DataError(
            "the two landmark files share no landmark id; give both the same ids, or neither ids."
        )
    return (
        fixed.loc[common, ["x", "y"]].to_numpy(float),
        moving.loc[common, ["x", "y"]].to_numpy(float),
    )


def landmark_errors(
    affine_px: Any,
    fixed_xy: Any,
    moving_xy: Any,
    *,
    fixed_dimensions: tuple[int, int],
    mpp_fixed: float | None = None,
) -> dict[str, Any]:
    """Distances between the fixed landmarks and the moving ones mapped by ``affine_px``.

    Parameters
    ----------
    affine_px
        (3, 3) moving level-0 px -> fixed level-0 px (identity: the error left unaligned).
    fixed_xy, moving_xy
        (K, 2) matched landmarks in level-0 px of each slide.
    fixed_dimensions
        (width, height) of the fixed slide in level-0 px: rTRE is the distance over its diagonal.
    mpp_fixed
        µm per fixed level-0 px; without it the µm figures are None.

    Returns
    -------
    dict
        ``n``, ``median_px``, ``max_px``, ``median_um``, ``max_um``, ``median_rtre``, ``max_rtre``.
    """
    a = np.asarray(affine_px, dtype=float)
    f = np.asarray(fixed_xy, dtype=float).reshape(-1, 2)
    m = np.asarray(moving_xy, dtype=float).reshape(-1, 2)
    mapped = m @ a[:2, :2].T + a[:2, 2]
    d = np.hypot(*(mapped - f).T)
    diag = math.hypot(*fixed_dimensions)
    um = None if not mpp_fixed else float(mpp_fixed)
    return {
        "n": int(len(d)),
        "median_px": float(np.median(d)),
        "max_px": float(d.max()),
        "median_um": None if um is None else float(np.median(d) * um),
        "max_um": None if um is None else float(d.max() * um),
        "median_rtre": float(np.median(d) / diag),
        "max_rtre": float(d.max() / diag),
    }
