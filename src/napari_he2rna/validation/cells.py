"""Cells as ground truth: QuPath detections (measurement TSV/CSV or GeoJSON), their classes, counts per tile.

QuPath measurement tables give centroids in µm (or px when QuPath had no pixel size), QuPath GeoJSON gives
level-0 pixels of the image it was drawn on; both are read as centroids in level-0 px of the slide, through
its µm/px. A file from another image or pixels mistaken for microns raise
:class:`~napari_he2rna.errors.DataError` (:func:`check_cells_on_slide`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from .geojson import UNCLASSIFIED, check_file, class_name, load_geojson_features, shapely
from .grid import tile_index
from .transform import Alignment

#: QuPath object types that are single cells; point annotations (the counting tool) count as cells too.
DETECTION_TYPES = ("detection", "cell", "tile")
#: Share of centroids that may fall outside the slide before the file is taken to be from another image.
MAX_OUTSIDE_FRACTION = 0.5
#: Share of centroids that must fit under the other unit before we say "pixels mistaken for microns".
UNIT_FIT_FRACTION = 0.95


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
    for feat in load_geojson_features(path):
        props = feat.get("properties") or {}
        geom = feat["geometry"]
        gtype = geom.get("type")
        otype = str(props.get("objectType", "detection")).lower()
        name = class_name(props.get("classification"))
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
    check_file(path, "measurement table")
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


def _align_cells(cells: pd.DataFrame, alignment: Alignment | None, mpp: float) -> pd.DataFrame:
    if alignment is None or alignment.is_identity:
        return cells
    out = cells.copy()
    xy = alignment.apply_px(cells[["x_px", "y_px"]].to_numpy(float), mpp)
    out["x_px"], out["y_px"] = xy[:, 0], xy[:, 1]
    out.attrs = dict(cells.attrs, aligned=True)
    return out


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
    rows, cols = tile_index(grid)
    return full[rows * grid.n_cols + cols].astype(np.int64)
