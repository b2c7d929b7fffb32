"""Ground truth per tile: QuPath cell detections, segmentation masks and annotation polygons, loaded as one.

Everything is aligned to the H&E slide in **level-0 pixels** (x before y), through the slide's µm/px: QuPath
measurement tables give centroids in µm (or px when QuPath had no pixel size), QuPath GeoJSON gives level-0
pixels of the image it was drawn on, and masks are scaled to the slide by size or by their own µm/px. When the
truth was drawn on another scan of the same tissue (an IHC section), an :class:`~.transform.Alignment`
(offset, scale or a full affine, in µm) maps it onto the slide before it is binned into tiles.

Each format has its module: :mod:`.cells` (QuPath detections, counts per tile), :mod:`.masks` (fractions per
tile), :mod:`.annotations` (polygons, labels per tile); :mod:`.geojson` holds what they share and
:mod:`.grid` the tile grid they are binned into. This module ties them together: :class:`GroundTruth` is one
loaded truth of any kind, :func:`load_truth` reads any file.

Nothing here guesses silently: a file from another image, pixels mistaken for microns, a mask of another
shape, an empty class or an empty file raise :class:`~napari_he2rna.errors.DataError` with one sentence
saying what was found and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .annotations import AnnotationPolygon, annotation_labels, read_annotations
from .cells import DETECTION_TYPES, cell_counts_per_tile, read_qupath_detections
from .geojson import load_geojson_features
from .masks import mask_fraction_per_tile, read_mask
from .transform import Alignment

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
    for feat in load_geojson_features(path):
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
