"""One comparison of tile scores with one ground truth: the state the Compare dock and ``he2rna compare``
share.

A :class:`Comparison` holds the slide's tile grid, the loaded truth
(:class:`~napari_he2rna.validation.truth.GroundTruth`: QuPath cells, a mask or annotation polygons), the
filters (classes
counted or inside, the outside class, the mask's scale), the alignment of the truth scan onto the slide, the
truth per tile (cached), and the metrics of the last scores compared
(:mod:`napari_he2rna.validation.metrics`). It also
gives what a viewer draws of the truth: points, polygon outlines and their roles, and the mask with its
placement, from the same geometry the numbers use (:func:`.masks.mask_geometry`), so what is
drawn and what is counted cannot disagree.

No Qt, no napari: the dock only wires its fields to these attributes, the CLI builds one per truth.

Coordinates: the truth is in level-0 px of the scan it was drawn on (``scan_mpp`` µm/px; the slide's own when
it was drawn on the slide); the alignment maps it onto the slide in µm, px being taken to µm with the slide's
``mpp`` (:meth:`~.transform.Alignment.apply_px`). Drawn data are (y, x) µm for layers of the slide's
scale, before the alignment's affine (:meth:`Comparison.layer_affine`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import DataError
from . import metrics
from .annotations import AnnotationPolygon, annotation_labels, annotation_shapes_um
from .cells import cell_counts_per_tile, cells_points_um, class_mask, select_classes
from .masks import MaskGeometry, mask_fraction_per_tile, mask_geometry
from .transform import Alignment
from .truth import GroundTruth, load_truth

if TYPE_CHECKING:
    from ..slides.tiling import TileGrid

Metrics = metrics.TileMetrics | metrics.AnnotationMetrics


def layer_affine(alignment: Alignment | None) -> np.ndarray:
    """An alignment (truth µm -> slide µm, acting on (x, y, 1)) as a napari affine acting on (y, x, 1) µm."""
    a = (alignment or Alignment()).affine
    return np.array([[a[1, 1], a[1, 0], a[1, 2]], [a[0, 1], a[0, 0], a[0, 2]], [0.0, 0.0, 1.0]])


@dataclass
class Comparison:
    """Tile scores against one ground truth on one slide.

    Attributes
    ----------
    slide_dimensions
        (width, height) of the slide in level-0 px.
    mpp
        The slide's µm per level-0 px.
    grid
        The slide's tile grid (``None`` until scores exist; the truth can be loaded and drawn before).
    truth
        The loaded truth, unfiltered (``None`` before any load).
    scan_mpp
        µm per level-0 px of the scan the truth was drawn on (an IHC section); ``None``: the slide's.
    classes
        Cells: the classes counted; annotations: the classes that are "inside". ``None``: all.
    negative_classes
        Annotations: the classes that are "outside" (tiles in neither are left out); ``None``: every other
        tile is outside.
    min_fraction
        Annotations: tile share inside a polygon for the tile to be inside.
    mask_downsample, mask_mpp
        Masks: level-0 px of the truth scan per mask px, or µm per mask px (wins); both ``None``: the mask
        is stretched over the slide.
    alignment
        Truth scan -> slide, µm (``None``: the truth was drawn on the slide).
    percentiles, thresholds, top_n
        The metrics' settings (see :func:`napari_he2rna.validation.metrics.tile_metrics`).
    scores, results, truth_values, truth_label
        The scores compared last (name -> (N,)), their metrics, and the truth per tile and its name they
        were compared with, from :meth:`compute`.
    """

    slide_dimensions: tuple[int, int]
    mpp: float
    grid: TileGrid | None = None
    truth: GroundTruth | None = None
    scan_mpp: float | None = None
    classes: tuple[str, ...] | None = None
    negative_classes: tuple[str, ...] | None = None
    min_fraction: float = 0.5
    mask_downsample: float | None = None
    mask_mpp: float | None = None
    alignment: Alignment | None = None
    percentiles: Sequence[float] = metrics.DEFAULT_PERCENTILES
    thresholds: Sequence[float] = ()
    top_n: int = 100
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    results: dict[str, Metrics] = field(default_factory=dict)
    truth_values: np.ndarray | None = None
    truth_label: str = ""
    _cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def for_grid(cls, grid: TileGrid, ground_truth: GroundTruth | None = None, **kw: Any) -> Comparison:
        """A comparison on ``grid`` (its slide size and µm/px)."""
        dims = tuple(int(v) for v in grid.slide_dimensions)
        return cls(dims, float(grid.mpp), grid=grid, truth=ground_truth, **kw)

    # ------------------------------------------------------------------------------------------ truth
    @property
    def kind(self) -> str | None:
        """``"cells"``, ``"mask"``, ``"annotations"`` or ``None``."""
        return None if self.truth is None else self.truth.kind

    @property
    def truth_mpp(self) -> float:
        """µm per level-0 px of the truth's scan (``scan_mpp``, else the slide's)."""
        return float(self.scan_mpp or self.mpp)

    def load(self, path: str | Path, kind: str | None = None, channel: int | str | None = None):
        """Read a truth file (kind guessed when ``None``) and make it this comparison's truth.

        QuPath µm are read at :attr:`truth_mpp`. A failed read raises and leaves the previous truth.
        """
        loaded = load_truth(path, self.truth_mpp, kind=kind, channel=channel)
        self.truth = loaded
        self.clear()
        return loaded

    def clear(self) -> None:
        """Forget the cached truth per tile and the last metrics."""
        self._cache = None
        self.scores, self.results, self.truth_values, self.truth_label = {}, {}, None, ""

    def _require_truth(self) -> GroundTruth:
        if self.truth is None:
            raise DataError("load a truth file first (QuPath detections, a mask or annotations)")
        return self.truth

    @property
    def label(self) -> str:
        """The truth in tables and plots: ``"cell count (Positive)"``, ``"mask fraction"``, ``"Tumor"``."""
        kind = self.kind
        if kind == "cells":
            return "cell count" + (f" ({'+'.join(self.classes)})" if self.classes else "")
        if kind == "mask":
            return "mask fraction"
        if kind == "annotations":
            return "+".join(self.classes) if self.classes else "inside"
        return ""

    def class_names(self) -> list[str]:
        """Classes in the file: cells most frequent first, annotation polygons in file order."""
        gt = self.truth
        if gt is None or gt.kind == "mask":
            return []
        if gt.kind == "cells":
            counts = gt.cells.attrs.get("classes") or dict(gt.cells["cls"].value_counts())
            return [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
        return list(dict.fromkeys(p.cls for p in gt.polygons or []))

    def selected_cells(self) -> pd.DataFrame:
        """The cells of :attr:`classes` (all without a filter; possibly none), level-0 px of the scan."""
        gt = self.truth
        if gt is None or gt.kind != "cells":
            return pd.DataFrame(columns=["x_px", "y_px", "cls"])
        cells = gt.cells
        if self.classes is None:
            return cells
        out = cells[class_mask(cells["cls"], self.classes)].reset_index(drop=True)
        out.attrs = dict(cells.attrs)
        return out

    def _polygons(self, classes: tuple[str, ...] | None, strict: bool) -> list[AnnotationPolygon]:
        gt = self._require_truth()
        polys = list(gt.polygons or [])
        if classes is None:
            return polys
        labels = [p.cls for p in polys]
        keep = select_classes(labels, classes, gt.source.name) if strict else class_mask(labels, classes)
        return [p for p, k in zip(polys, keep, strict=True) if k]

    def polygon_roles(self) -> list[str]:
        """For each ring drawn by :meth:`outlines_um`: ``"inside"``, ``"outside"`` or ``"other"``."""
        gt = self.truth
        if gt is None or gt.kind != "annotations":
            return []
        _, classes = annotation_shapes_um(gt.polygons or [], self.mpp)
        bases = [c.removesuffix(" (hole)") for c in classes]
        inside = class_mask(bases, self.classes) if bases else np.zeros(0, bool)
        if self.negative_classes is None:
            outside = np.zeros(len(bases), dtype=bool)
        else:
            outside = class_mask(bases, self.negative_classes)
        return ["inside" if i else "outside" if o else "other" for i, o in zip(inside, outside, strict=True)]

    # ------------------------------------------------------------------------------------------ drawing
    def points_um(self) -> np.ndarray:
        """(M, 2) (y, x) µm of the selected cells, for a Points layer of the slide's scale."""
        return cells_points_um(self.selected_cells(), self.mpp)

    def outlines_um(self) -> list[np.ndarray]:
        """Every polygon ring (exteriors and holes) as (K, 2) (y, x) µm; roles in :meth:`polygon_roles`."""
        gt = self.truth
        if gt is None or gt.kind != "annotations":
            return []
        return annotation_shapes_um(gt.polygons or [], self.mpp)[0]

    def mask_geometry(self) -> MaskGeometry:
        """Where the mask lies on the slide: the one geometry behind the drawn mask and the fractions.

        Raises :class:`DataError` when the truth is not a mask (or the downsample is not positive).
        """
        gt = self._require_truth()
        if gt.kind != "mask":
            raise DataError("the truth is not a mask")
        return mask_geometry(
            np.shape(gt.mask),
            self.slide_dimensions,
            self.truth_mpp,
            mask_downsample=self.mask_downsample,
            mask_mpp=self.mask_mpp,
        )

    def mask_image(self) -> np.ndarray:
        """(h, w) uint8: 1 where the mask is positive, for an image layer placed by :meth:`mask_placement`."""
        return (np.asarray(self._require_truth().mask) != 0).astype(np.uint8)

    def mask_placement(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``scale`` and ``translate`` ((y, x) µm) of the mask's image layer, from :meth:`mask_geometry`
        (before the alignment's affine, :meth:`layer_affine`)."""
        return self.mask_geometry().layer_scale_translate(self.mpp)

    def layer_affine(self) -> np.ndarray:
        """The alignment as a napari affine: 3x3 acting on (y, x, 1) µm."""
        return layer_affine(self.alignment)

    # ------------------------------------------------------------------------------------------ numbers
    def _settings(self) -> tuple:
        """Everything besides the grid and the truth objects that the truth per tile depends on."""
        return (
            self.alignment,
            self.classes,
            self.negative_classes,
            self.min_fraction,
            self.mask_downsample,
            self.mask_mpp,
            self.scan_mpp,
            tuple(self.slide_dimensions),
        )

    def truth_per_tile(self) -> np.ndarray:
        """(N,) truth per tile of :attr:`grid`: counts (int64), mask fractions or 1.0/0.0/NaN labels (cached).

        Raises :class:`DataError` when there is no grid or truth, a class matches nothing (the classes
        present are named), or the truth lies off the slide.
        """
        if self.grid is None:
            raise DataError("the slide has no tile grid yet: run the model on it first")
        gt = self._require_truth()
        settings = self._settings()
        cached = self._cache
        if cached is not None and cached[0] is self.grid and cached[1] is gt and cached[2] == settings:
            return cached[3]
        grid, alignment = self.grid, self.alignment
        if gt.kind == "cells":
            cells = gt.cells
            if self.classes is not None:
                keep = select_classes(cells["cls"], self.classes, gt.source.name)
                cells = cells[keep].reset_index(drop=True)
            if not len(cells):
                raise DataError(f"no cell in {gt.source.name}")
            values = cell_counts_per_tile(cells, grid, alignment=alignment)
        elif gt.kind == "mask":
            values = mask_fraction_per_tile(gt.mask, grid, alignment=alignment, geometry=self.mask_geometry())
        else:
            inside = self._polygons(self.classes, strict=True)
            negative = None if self.negative_classes is None else self._polygons(self.negative_classes, True)
            values = annotation_labels(
                grid, inside, self.min_fraction, negative=negative, alignment=alignment
            )
        self._cache = (self.grid, gt, settings, values)  # the objects themselves: an id can be reused
        return values

    def metrics_for(self, scores: Any) -> Metrics:
        """Metrics of one (N,) score array against the truth per tile."""
        values = self.truth_per_tile()
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "annotations":
            return metrics.annotation_metrics(s, values, top_n=self.top_n)
        return metrics.tile_metrics(s, values, self.percentiles, self.thresholds, self.top_n)

    def compute(self, scores: Mapping[str, Any]) -> dict[str, Metrics]:
        """Metrics of each named (N,) score array, kept in :attr:`results` with the truth they were
        compared with (:attr:`truth_values`, :attr:`truth_label`)."""
        self.scores, self.results, self.truth_values, self.truth_label = {}, {}, None, ""
        values = self.truth_per_tile()
        kept = {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
        results = {name: self.metrics_for(v) for name, v in kept.items()}
        self.scores, self.results, self.truth_values, self.truth_label = kept, results, values, self.label
        return results

    def metrics_table(self) -> pd.DataFrame:
        """The long metrics table of :attr:`results` (see
        :func:`napari_he2rna.validation.metrics.metrics_table`)."""
        return metrics.metrics_table(self.results, self.truth_label)

    def per_tile_table(self) -> pd.DataFrame:
        """Tile id and position, each score of :attr:`results` and the truth per tile they were compared
        with (see :func:`napari_he2rna.validation.metrics.compare_table`)."""
        if self.grid is None or self.truth_values is None:
            raise DataError("nothing compared yet: load a truth file and pick a gene or set")
        return metrics.compare_table(
            self.grid.table, dict(self.scores), {self.truth_label: self.truth_values}
        )

    def spatial_null(self, scores: Any, n: int) -> dict[str, Any]:
        """:func:`napari_he2rna.validation.metrics.spatial_null_p` of one score array against the truth per
        tile."""
        from ..maps.heatmaps import heatmap_raster

        grid = self.grid
        return metrics.spatial_null_p(
            heatmap_raster(grid, np.asarray(scores, dtype=float)),
            heatmap_raster(grid, self.truth_per_tile()),
            n,
        )
