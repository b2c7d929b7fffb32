"""Ground truth per tile: QuPath cell detections, segmentation masks and annotation polygons.

Everything is aligned to the H&E slide in **level-0 pixels** (x before y), through the slide's µm/px: QuPath
measurement tables give centroids in µm (or px when QuPath had no pixel size), QuPath GeoJSON gives level-0
pixels of the image it was drawn on, and masks are scaled to the slide by size or by their own µm/px. When the
truth was drawn on another scan of the same tissue (an IHC section), an :class:`Alignment` (offset, scale or a
full affine, in µm) maps it onto the slide before it is binned into tiles.

Nothing here guesses silently: a file from another image, pixels mistaken for microns, a mask of another
shape, an empty class or an empty file raise :class:`~napari_he2rna.errors.DataError` with one sentence
saying what was found and what to do.

The tile grid is duck-typed (see ``tiling.TileGrid``): ``grid.table`` with ``row`` and ``col``,
``grid.tile_px``, ``grid.mpp``, ``grid.n_rows``, ``grid.n_cols`` and ``grid.slide_dimensions`` (width,
height) in level-0 px. Tile (row, col) covers level-0 x in ``[col * tile_px, (col + 1) * tile_px)``, y
likewise.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

try:  # shapely repairs invalid polygons (make_valid) and computes exact centroids; optional but preferred
    import shapely
    import shapely.geometry
except ImportError:  # pragma: no cover - exercised only where shapely is missing
    shapely = None

UNCLASSIFIED = "Unclassified"
#: QuPath object types that are single cells; point annotations (the counting tool) count as cells too.
DETECTION_TYPES = ("detection", "cell", "tile")
#: Share of centroids that may fall outside the slide before the file is taken to be from another image.
MAX_OUTSIDE_FRACTION = 0.5
#: Share of centroids that must fit under the other unit before we say "pixels mistaken for microns".
UNIT_FIT_FRACTION = 0.95


# ------------------------------------------------------------------------------------------------------------
# Alignment of a second scan (IHC) onto the H&E slide


@dataclass(frozen=True)
class Alignment:
    """An affine map from truth to slide coordinates, in µm: ``slide = matrix @ truth + offset_um``.

    Use :meth:`from_offset_scale` for the common case (the IHC scan is shifted and maybe scaled),
    :meth:`from_affine` for a full 2x3/3x3 matrix and :meth:`from_landmarks` to fit one to matched points.
    """

    matrix: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))
    offset_um: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_offset_scale(
        cls,
        offset_um: Sequence[float] = (0.0, 0.0),
        scale: float | Sequence[float] = 1.0,
        rotation_deg: float = 0.0,
        shape: Any = None,
    ) -> Alignment:
        """Scale (one factor or (sx, sy)), rotate (anticlockwise on screen), then shift by ``offset_um``.

        ``shape`` is an optional 2x2 applied first (the stretch and shear an affine has beyond rotation and
        scale, see :meth:`to_offset_scale`).
        """
        sx, sy = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
        if sx <= 0 or sy <= 0:
            raise DataError(f"the alignment scale must be positive, got {scale}")
        m = _rotation(rotation_deg) @ np.diag([sx, sy])
        if shape is not None:
            k = np.asarray(shape, dtype=float)
            if k.shape != (2, 2) or not np.all(np.isfinite(k)) or abs(np.linalg.det(k)) < 1e-12:
                raise DataError(f"the alignment shape must be an invertible 2x2 matrix, got {k.tolist()}")
            m = m @ k
        return cls(_as_pair_of_pairs(m), (float(offset_um[0]), float(offset_um[1])))

    @classmethod
    def from_affine_px(cls, affine_px: Any, mpp: float) -> Alignment:
        """From a 3x3 (or 2x3) matrix mapping truth-scan level-0 px ``(x, y, 1)`` to slide level-0 px.

        Parameters
        ----------
        affine_px
            E.g. ``affine_px`` of ``he2rna align`` (:class:`~napari_he2rna.align.AlignmentResult`).
        mpp
            The slide's µm per level-0 px: truth px and slide px are both taken to µm with it, as
            :meth:`apply_px` does.
        """
        a = np.asarray(affine_px, dtype=float)
        if a.shape == (2, 3):
            a = np.vstack([a, [0.0, 0.0, 1.0]])
        if a.shape != (3, 3):
            raise DataError(f"a pixel affine must be 2x3 or 3x3, got shape {a.shape}")
        s = np.diag([float(mpp), float(mpp), 1.0])
        return cls.from_affine(s @ a @ np.linalg.inv(s))

    def affine_px(self, mpp: float) -> np.ndarray:
        """The 3x3 acting on truth-scan level-0 px ``(x, y, 1)``, giving slide level-0 px (µm/px ``mpp``)."""
        s = np.diag([float(mpp), float(mpp), 1.0])
        return np.linalg.inv(s) @ self.affine @ s

    def to_offset_scale(self) -> tuple[tuple[float, float], float, float, np.ndarray]:
        """Split into :meth:`from_offset_scale`'s ``(offset_um, scale, rotation_deg, shape)``.

        ``scale`` is the square root of the determinant, ``rotation_deg`` the rotation of the polar
        decomposition (anticlockwise on screen) and ``shape`` what is left (2x2 of determinant ±1: stretch and
        shear), the identity for a pure rotation and scale: ``from_offset_scale(*a.to_offset_scale())``
        gives ``a`` back.
        """
        m = np.asarray(self.matrix, dtype=float)
        det = float(np.linalg.det(m))
        scale = math.sqrt(abs(det))
        u, _, vt = np.linalg.svd(m)
        r = u @ vt
        if np.linalg.det(r) < 0:  # a mirrored map: keep a proper rotation, the mirror goes into the shape
            r = u @ np.diag([1.0, -1.0]) @ vt
        rotation_deg = -math.degrees(math.atan2(r[1, 0], r[0, 0]))
        shape = _rotation(rotation_deg).T @ m / scale
        return (float(self.offset_um[0]), float(self.offset_um[1])), scale, rotation_deg, shape

    @classmethod
    def from_affine(cls, affine: Any) -> Alignment:
        """From a 2x3 or 3x3 affine matrix acting on (x, y, 1) in µm."""
        a = np.asarray(affine, dtype=float)
        if a.shape not in ((2, 3), (3, 3)) or not np.all(np.isfinite(a)):
            raise DataError(f"an alignment affine must be a finite 2x3 or 3x3 matrix, got shape {a.shape}")
        if abs(np.linalg.det(a[:2, :2])) < 1e-12:
            raise DataError("the alignment affine is singular (it squashes the truth onto a line)")
        return cls(_as_pair_of_pairs(a[:2, :2]), (float(a[0, 2]), float(a[1, 2])))

    @classmethod
    def from_landmarks(cls, truth_xy_um: Any, slide_xy_um: Any) -> Alignment:
        """Least-squares affine fit to matched landmarks, (K, 2) x/y in µm each, K >= 3."""
        src = np.asarray(truth_xy_um, dtype=float)
        dst = np.asarray(slide_xy_um, dtype=float)
        if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 3:
            raise DataError("landmarks must be two matching (K, 2) lists of x, y with at least 3 points")
        design = np.column_stack([src, np.ones(len(src))])
        coef, *_ = np.linalg.lstsq(design, dst, rcond=None)  # (3, 2)
        return cls.from_affine(coef.T)

    @property
    def affine(self) -> np.ndarray:
        """The 3x3 matrix acting on (x, y, 1) in µm."""
        a = np.eye(3)
        a[:2, :2] = self.matrix
        a[:2, 2] = self.offset_um
        return a

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.affine, np.eye(3)))

    @property
    def is_axis_aligned(self) -> bool:
        """True when the map only scales and shifts along x and y (no rotation or shear)."""
        m = np.asarray(self.matrix)
        return bool(abs(m[0, 1]) < 1e-12 and abs(m[1, 0]) < 1e-12)

    def inverse(self) -> Alignment:
        return Alignment.from_affine(np.linalg.inv(self.affine))

    def apply_um(self, xy_um: np.ndarray) -> np.ndarray:
        """Map (M, 2) truth x/y in µm to slide x/y in µm."""
        xy = np.asarray(xy_um, dtype=float).reshape(-1, 2)
        return xy @ np.asarray(self.matrix).T + np.asarray(self.offset_um)

    def apply_px(self, xy_px: np.ndarray, mpp: float) -> np.ndarray:
        """Map (M, 2) truth x/y in level-0 px to slide level-0 px (both at ``mpp`` µm/px)."""
        if self.is_identity:
            return np.asarray(xy_px, dtype=float).reshape(-1, 2)
        return self.apply_um(np.asarray(xy_px, dtype=float).reshape(-1, 2) * mpp) / mpp


def _rotation(rotation_deg: float) -> np.ndarray:
    """2x2 rotation that looks anticlockwise on screen by ``rotation_deg`` (y points down in images)."""
    t = np.deg2rad(-rotation_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _as_pair_of_pairs(m: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    return ((float(m[0, 0]), float(m[0, 1])), (float(m[1, 0]), float(m[1, 1])))


def _align_cells(cells: pd.DataFrame, alignment: Alignment | None, mpp: float) -> pd.DataFrame:
    if alignment is None or alignment.is_identity:
        return cells
    out = cells.copy()
    xy = alignment.apply_px(cells[["x_px", "y_px"]].to_numpy(float), mpp)
    out["x_px"], out["y_px"] = xy[:, 0], xy[:, 1]
    out.attrs = dict(cells.attrs, aligned=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# Reading files


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"the {what} file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"the {what} file {path} is empty (0 bytes); export it again from QuPath")


def _class_name(classification: Any) -> str:
    """QuPath's ``classification``: ``{name}``, ``{names: [...]}`` (derived classes) or a plain string."""
    if not classification:
        return UNCLASSIFIED
    if isinstance(classification, str):
        return classification or UNCLASSIFIED
    if isinstance(classification, dict):
        if classification.get("name"):
            return str(classification["name"])
        names = classification.get("names")
        if names:
            return ": ".join(str(n) for n in names)
    return UNCLASSIFIED


