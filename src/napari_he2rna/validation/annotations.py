"""Annotation polygons as ground truth: QuPath GeoJSON polygons (holes kept, invalid ones repaired), the
fraction of each tile they cover, a label per tile, and their shapes for a viewer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from .cells import select_classes
from .geojson import UNCLASSIFIED, class_name, load_geojson_features, shapely
from .grid import tile_index
from .transform import Alignment


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
    features = load_geojson_features(path)
    polys: list[AnnotationPolygon] = []
    types = {t.lower() for t in object_types}
    for feat in features:
        props = feat.get("properties") or {}
        otype = str(props.get("objectType", "annotation")).lower()
        if otype not in types:
            continue
        name = class_name(props.get("classification"))
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
    rows, cols = tile_index(grid)
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
