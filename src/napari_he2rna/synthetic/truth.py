"""The planted truth of a slide: epithelium mask, tumour polygons and the per-tile truth table, computed from
the drawn layout and cells; readers of the tile and cell tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .biology import slide_signals
from .params import BACKGROUND, EPITHELIUM, FAT, FOLLICLE, LAYOUT_DS, MASK_DOWNSAMPLE, STROMA, SlideParams


@dataclass
class SlideTruth:
    """What was planted in one slide.

    Attributes
    ----------
    slide_id, path : the sample id and the TIFF path.
    dimensions : level-0 (width, height) in px.  mpp : µm per px.  tile_px : tile side in level-0 px.
    params : the :class:`SlideParams` it was drawn from.
    cells : one row per nucleus: ``x``, ``y`` (level-0 px, continuous, pixel i covers [i, i+1)), ``type``
        (one of :data:`CELL_TYPES`), ``proliferating`` (bool), ``radius_um``.
    tiles : the ``<id>_tiles.csv`` table (all tiles of the grid, row-major).
    epithelium_mask : (ceil(h/8), ceil(w/8)) bool, the written mask.
    tumor_polygons : list of polygons, each a list of rings (outer first, then holes), each ring an (n, 2)
        array of level-0 (x, y) px, closed.
    files : name -> path of every file written.
    """

    slide_id: str
    path: Path
    dimensions: tuple[int, int]
    mpp: float
    tile_px: int
    params: SlideParams
    cells: pd.DataFrame
    tiles: pd.DataFrame
    epithelium_mask: np.ndarray
    tumor_polygons: list[list[np.ndarray]]
    files: dict[str, Path] = field(default_factory=dict)

    def signals(self) -> dict[str, float]:
        """The slide-level drivers of expression (see :data:`SIGNAL_REFERENCE`)."""
        return slide_signals(self.tiles, self.mpp)


# --- truth tables ------------------------------------------------------------------------------------------


def _block_mean(mask: np.ndarray, block: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Fraction of True per block of ``block`` px, zero-padded to (n_rows*block, n_cols*block)."""
    full = np.zeros((n_rows * block, n_cols * block), np.float32)
    hh, ww = min(mask.shape[0], full.shape[0]), min(mask.shape[1], full.shape[1])
    full[:hh, :ww] = mask[:hh, :ww]
    return full.reshape(n_rows, block, n_cols, block).mean(axis=(1, 3))


def _tumor_polygons(bed_s: np.ndarray, ds: int, w: int, h: int) -> list[list[np.ndarray]]:
    """Outer rings with their holes, level-0 (x, y) px, from the layout-grid tumour-bed score (> 0 inside)."""
    from matplotlib.path import Path as MplPath
    from skimage.measure import find_contours

    padded = np.pad(bed_s, 1, constant_values=-1.0)
    rings = []
    for c in find_contours(padded, 0.0, positive_orientation="high"):
        if len(c) < 4:
            continue
        xy = np.stack([(c[:, 1] - 1 + 0.5) * ds, (c[:, 0] - 1 + 0.5) * ds], 1)
        xy[:, 0] = np.clip(xy[:, 0], 0, w)  # the slide border closes rings that run off the slide
        xy[:, 1] = np.clip(xy[:, 1], 0, h)
        xy = np.round(xy, 2)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        # shoelace in (x, y) with y down: high-valued islands come out with one sign, holes the other
        area = 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))
        if abs(area) < (2 * ds) ** 2:
            continue
        rings.append((area, xy))
    if not rings:
        return []
    outer_sign = np.sign(max(rings, key=lambda r: abs(r[0]))[0])
    outers = [r[1] for r in rings if np.sign(r[0]) == outer_sign]
    holes = [r[1] for r in rings if np.sign(r[0]) != outer_sign]
    polys: list[list[np.ndarray]] = [[o] for o in outers]
    for hole in holes:
        for poly in polys:
            if MplPath(poly[0]).contains_point(hole[0]):
                poly.append(hole)
                break
    return polys


def rasterize_polygons(
    polygons: list[list[np.ndarray]], shape_hw: tuple[int, int], downsample: float = 1.0
) -> np.ndarray:
    """Rasterise polygons with holes (even-odd) to a bool mask of ``shape_hw`` at ``downsample``."""
    from PIL import Image, ImageDraw

    out = np.zeros(shape_hw, bool)
    for poly in polygons:
        for ring in poly:
            img = Image.new("1", (shape_hw[1], shape_hw[0]), 0)
            pts = [(float(x) / downsample - 0.5, float(y) / downsample - 0.5) for x, y in ring]
            ImageDraw.Draw(img).polygon(pts, fill=1)
            out ^= np.asarray(img, bool)
    return out