def class_mask(labels: Any, classes: str | Iterable[str] | None) -> np.ndarray:
    """Boolean mask of the labels whose class matches ``classes`` (``None``: all), possibly all False.

    Exact name first, then a ``:``-part (``"Positive"`` matches ``"Tumor: Positive"``, as QuPath derives
    sub-classes), then case-insensitive (people type ``"positive"``).
    """
    values = pd.Series(labels).astype(str).to_numpy()
    if classes is None:
        return np.ones(len(values), dtype=bool)
    wanted = [classes] if isinstance(classes, str) else list(classes)
    keep = np.zeros(len(values), dtype=bool)
    for name in wanted:
        hit = values == name
        if not hit.any():
            parts = [tuple(p.strip() for p in v.split(":")) for v in values]
            hit = np.array([name in p for p in parts], dtype=bool)
        if not hit.any():
            hit = np.char.lower(values.astype(str)) == name.lower()
        keep |= hit
    return keep


def select_classes(labels: Any, classes: str | Iterable[str] | None, source: str) -> np.ndarray:
    """:func:`class_mask`, but a selection that matches nothing raises :class:`DataError` naming the classes
    present in ``source``."""
    keep = class_mask(labels, classes)
    if classes is not None and not keep.any():
        wanted = [classes] if isinstance(classes, str) else list(classes)
        values = pd.Series(labels).astype(str).to_numpy()
        present = ", ".join(f"{k} ({v})" for k, v in Counter(values).most_common()) or "none"
        raise DataError(
            f"no objects of class {', '.join(repr(w) for w in wanted)} in {source}; "
            f"the classes present are: {present}"
        )
    return keep


def _load_geojson_features(path: Path) -> list[dict]:
    _check_file(path, "GeoJSON")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid GeoJSON ({exc.__class__.__name__}: {exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):  # QuPath scripts write a bare list of features
        features = data
    else:
        raise DataError(f"{path.name} is JSON but not a GeoJSON FeatureCollection or list of features")
    return [f for f in features if isinstance(f, dict) and isinstance(f.get("geometry"), dict)]


def _ring_centroid(ring: np.ndarray) -> tuple[float, float, float]:
    """Signed area and area-weighted centroid of a closed ring (shoelace); falls back to the vertex mean."""
    x, y = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    if abs(area) < 1e-12:
        return 0.0, float(x.mean()), float(y.mean())
    return area, float(((x + x1) * cross).sum() / (6 * area)), float(((y + y1) * cross).sum() / (6 * area))


def _polygon_centroid(geometry: dict) -> tuple[float, float]:
    """Centroid of a GeoJSON Polygon/MultiPolygon in its own coordinates (holes subtracted)."""
    if shapely is not None:
        c = shapely.geometry.shape(geometry).centroid
        if not c.is_empty:
            return float(c.x), float(c.y)
    # Without shapely: area-weighted centroid of the rings, holes counted negatively.
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    total, sx, sy, pts = 0.0, 0.0, 0.0, []
    for poly in polys:
        for k, ring in enumerate(poly):
            r = np.asarray(ring, dtype=float)[:, :2]
            pts.append(r)
            a, cx, cy = _ring_centroid(r)
            a = abs(a) if k == 0 else -abs(a)
            total, sx, sy = total + a, sx + a * cx, sy + a * cy
    if abs(total) < 1e-12:
        allp = np.concatenate(pts)
        return float(allp[:, 0].mean()), float(allp[:, 1].mean())
    return sx / total, sy / total


def _read_geojson_cells(path: Path) -> pd.DataFrame:
    cells: list[tuple[float, float, str]] = []
    points: list[tuple[float, float, str]] = []  # point annotations: QuPath's counting tool
    n_annotations = 0
    for feat in _load_geojson_features(path):
        props = feat.get("properties") or {}
        geom = feat["geometry"]
        gtype = geom.get("type")
        otype = str(props.get("objectType", "detection")).lower()
        name = _class_name(props.get("classification"))
        if gtype in ("Point", "MultiPoint"):
            pts = [geom["coordinates"]] if gtype == "Point" else geom["coordinates"]
            target = cells if otype in DETECTION_TYPES else points
            target.extend((float(p[0]), float(p[1]), name) for p in pts)
        elif gtype in ("Polygon", "MultiPolygon"):
            if otype not in DETECTION_TYPES:
                n_annotations += 1
                continue
            cells.append((*_polygon_centroid(geom), name))
    # Detections win; point annotations count only in a file without detections (a manual count).
    rows = cells or points
    if not rows:
        extra = (
            f" (it holds {n_annotations} annotation polygons: load it as annotations)"
            if n_annotations
            else ""
        )
        raise DataError(f"{path.name} contains no cell detections or points{extra}")
    out = pd.DataFrame(rows, columns=["x_px", "y_px", "cls"])
    out.attrs["unit"] = "px"
    return out


_CENTROID_RE = re.compile(r"^centroid\s*([xy])\s*(µm|um|px)$", re.IGNORECASE)


def _read_table_cells(path: Path, mpp: float | None) -> pd.DataFrame:
    _check_file(path, "measurement table")
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        first = fh.readline()
    sep = "\t" if ("\t" in first or path.suffix.lower() in (".tsv", ".txt")) else ","
    try:
        table = pd.read_csv(path, sep=sep, encoding="utf-8-sig", low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path.name} is not a readable QuPath measurement table ({exc})") from None
    # QuPath writes µ as U+00B5; some locales/tools turn it into U+03BC (Greek mu): accept both.
    table.columns = [str(c).replace("\u03bc", "\u00b5").strip() for c in table.columns]
    found: dict[tuple[str, str], str] = {}
    for col in table.columns:
        m = _CENTROID_RE.match(col)
        if m:
            unit = "px" if m.group(2).lower() == "px" else "µm"
            found.setdefault((m.group(1).lower(), unit), col)
    if ("x", "µm") in found and ("y", "µm") in found:
        unit = "µm"
    elif ("x", "px") in found and ("y", "px") in found:
        unit = "px"
    else:
        cols = ", ".join(table.columns[:8]) + (" ..." if len(table.columns) > 8 else "")
        raise DataError(
            f"{path.name} has no centroid columns ('Centroid X µm'/'Centroid Y µm' or 'Centroid X px'/"
            f"'Centroid Y px'), so its objects cannot be placed on the slide (its columns are: {cols}); "
            "export the detections again with Measure > Export measurements"
        )
    # Keep detections/cells when the table also lists annotations or TMA cores.
    if "Object type" in table.columns:
        otype = table["Object type"].astype(str).str.lower()
        is_cell = otype.str.contains("detection|cell", regex=True)
        if is_cell.any():
            table = table[is_cell.to_numpy()]
    x = pd.to_numeric(table[found[("x", unit)]], errors="coerce").to_numpy(float)
    y = pd.to_numeric(table[found[("y", unit)]], errors="coerce").to_numpy(float)
    class_col = next((c for c in ("Classification", "Class") if c in table.columns), None)
    if class_col is None:
        cls = np.full(len(table), UNCLASSIFIED, dtype=object)
    else:
        cls = table[class_col].fillna("").astype(str).str.strip().replace("", UNCLASSIFIED).to_numpy(object)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise DataError(f"{path.name} has centroid columns but no finite centroid values")
    if unit == "µm":
        if mpp is None or not mpp > 0:
            raise DataError(
                f"{path.name} gives centroids in µm: the slide's µm/px (mpp) is needed to place them"
            )
        x, y = x / mpp, y / mpp
    out = pd.DataFrame({"x_px": x[ok], "y_px": y[ok], "cls": cls[ok]})
    out.attrs["unit"] = unit
    out.attrs["n_missing_centroid"] = int((~ok).sum())
    return out


def read_qupath_detections(
    path: str | Path,
    mpp: float | None,
    classes: str | Iterable[str] | None = None,
    *,
    slide_dimensions: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Read QuPath cell detections as centroids in level-0 pixels of the slide.

    Parameters
    ----------
    path
        A QuPath measurement export (``.tsv``/``.csv``/``.txt`` with ``Class`` or ``Classification`` and
        ``Centroid X µm``/``Centroid Y µm``, or ``Centroid X px``/``Centroid Y px``), or a QuPath GeoJSON
        export (FeatureCollection or bare list) of cells/detections (polygons: their centroid) or points.
    mpp
        The slide's µm per level-0 pixel, to turn µm centroids into pixels (unused for px and GeoJSON).
    classes
        Keep only these classes (``"Positive"``, ``["CD3+"]``...); ``"Positive"`` also matches
        ``"Tumor: Positive"``. ``None`` keeps all. A class that matches nothing raises :class:`DataError`
        listing the classes present.
    slide_dimensions
        (width, height) of the slide in level-0 px: when given, the centroids are checked with
        :func:`check_cells_on_slide` (another image, pixels mistaken for microns).

    Returns
    -------
    pandas.DataFrame
        Columns ``x_px``, ``y_px`` (float, level-0 px) and ``cls`` (str); ``attrs["unit"]`` is the unit of
        the file (``"µm"`` or ``"px"``) and ``attrs["classes"]`` counts every class in the file.
    """
    path = Path(path)
    if path.suffix.lower() in (".geojson", ".json"):
        cells = _read_geojson_cells(path)
    else:
        cells = _read_table_cells(path, mpp)
    counts = dict(Counter(cells["cls"]))
    keep = select_classes(cells["cls"], classes, path.name)
    out = cells[keep].reset_index(drop=True)
    out.attrs = dict(cells.attrs, classes=counts, source=str(path), mpp=mpp)
    if slide_dimensions is not None:
        check_cells_on_slide(out, slide_dimensions, mpp)
    return out


def check_cells_on_slide(
    cells: pd.DataFrame,
    slide_dimensions: tuple[int, int],
    mpp: float | None,
    alignment: Alignment | None = None,
) -> None:
    """Raise :class:`DataError` when most centroids fall outside the slide, saying why when it can.

    When the file's unit was µm and the raw numbers would fit the slide as pixels (or the other way round),
    the error says that pixels were mistaken for microns (QuPath had no or another pixel size).
    """
    n = len(cells)
    if n == 0:
        return
    w, h = slide_dimensions
    raw = cells[["x_px", "y_px"]].to_numpy(float)
    xy = alignment.apply_px(raw, mpp) if alignment is not None and mpp else raw
    outside = ~_inside(xy, w, h)
    if outside.mean() <= MAX_OUTSIDE_FRACTION:
        return
    unit = cells.attrs.get("unit", "px")
    source = Path(cells.attrs.get("source", "the file")).name
    size = f"{w}x{h} px"
    if mpp:
        size = f"{w * mpp:.0f}x{h * mpp:.0f} µm"
        # The other reading of the same numbers: µm columns that were really pixels, or px that were µm.
        alt = raw * mpp if unit == "µm" else raw / mpp
        if alignment is not None:
            alt = alignment.apply_px(alt, mpp)
        if _inside(alt, w, h).mean() >= UNIT_FIT_FRACTION:
            if unit == "µm":
                raise DataError(
                    f"{source}: {int(outside.sum())} of {n} centroids fall outside the {size} slide when "
                    "read as µm, but all fit when read as pixels: QuPath probably had no pixel size for "
                    "this image (so its 'µm' are pixels); set Image > Pixel size in QuPath and export "
                    f"again, or check the slide's mpp ({mpp:g} µm/px)"
                )
            raise DataError(
                f"{source}: {int(outside.sum())} of {n} centroids fall outside the {size} slide when read "
                "as pixels, but fit when read as µm: export the centroids in µm (set the pixel size in "
                "QuPath)"
            )
    raise DataError(
        f"this file seems to belong to another image ({int(outside.sum())} of {n} centroids fall outside the "
        f"{size} slide); check that {source} was exported from this slide, or set an alignment"
    )


def _inside(xy: np.ndarray, w: float, h: float) -> np.ndarray:
    return (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)


def cells_points_um(cells: pd.DataFrame, mpp: float) -> np.ndarray:
    """(M, 2) (y, x) in µm, ready for a napari Points layer with no scale."""
    return cells[["y_px", "x_px"]].to_numpy(float) * mpp


# ------------------------------------------------------------------------------------------------------------
# Binning into tiles


def _tile_index(grid: Any) -> tuple[np.ndarray, np.ndarray]:
    table = grid.table
    return table["row"].to_numpy(np.int64), table["col"].to_numpy(np.int64)


def cell_counts_per_tile(
    cells: pd.DataFrame,
    grid: Any,
    *,
    alignment: Alignment | None = None,
    check: bool = True,
) -> np.ndarray:
    """Number of cell centroids in each tile of ``grid.table``.

    Parameters
    ----------
    cells
        From :func:`read_qupath_detections`: ``x_px``, ``y_px`` in level-0 px of the slide (or of the truth
        scan when ``alignment`` is given).
    grid
        The tile grid (``TileGrid``).
    alignment
        Maps the truth scan onto the slide (µm) before binning.
    check
        Raise :class:`DataError` when most centroids fall outside the slide (:func:`check_cells_on_slide`).

    Returns
    -------
    numpy.ndarray
        (N,) int64, aligned with the rows of ``grid.table``.
    """
    if check:
        check_cells_on_slide(cells, tuple(grid.slide_dimensions), grid.mpp, alignment)
    cells = _align_cells(cells, alignment, grid.mpp)
    xy = cells[["x_px", "y_px"]].to_numpy(float)
    col = np.floor(xy[:, 0] / grid.tile_px).astype(np.int64)
    row = np.floor(xy[:, 1] / grid.tile_px).astype(np.int64)
    ok = (col >= 0) & (col < grid.n_cols) & (row >= 0) & (row < grid.n_rows)
    full = np.bincount(row[ok] * grid.n_cols + col[ok], minlength=grid.n_rows * grid.n_cols)
    rows, cols = _tile_index(grid)
    return full[rows * grid.n_cols + cols].astype(np.int64)


# ------------------------------------------------------------------------------------------------------------
# Masks

_CHANNELS = {"red": 0, "green": 1, "blue": 2, "r": 0, "g": 1, "b": 2}


def read_mask(path: str | Path, channel: int | str | None = None) -> np.ndarray:
    """Read a binary or label segmentation mask (PNG, TIFF, ...) as a 2-D array.

    Parameters
    ----------
    path
        The mask image; it covers the whole slide at any resolution (see :func:`mask_fraction_per_tile`).
    channel
        For a colour mask (e.g. red = positive cell, blue = negative), the channel that marks the positive
        pixels: 0/1/2 or ``"red"``/``"green"``/``"blue"``. Grey images stored as RGB need none.

    Returns
    -------
    numpy.ndarray
        (h, w) array: bool/uint for binary masks, integers for label masks (0 = background).
    """
    from skimage import io  # skimage picks PIL/tifffile/imageio by format

    path = Path(path)
    _check_file(path, "mask")
    try:
        img = np.asarray(io.imread(str(path)))
    except Exception as exc:  # the readers raise many types for a bad image
        raise DataError(f"{path.name} is not a readable image ({exc.__class__.__name__}: {exc})") from None
    img = np.squeeze(img)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3]
        if channel is not None:
            idx = _CHANNELS.get(str(channel).lower(), channel)
            try:
                return rgb[..., int(idx)]
            except (ValueError, IndexError):
                raise DataError(f"channel {channel!r} is not one of red, green, blue (0, 1, 2)") from None
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
        raise DataError(
            f"{path.name} is a colour image: pick the channel that marks the positive pixels "
            "(red, green or blue)"
        )
    if img.ndim != 2:
        raise DataError(f"{path.name} is not a 2-D mask (shape {img.shape}); save a single-plane PNG or TIFF")
    return img


@dataclass(frozen=True)
class MaskGeometry:
    """Where a mask lies on the slide it was drawn for: mask pixel ``(i, j)`` covers truth-scan level-0 px
    ``[j*sx, (j+1)*sx) x [i*sy, (i+1)*sy)`` (before any alignment).

    Attributes
    ----------
    mask_shape
        (h, w) of the mask in pixels.
    sx, sy
        Level-0 px of the truth scan per mask px along x and y.
    problem
        Why the mask cannot be binned as it is ("" when it can): a mask scaled by size whose aspect ratio
        does not match the slide's. It can still be drawn (stretched over the slide).
    """

    mask_shape: tuple[int, int]
    sx: float
    sy: float
    problem: str = ""

    def check(self) -> None:
        """Raise :class:`DataError` with :attr:`problem` when there is one."""
        if self.problem:
            raise DataError(self.problem)

    def layer_scale_translate(self, mpp: float) -> tuple[tuple[float, float], tuple[float, float]]:
        """``scale`` and ``translate`` (µm, (y, x)) of an image layer of the mask over a slide layer of
        ``scale = mpp``.

        napari puts pixel centres on integer data coordinates: mask pixel ``j`` covers level-0 px
        ``[j*s, (j+1)*s)``, so its centre is where slide pixel ``j*s + (s-1)/2`` is.
        """
        m = float(mpp)
        return (self.sy * m, self.sx * m), ((self.sy - 1) / 2 * m, (self.sx - 1) / 2 * m)


def mask_geometry(
    mask_shape: tuple[int, int],
    slide_dimensions: tuple[int, int],
    mpp: float | None,
    *,
    mask_downsample: float | None = None,
    mask_mpp: float | None = None,
    max_aspect_mismatch: float = 0.02,
) -> MaskGeometry:
    """How a mask of ``mask_shape`` (h, w) maps onto a slide of ``slide_dimensions`` (w, h) level-0 px.

    ``mask_mpp`` (µm per mask px, through ``mpp``, the truth scan's µm per level-0 px) wins over
    ``mask_downsample`` (level-0 px per mask px); with neither the mask is stretched over the whole slide and
    its aspect ratio must match the slide's within ``max_aspect_mismatch`` (else :attr:`MaskGeometry.problem`
    says why). A non-positive downsample raises :class:`DataError`.
    """
    mh, mw = (int(v) for v in mask_shape)
    w, h = (int(v) for v in slide_dimensions)
    if mask_mpp is not None:
        if not mpp:
            raise DataError("the mask's µm/px needs the slide's µm/px")
        mask_downsample = float(mask_mpp) / float(mpp)
    if mask_downsample is not None:
        if not mask_downsample > 0:
            raise DataError(f"the mask downsample must be positive, got {mask_downsample}")
        return MaskGeometry((mh, mw), float(mask_downsample), float(mask_downsample))
    sx, sy = w / mw, h / mh
    problem = ""
    if abs(sx / sy - 1.0) > max_aspect_mismatch:
        problem = (
            f"the mask is {mw}x{mh} px (aspect {mw / mh:.3f}) but the slide is {w}x{h} px (aspect "
            f"{w / h:.3f}): it does not cover the same area; give the mask's µm/px or downsample, "
            "or crop it"
        )
    return MaskGeometry((mh, mw), sx, sy, problem)


def mask_fraction_per_tile(
    mask: np.ndarray,
    grid: Any,
    mask_downsample: float | None = None,
    *,
    mask_mpp: float | None = None,
    positive: int | Iterable[int] | None = None,
    alignment: Alignment | None = None,
    max_aspect_mismatch: float = 0.02,
    geometry: MaskGeometry | None = None,
) -> np.ndarray:
    """Fraction of positive mask pixels in each tile.

    Parameters
    ----------
    mask
        (h, w) mask covering the slide from its top-left corner; non-zero (or ``positive`` labels) counts.
    grid
        The tile grid.
    mask_downsample
        Level-0 px per mask px. ``mask_mpp`` (µm per mask px) gives the same through the slide's mpp. With
        neither, the mask is taken to cover the whole slide and is scaled by size; its aspect ratio must then
        match the slide's within ``max_aspect_mismatch`` (2 %), else :class:`DataError`.
    positive
        Label value(s) counted as positive in a label mask; default any non-zero pixel.
    alignment
        Maps the mask's scan (µm) onto the slide.
    geometry
        Where the mask lies (:func:`mask_geometry`), computed once by the caller that also draws the mask
        (:class:`napari_he2rna.comparison.Comparison`); it replaces ``mask_downsample``, ``mask_mpp`` and
        ``max_aspect_mismatch``.

    Returns
    -------
    numpy.ndarray
        (N,) float64 in [0, 1] aligned with ``grid.table``; NaN for tiles the mask does not reach.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise DataError(f"a mask must be a non-empty 2-D array, got shape {mask.shape}")
    pos = mask != 0 if positive is None else np.isin(mask, np.atleast_1d(np.asarray(positive)))
    mh, mw = pos.shape
    if geometry is None:
        geometry = mask_geometry(
            pos.shape,
            grid.slide_dimensions,
            grid.mpp,
            mask_downsample=mask_downsample,
            mask_mpp=mask_mpp,
            max_aspect_mismatch=max_aspect_mismatch,
        )
    elif tuple(geometry.mask_shape) != pos.shape:
        raise ValueError(f"the geometry is for a {geometry.mask_shape} mask, not {pos.shape}")
    geometry.check()
    sx, sy = geometry.sx, geometry.sy
    if alignment is not None and not alignment.is_identity and not _scales_and_shifts(alignment):
        return _mask_fraction_sampled(pos, grid, sx, sy, alignment)
    # Mask pixel j's centre in truth level-0 px, then through an axis-aligned alignment to slide px.
    cx = (np.arange(mw) + 0.5) * sx
    cy = (np.arange(mh) + 0.5) * sy
    if alignment is not None and not alignment.is_identity:
        m, off = np.asarray(alignment.matrix), np.asarray(alignment.offset_um) / grid.mpp
        cx, cy = cx * m[0, 0] + off[0], cy * m[1, 1] + off[1]
    tcol = np.floor(cx / grid.tile_px).astype(np.int64)
    trow = np.floor(cy / grid.tile_px).astype(np.int64)
    n_rows, n_cols = grid.n_rows, grid.n_cols
    pos_sum = np.zeros((n_rows, n_cols), dtype=np.int64)
    npix = np.outer(
        np.bincount(trow[(trow >= 0) & (trow < n_rows)], minlength=n_rows),
        np.bincount(tcol[(tcol >= 0) & (tcol < n_cols)], minlength=n_cols),
    )
    # Sum positives per (tile row, tile col) without a full-size index array: reduceat over runs of equal
    # tile column (a monotonic map), strip by strip of mask rows, so memory stays O(strip).
    col_ok = (tcol >= 0) & (tcol < n_cols)
    if col_ok.any():  # tcol is non-decreasing: the scale along x is positive
        first = int(np.argmax(col_ok))
        last = len(tcol) - int(np.argmax(col_ok[::-1]))
        sub_cols = tcol[first:last]
        starts = np.flatnonzero(np.r_[True, np.diff(sub_cols) != 0])
        group_col = sub_cols[starts]
        strip = max(1, 2**24 // max(mw, 1))
        for r0 in range(0, mh, strip):
            rows_here = trow[r0 : r0 + strip]
            okr = (rows_here >= 0) & (rows_here < n_rows)
            if not okr.any():
                continue
            block = pos[r0 : r0 + strip, first:last][okr].astype(np.int32)
            per_col = np.add.reduceat(block, starts, axis=1)  # (rows, groups)
            np.add.at(pos_sum, (rows_here[okr][:, None], group_col[None, :]), per_col)
    frac = np.full((n_rows, n_cols), np.nan)
    has = npix > 0
    frac[has] = pos_sum[has] / npix[has]
    rows, cols = _tile_index(grid)
    out = frac[rows, cols]
    missing = np.isnan(out)
    if missing.any():
        # A mask coarser than the tiles puts no pixel centre in some tiles: sample it at the tile centre.
        out[missing] = _sample_mask_at_centres(pos, grid, sx, sy, alignment, np.flatnonzero(missing))
    if len(out) and np.isnan(out).all():
        raise DataError(
            f"the {mw}x{mh} px mask, at {sx:g} slide px per mask px, covers none of the slide's tiles; "
            "check its µm/px and the alignment"
        )
    return out


def _scales_and_shifts(alignment: Alignment) -> bool:
    m = np.asarray(alignment.matrix)
    return alignment.is_axis_aligned and m[0, 0] > 0 and m[1, 1] > 0


def _sample_mask_at_centres(pos, grid, sx, sy, alignment, which) -> np.ndarray:
    rows, cols = _tile_index(grid)
    t = grid.tile_px
    xy = np.column_stack([(cols[which] + 0.5) * t, (rows[which] + 0.5) * t]).astype(float)
    if alignment is not None and not alignment.is_identity:
        xy = alignment.inverse().apply_px(xy, grid.mpp)
    j = np.floor(xy[:, 0] / sx).astype(np.int64)
    i = np.floor(xy[:, 1] / sy).astype(np.int64)
    ok = (i >= 0) & (i < pos.shape[0]) & (j >= 0) & (j < pos.shape[1])
    out = np.full(len(which), np.nan)
    out[ok] = pos[i[ok], j[ok]]
    return out


def _mask_fraction_sampled(pos, grid, sx, sy, alignment, k: int = 8) -> np.ndarray:
    """Rotated/sheared alignments: sample each tile on a k x k lattice mapped back into the mask."""
    rows, cols = _tile_index(grid)
    t = grid.tile_px
    off = (np.arange(k) + 0.5) / k * t
    ox, oy = np.meshgrid(off, off)
    x = (cols[:, None] * t + ox.ravel()[None, :]).ravel()
    y = (rows[:, None] * t + oy.ravel()[None, :]).ravel()
    xy = alignment.inverse().apply_px(np.column_stack([x, y]), grid.mpp)
    j = np.floor(xy[:, 0] / sx).astype(np.int64)
    i = np.floor(xy[:, 1] / sy).astype(np.int64)
    ok = (i >= 0) & (i < pos.shape[0]) & (j >= 0) & (j < pos.shape[1])
    val = np.zeros(len(x))
    val[ok] = pos[i[ok], j[ok]]
    n_ok = ok.reshape(len(rows), -1).sum(1)
    s = val.reshape(len(rows), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_ok > 0, s / np.maximum(n_ok, 1), np.nan)


# ------------------------------------------------------------------------------------------------------------
# Annotations


@dataclass
class AnnotationPolygon:
    """One annotation polygon in level-0 px: ``exterior`` (K, 2) x/y and ``holes`` (list of (K, 2) x/y)."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    cls: str = UNCLASSIFIED
    name: str = ""
    repaired: bool = False  # shapely.make_valid changed it (self-intersection, bow-tie...)


def _geojson_polygons(geom: dict) -> list[list[np.ndarray]]:
    if geom.get("type") == "Polygon":
        polys = [geom["coordinates"]]
    elif geom.get("type") == "MultiPolygon":
        polys = geom["coordinates"]
    elif geom.get("type") == "GeometryCollection":
        return [p for g in geom.get("geometries", []) for p in _geojson_polygons(g)]
    else:
        return []
    return [[np.asarray(r, dtype=float)[:, :2] for r in poly if len(r) >= 3] for poly in polys if poly]


def read_annotations(
    path: str | Path,
    classes: str | Iterable[str] | None = None,
    *,
    object_types: Sequence[str] = ("annotation",),
) -> list[AnnotationPolygon]:
    """Read QuPath GeoJSON annotation polygons (holes kept), level-0 px of the image they were drawn on.

    Parameters
    ----------
    path
        A QuPath GeoJSON export (FeatureCollection or bare list of features). Points and lines are skipped.
    classes
        Keep these classes (e.g. ``"Tumor"``); ``None`` keeps all. A class with no polygon raises
        :class:`DataError` listing the classes present.
    object_types
        QuPath ``objectType`` values to keep; features without one are kept.

    Returns
    -------
    list of AnnotationPolygon
        Invalid polygons (self-intersecting...) are repaired with ``shapely.make_valid`` (``repaired=True``);
        without shapely they are kept as drawn (filled with the even-odd rule).
    """
    path = Path(path)
    features = _load_geojson_features(path)
    polys: list[AnnotationPolygon] = []
    types = {t.lower() for t in object_types}
    for feat in features:
        props = feat.get("properties") or {}
        otype = str(props.get("objectType", "annotation")).lower()
        if otype not in types:
            continue
        name = _class_name(props.get("classification"))
        for rings in _geojson_polygons(feat["geometry"]):
            if not rings:
                continue
            polys.extend(_repair(AnnotationPolygon(rings[0], rings[1:], name, str(props.get("name", "")))))
    if not polys:
        raise DataError(f"{path.name} contains no annotation polygons (objectType {', '.join(object_types)})")
    keep = select_classes(pd.Series([p.cls for p in polys]), classes, path.name)
    return [p for p, k in zip(polys, keep, strict=True) if k]


def _repair(poly: AnnotationPolygon) -> list[AnnotationPolygon]:
    if shapely is None:
        return [poly]
    geom = shapely.geometry.Polygon(poly.exterior, [h for h in poly.holes if len(h) >= 3])
    if geom.is_valid:
        return [poly]
    fixed = shapely.make_valid(geom)
    parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
    out = []
    for part in parts:
        for p in getattr(part, "geoms", [part]):
            if p.is_empty or p.area <= 0:
                continue
            out.append(
                AnnotationPolygon(
                    np.asarray(p.exterior.coords)[:, :2],
                    [np.asarray(r.coords)[:, :2] for r in p.interiors],
                    poly.cls,
                    poly.name,
                    repaired=True,
                )
            )
    return out


def annotation_fraction_per_tile(
    polys: Sequence[AnnotationPolygon],
    grid: Any,
    *,
    samples_per_tile: int = 4,
    alignment: Alignment | None = None,
) -> np.ndarray:
    """Fraction of each tile covered by the union of the polygons (holes excluded).

    The polygons are rasterised with :func:`skimage.draw.polygon` on a lattice of ``samples_per_tile`` x
    ``samples_per_tile`` points per tile (pixel centres), so the fraction has steps of 1/samples_per_tile².

    Returns
    -------
    numpy.ndarray
        (N,) float64 in [0, 1], aligned with ``grid.table``.
    """
    from skimage.draw import polygon as draw_polygon

    s = int(samples_per_tile)
    step = grid.tile_px / s  # level-0 px per raster pixel
    shape = (grid.n_rows * s, grid.n_cols * s)
    covered = np.zeros(shape, dtype=bool)
    for poly in polys:
        rings = [poly.exterior, *poly.holes]
        if alignment is not None and not alignment.is_identity:
            rings = [alignment.apply_px(r, grid.mpp) for r in rings]
        ext = rings[0] / step - 0.5  # raster pixel (i, j) has its centre at level-0 ((j + 0.5) * step, ...)
        r0 = max(int(np.floor(ext[:, 1].min())), 0)
        c0 = max(int(np.floor(ext[:, 0].min())), 0)
        r1 = min(int(np.ceil(ext[:, 1].max())) + 1, shape[0])
        c1 = min(int(np.ceil(ext[:, 0].max())) + 1, shape[1])
        if r1 <= r0 or c1 <= c0:
            continue
        # Each polygon is filled in its bounding box, its holes cut out, then OR-ed in: a hole in one polygon
        # does not erase another polygon drawn over it.
        local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        rr, cc = draw_polygon(ext[:, 1] - r0, ext[:, 0] - c0, shape=local.shape)
        local[rr, cc] = True
        for hole in rings[1:]:
            hr = hole / step - 0.5
            rr, cc = draw_polygon(hr[:, 1] - r0, hr[:, 0] - c0, shape=local.shape)
            local[rr, cc] = False
        covered[r0:r1, c0:c1] |= local
    per_tile = covered.reshape(grid.n_rows, s, grid.n_cols, s).mean(axis=(1, 3))
    rows, cols = _tile_index(grid)
    return per_tile[rows, cols].astype(np.float64)


def annotation_labels(
    grid: Any,
    polys: Sequence[AnnotationPolygon],
    min_fraction: float = 0.5,
    *,
    negative: Sequence[AnnotationPolygon] | None = None,
    alignment: Alignment | None = None,
    samples_per_tile: int = 4,
) -> np.ndarray:
    """A label per tile: 1.0 inside the polygons (covered at least ``min_fraction``), else 0.0.

    With ``negative`` polygons (e.g. the pathologist's "non-tumour" regions), tiles covered by those get 0.0
    and tiles in neither get NaN (left out of the metrics).

    Returns
    -------
    numpy.ndarray
        (N,) float64 of 1.0 / 0.0 / NaN, aligned with ``grid.table``.
    """
    kw = {"alignment": alignment, "samples_per_tile": samples_per_tile}
    pos = annotation_fraction_per_tile(polys, grid, **kw) >= min_fraction
    labels = pos.astype(np.float64)
    if negative is not None:
        neg = annotation_fraction_per_tile(negative, grid, **kw) >= min_fraction
        labels[~pos & ~neg] = np.nan
    return labels


def annotation_shapes_um(
    polys: Sequence[AnnotationPolygon], mpp: float
) -> tuple[list[np.ndarray], list[str]]:
    """Exteriors and holes as (K, 2) (y, x) µm arrays for a napari Shapes layer, and each one's class.

    napari Shapes cannot draw holes, so holes come as separate polygons of class ``"<cls> (hole)"``.
    """
    shapes, classes = [], []
    for p in polys:
        shapes.append(p.exterior[:, ::-1] * mpp)
        classes.append(p.cls)
        for hole in p.holes:
            shapes.append(hole[:, ::-1] * mpp)
            classes.append(f"{p.cls} (hole)")
    return shapes, classes


# ------------------------------------------------------------------------------------------------------------
# One object per loaded truth, for the widget and the CLI

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class GroundTruth:
    """A loaded truth file, kept raw so it can be re-binned when the grid or the alignment changes.

    Attributes
    ----------
    kind
        ``"cells"`` (counts per tile), ``"mask"`` (fraction per tile) or ``"annotations"`` (label per tile).
    source
        The file it came from.
    label
        A short name for tables and plots (``"cell count (Positive)"``, ``"mask fraction"``, ``"Tumor"``).
    cells, mask, polygons
        The raw truth of that kind (the others are ``None``).
    mask_downsample, mask_mpp
        How the mask maps onto the slide (both ``None``: by size).
    """

    kind: str
    source: Path
    label: str
    cells: pd.DataFrame | None = None
    mask: np.ndarray | None = None
    polygons: list[AnnotationPolygon] | None = None
    mask_downsample: float | None = None
    mask_mpp: float | None = None

    def per_tile(
        self, grid: Any, alignment: Alignment | None = None, min_fraction: float = 0.5
    ) -> np.ndarray:
        """(N,) truth per tile of ``grid``: counts (int64), fractions or 1.0/0.0 labels (float64)."""
        if self.kind == "cells":
            return cell_counts_per_tile(self.cells, grid, alignment=alignment)
        if self.kind == "mask":
            return mask_fraction_per_tile(
                self.mask, grid, self.mask_downsample, mask_mpp=self.mask_mpp, alignment=alignment
            )
        return annotation_labels(grid, self.polygons, min_fraction, alignment=alignment)


def _geojson_has_detections(path: Path) -> bool:
    for feat in _load_geojson_features(path):
        props = feat.get("properties") or {}
        otype = str(props.get("objectType", "detection")).lower()
        if otype in DETECTION_TYPES or feat["geometry"].get("type") in ("Point", "MultiPoint"):
            return True
    return False


def load_truth(
    path: str | Path,
    mpp: float | None,
    *,
    kind: str | None = None,
    classes: str | Iterable[str] | None = None,
    channel: int | str | None = None,
    mask_downsample: float | None = None,
    mask_mpp: float | None = None,
    slide_dimensions: tuple[int, int] | None = None,
) -> GroundTruth:
    """Load any truth file; ``kind`` is guessed from the file when not given.

    Images are masks; ``.tsv``/``.csv``/``.txt`` are QuPath detection tables; a GeoJSON is cells when it holds
    detections, cells or points, else annotations. ``classes`` filters cells or annotation polygons.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if kind is None:
        if suffix in MASK_SUFFIXES:
            kind = "mask"
        elif suffix in (".geojson", ".json"):
            kind = "cells" if _geojson_has_detections(path) else "annotations"
        else:
            kind = "cells"
    wanted = [classes] if isinstance(classes, str) else list(classes or [])
    if kind == "cells":
        cells = read_qupath_detections(path, mpp, classes=classes, slide_dimensions=slide_dimensions)
        label = "cell count" + (f" ({'+'.join(wanted)})" if wanted else "")
        return GroundTruth("cells", path, label, cells=cells)
    if kind == "mask":
        mask = read_mask(path, channel=channel)
        return GroundTruth(
            "mask", path, "mask fraction", mask=mask, mask_downsample=mask_downsample, mask_mpp=mask_mpp
        )
    if kind == "annotations":
        polys = read_annotations(path, classes=classes)
        label = "+".join(wanted) if wanted else "annotation"
        return GroundTruth("annotations", path, label, polygons=polys)
    raise ValueError(f"kind must be 'cells', 'mask' or 'annotations', not {kind!r}")