def _outside(h: int, w: int, tile_px: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Per tile, how many of its px lie beyond the slide's edge (partial tiles of the last row/column)."""
    in_h = np.minimum(h - np.arange(n_rows) * tile_px, tile_px)
    in_w = np.minimum(w - np.arange(n_cols) * tile_px, tile_px)
    return (tile_px**2 - in_h[:, None] * in_w[None, :]).ravel().astype(float)


def _tile_table(
    cells: pd.DataFrame,
    labels: np.ndarray,
    epi_mask_ds: np.ndarray,
    tumor_ds: np.ndarray,
    w: int,
    h: int,
    tile_px: int,
) -> pd.DataFrame:
    n_rows, n_cols = int(math.ceil(h / tile_px)), int(math.ceil(w / tile_px))
    rr, cc = np.mgrid[0:n_rows, 0:n_cols]
    tab = pd.DataFrame({"row": rr.ravel(), "col": cc.ravel()})
    tab["x"] = tab["col"] * tile_px
    tab["y"] = tab["row"] * tile_px
    tab["size"] = tile_px
    # pixels of each region per tile in one pass (block means of 5 masks were the slowest part of the truth)
    tile_of_px = (np.arange(h) // tile_px)[:, None] * n_cols + (np.arange(w) // tile_px)[None, :]
    region_px = np.bincount((tile_of_px * 5 + labels).ravel(), minlength=n_rows * n_cols * 5)
    region_px = region_px.reshape(n_rows * n_cols, 5).astype(float)
    tab["tissue_fraction"] = (
        tile_px**2 - region_px[:, BACKGROUND] - _outside(h, w, tile_px, n_rows, n_cols)
    ) / tile_px**2
    col = np.floor(cells["x"].to_numpy() / tile_px).astype(np.int64)
    row = np.floor(cells["y"].to_numpy() / tile_px).astype(np.int64)
    idx = row * n_cols + col
    n = n_rows * n_cols
    types = cells["type"].to_numpy()
    for name, sel in (
        ("t_cells", types == "T cell"),
        ("b_cells", types == "B cell"),
        ("tumor_cells", types == "tumor"),
        ("proliferating_cells", (types == "tumor") & cells["proliferating"].to_numpy()),
        ("stromal_cells", types == "stromal"),
    ):
        tab[name] = np.bincount(idx[sel], minlength=n)
    tab["lymphocytes"] = tab["t_cells"] + tab["b_cells"]
    tab["total_cells"] = np.bincount(idx, minlength=n)
    mblock = tile_px // MASK_DOWNSAMPLE
    if tile_px % MASK_DOWNSAMPLE == 0:  # exact: the fraction a reader of the written mask gets
        tab["epithelium_fraction"] = _block_mean(epi_mask_ds, mblock, n_rows, n_cols).ravel()
    else:
        tab["epithelium_fraction"] = region_px[:, EPITHELIUM] / tile_px**2
    tab["tumor_fraction"] = _block_mean(tumor_ds, tile_px // 2, n_rows, n_cols).ravel()
    tab["stroma_fraction"] = region_px[:, STROMA] / tile_px**2
    tab["fat_fraction"] = region_px[:, FAT] / tile_px**2
    tab["follicle_fraction"] = region_px[:, FOLLICLE] / tile_px**2
    for c in (
        "tissue_fraction",
        "epithelium_fraction",
        "tumor_fraction",
        "stroma_fraction",
        "fat_fraction",
        "follicle_fraction",
    ):
        tab[c] = tab[c].astype(float).round(5)
    return tab


def truth_rasters(
    labels: np.ndarray, tumor_score: np.ndarray, cells: pd.DataFrame, w: int, h: int, tile_px: int
) -> tuple[np.ndarray, list[list[np.ndarray]], np.ndarray, pd.DataFrame]:
    """The planted truth of a drawn slide (no randomness).

    Parameters
    ----------
    labels
        (h, w) uint8 region labels of the layout.
    tumor_score
        Layout-grid tumour-bed score (> 0 inside).
    cells
        The drawn nuclei.

    Returns
    -------
    (epithelium_mask, tumor_polygons, tumor_ds, tiles)
        The epithelium mask at :data:`MASK_DOWNSAMPLE` (majority of its 8x8 block), the tumour polygons
        (level-0 px), the tumour mask at downsample 2 and the per-tile truth table.
    """
    mh, mw = int(math.ceil(h / MASK_DOWNSAMPLE)), int(math.ceil(w / MASK_DOWNSAMPLE))
    epi_mask = _block_mean(labels == EPITHELIUM, MASK_DOWNSAMPLE, mh, mw) >= 0.5
    polys = _tumor_polygons(tumor_score, LAYOUT_DS, w, h)
    tumor_ds = rasterize_polygons(polys, (int(math.ceil(h / 2)), int(math.ceil(w / 2))), 2.0)
    tiles = _tile_table(cells, labels, epi_mask, tumor_ds, w, h, tile_px)
    return epi_mask, polys, tumor_ds, tiles


# --- loaders -----------------------------------------------------------------------------------------------


def load_tile_truth(path: str | Path) -> pd.DataFrame:
    """Read a ``<id>_tiles.csv`` truth table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Tile truth table {path} does not exist.")
    tab = pd.read_csv(path)
    missing = {"row", "col", "x", "y", "size", "tissue_fraction"} - set(tab.columns)
    if missing:
        raise DataError(
            f"{path.name} is not a tile truth table (missing columns: {', '.join(sorted(missing))})."
        )
    return tab


def load_cells(path: str | Path) -> pd.DataFrame:
    """Read a ``<id>_cells.csv`` table (x, y level-0 px, type, proliferating, radius_um)."""
    tab = pd.read_csv(path)
    tab["proliferating"] = tab["proliferating"].astype(bool)
    return tab
