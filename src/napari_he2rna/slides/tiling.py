"""Tissue detection and the tile grid: which 112 µm squares of a slide hold tissue, and their pixels.

A tile is a row of :attr:`TileGrid.table`; features, scores and ground truth are arrays aligned to those rows.
Coordinates are level-0 pixels; tile ``(row, col)`` covers x in ``[col*tile_px, (col+1)*tile_px)``, y
likewise, so the grid starts at the slide's origin and the last row/column may cross the slide border (those
edge tiles are kept when the part inside the slide holds enough tissue, and read padded with white).

A tile size is given in µm (the paper's 112 µm) or in pixels at a magnification (SEQUOIA's 256 px at 20x):
:func:`tile_side_px` is the rule that turns the latter into level-0 pixels of a given slide.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from ..errors import He2rnaWarning, TileSizeError, TissueError
from .ink import INK_METHOD, channel_max, channel_min, ink_mask, optical_density, pen_mask

__all__ = [
    "TileGrid",
    "tissue_mask",
    "tissue_and_ink_masks",
    "slide_masks",
    "SlideMasks",
    "mask_size_for",
    "mask_method",
    "pen_mask",
    "tile_grid",
    "check_tile_size",
    "tile_side_px",
    "slide_magnification",
    "MagnificationWarning",
    "STANDARD_MAGNIFICATIONS",
    "read_tile",
    "read_tiles",
]

# Saturation below this is glass whatever Otsu says: a blank or almost-white image has no tissue, and Otsu on
# pure noise would otherwise split the noise in two.
MIN_SATURATION = 0.06
# Saturation above this counts as surely coloured when Otsu picks its threshold (glass ~0.02, H&E ~0.15-0.4).
SATURATION_CAP = 0.3
# Optical density (natural log) below this on every channel is white: glass, fat vacuoles, background.
MIN_OPTICAL_DENSITY = 0.04

GRID_COLUMNS = ["tile_id", "row", "col", "x", "y", "size", "tissue_fraction"]
# A tile is at least this many pixels a side (smaller holds no tissue structure to describe) ...
MIN_TILE_PX = 8
# ... and its side, in µm, within what a tiling of tissue can mean (a cell, 10 µm, to a 1 cm field).
PLAUSIBLE_TILE_UM = (10.0, 10_000.0)


def check_tile_size(
    tile_um: float, mpp: float | None = None, dimensions: Sequence[int] | None = None
) -> int | None:
    """The tile side in level-0 pixels, or :class:`~.errors.TileSizeError` when the size is not plausible.

    Without ``mpp`` only the µm range (:data:`PLAUSIBLE_TILE_UM`) is checked and None returned; with it the
    tile must also be at least :data:`MIN_TILE_PX` pixels and, with ``dimensions`` (the slide's level-0
    width, height), no larger than the slide.
    """
    lo, hi = PLAUSIBLE_TILE_UM
    if mpp is not None:
        lo = max(lo, MIN_TILE_PX * float(mpp))
        if dimensions is not None:
            hi = min(hi, min(int(v) for v in dimensions) * float(mpp))
    try:
        value = float(tile_um)
    except (TypeError, ValueError):
        value = math.nan
    shown = f"{value:g}" if math.isfinite(value) else repr(tile_um)
    where = f" for this slide ({mpp:g} µm/px, {MIN_TILE_PX} px to the slide's shorter side)" if mpp else ""
    if not (math.isfinite(value) and lo <= value <= hi):
        if lo > hi:
            raise TileSizeError(
                f"The tile size {shown} µm cannot be used: the slide is smaller than the smallest "
                f"plausible tile ({lo:g} µm)."
            )
        raise TileSizeError(
            f"The tile size {shown} µm is not plausible: give one between {lo:g} and {hi:g} µm{where}."
        )
    return None if mpp is None else max(int(round(value / float(mpp))), 1)


#: The objective powers a magnification estimated from a pixel size is rounded to.
STANDARD_MAGNIFICATIONS = (5.0, 10.0, 20.0, 40.0, 60.0, 80.0)
#: µm per pixel at 1x, nominally (a 20x scan is about 0.5 µm/px): magnification ≈ this / mpp.
UM_PER_PX_AT_1X = 10.0


class MagnificationWarning(He2rnaWarning):
    """A slide does not state its objective power: its magnification was estimated from its pixel size."""


def slide_magnification(slide) -> tuple[float, str]:
    """The magnification of a slide's level 0 and where it comes from.

    The objective power the file states (``slide.objective_power``, e.g. Aperio's ``AppMag``), else
    ``10 / mpp`` rounded to the nearest of :data:`STANDARD_MAGNIFICATIONS` (nearest as a ratio: 0.25 µm/px
    is 40x, 0.5 is 20x, 0.2527 is 40x).

    Returns
    -------
    (magnification, source)
        ``source`` is ``"objective power"`` or ``"pixel size"``.

    Raises
    ------
    MissingMPPError
        The slide states neither its objective power nor its pixel size.
    """
    power = getattr(slide, "objective_power", None)
    if power is not None and math.isfinite(float(power)) and float(power) > 0:
        return float(power), "objective power"
    estimate = UM_PER_PX_AT_1X / float(slide.require_mpp())
    nearest = min(STANDARD_MAGNIFICATIONS, key=lambda m: abs(math.log(estimate / m)))
    return nearest, "pixel size"


def tile_side_px(slide, tile_px: int, magnification: float, *, warn: bool = True) -> int:
    """THE tile size rule for a tile given in pixels at a magnification: its side in level-0 pixels.

    A tile of ``tile_px`` pixels at ``magnification`` covers ``tile_px * M / magnification`` level-0 pixels
    of a slide whose level 0 is at magnification ``M`` (:func:`slide_magnification`): 256 px at 20x is 512
    level-0 px on a 40x slide (read there and downsampled to 256 px) and 256 on a 20x slide. Its side in
    µm is that times the slide's mpp. When ``M`` had to be estimated from the pixel size, a
    :class:`MagnificationWarning` says so (unless ``warn`` is False).

    Parameters
    ----------
    slide : Slide
        An open slide (its objective power, else its pixel size, gives ``M``).
    tile_px : int
        The tile side in pixels at ``magnification`` (e.g. 256).
    magnification : float
        The magnification ``tile_px`` is counted at (e.g. 20).

    Returns
    -------
    int
        The tile side in level-0 pixels (at least 1).
    """
    if int(tile_px) < 1 or not float(magnification) > 0:
        raise TileSizeError(f"A tile of {tile_px} px at {magnification}x is not a tile size.")
    power, source = slide_magnification(slide)
    side = max(int(round(int(tile_px) * power / float(magnification))), 1)
    if warn and source != "objective power":
        name = Path(str(getattr(slide, "path", "the slide"))).name
        warnings.warn(
            f"{name} does not state its objective power: taken as {power:g}x from its pixel size "
            f"({float(slide.require_mpp()):.4g} µm/px), so a tile of {int(tile_px)} px at "
            f"{float(magnification):g}x is {side} level-0 px.",
            MagnificationWarning,
            stacklevel=2,
        )
    return side


def mask_method(remove_ink: bool = True) -> str:
    """The name of the tissue-mask rule, for the provenance of what is computed from its tiles.

    Parameters
    ----------
    remove_ink : bool
        Whether marker-pen ink and its halo are removed from the mask (:func:`~.ink.ink_mask`).

    Returns
    -------
    str, e.g. ``"otsu-saturation+ink-v1"``; it changes whenever the rule does.
    """
    return f"otsu-saturation+{INK_METHOD}" if remove_ink else "otsu-saturation"


def _composite_rgb(image: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) -> (h, w, 3) uint8, RGBA composited on white."""
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (h, w, 3) RGB image, got shape {rgb.shape}")
    if rgb.shape[-1] == 4:
        alpha = rgb[..., 3:4].astype(np.float32) / 255.0
        rgb = (rgb[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return rgb.astype(np.uint8, copy=False)


def tissue_and_ink_masks(
    thumbnail: np.ndarray, min_object_fraction: float = 2e-4, remove_ink: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue pixels of a low-resolution image of a slide, and the marker-pen ink removed from them.

    Glass is bright and grey, H&E-stained tissue is coloured: Otsu (scikit-image) splits the HSV saturation
    of the non-ink pixels in two. Ink is excluded: with ``remove_ink`` the dense ink and its lighter halo
    (:func:`~.ink.ink_mask`), else only the dense ink (:func:`~.ink.pen_mask`). Specks smaller than
    ``min_object_fraction`` of the image are then removed and holes of that size filled (a hole left by ink
    is not filled back unless it is that small).

    Parameters
    ----------
    thumbnail : (h, w, 3) or (h, w, 4) uint8
        The whole slide at low resolution (RGBA is composited on white).
    min_object_fraction : float
        Smallest tissue piece (and largest hole filled), as a fraction of the image area.
    remove_ink : bool
        Remove the halo of pen marks too, not only their dense ink.

    Returns
    -------
    tissue : (h, w) bool
        True on tissue.
    ink : (h, w) bool
        True on the ink excluded from the tissue (for display: the mark and its halo).
    """
    rgb = _composite_rgb(thumbnail)
    channels = rgb.astype(np.float32)
    cmax, cmin = channel_max(channels), channel_min(channels)
    saturation = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1.0), 0.0)
    dark = channel_max(optical_density(rgb)) > MIN_OPTICAL_DENSITY
    ink = ink_mask(rgb, min_object_fraction) if remove_ink else pen_mask(rgb)
    candidates = saturation[~ink]
    if candidates.size == 0 or np.ptp(candidates) == 0:
        return np.zeros(rgb.shape[:2], dtype=bool), ink
    # Capping keeps strongly coloured ink and dense stain from pulling the threshold into the tissue.
    threshold = max(float(threshold_otsu(np.minimum(candidates, SATURATION_CAP))), MIN_SATURATION)
    mask = (saturation > threshold) & dark & ~ink
    min_size = max(int(min_object_fraction * mask.size), 1)
    mask = remove_small_objects(mask, max_size=min_size)
    mask = remove_small_holes(mask, max_size=min_size)
    if remove_ink:  # a small hole left by ink stays a hole: the tissue under ink is not seen
        mask &= ~ink
    return mask, ink


def tissue_mask(
    thumbnail: np.ndarray, min_object_fraction: float = 2e-4, remove_ink: bool = True
) -> np.ndarray:
    """Tissue pixels of a low-resolution image of a slide (True on tissue, (h, w) bool).

    The first mask of :func:`tissue_and_ink_masks`, which documents the rule and the parameters.
    """
    return tissue_and_ink_masks(thumbnail, min_object_fraction, remove_ink)[0]


@dataclass
class TileGrid:
    """The tissue tiles of a slide.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per kept tile, sorted by ``tile_id`` (= ``row * n_cols + col``): ``tile_id``, ``row``,
        ``col``, ``x``, ``y`` (level-0 px, top-left), ``size`` (level-0 px), ``tissue_fraction`` (0–1, over
        the part of the tile inside the slide).
    tile_px : int
        Tile side in level-0 pixels (``round(tile_um / mpp)``).
    tile_um : float
        The tile side asked for, in µm (the model's); the actual side is :attr:`tile_side_um`.
    mpp : float
        µm per level-0 pixel.
    n_rows, n_cols : int
        The full grid covering the slide from (0, 0).
    slide_dimensions : (int, int)
        Level-0 (width, height) of the slide.
    """

    table: pd.DataFrame
    tile_px: int
    tile_um: float
    mpp: float
    n_rows: int
    n_cols: int
    slide_dimensions: tuple[int, int]

    def __len__(self) -> int:
        return len(self.table)

    @property
    def tile_side_um(self) -> float:
        """The actual tile side in µm, ``tile_px * mpp`` (may differ slightly from the asked ``tile_um``)."""
        return float(self.tile_px) * float(self.mpp)

    @classmethod
    def from_table(
        cls,
        table: pd.DataFrame,
        mpp: float,
        *,
        tile_px: int | None = None,
        slide_dimensions: tuple[int, int] | None = None,
        tile_um: float | None = None,
    ) -> TileGrid:
        """The grid of a tile table: the grid's own columns or the exported tile table's.

        Parameters
        ----------
        table
            One row per tile with ``tile_id``, ``row``, ``col`` and either ``x``, ``y`` (and ``size``) or
            the export's ``x_px``, ``y_px`` (and ``size_px``), level-0 px; ``tissue_fraction`` if known
            (else NaN). Other columns (scores) are left out of :attr:`table`.
        mpp
            µm per level-0 px.
        tile_px
            Tile side in level-0 px; default: the most common ``size``/``size_px``, else the spacing of the
            tiles' positions (``x = col * tile_px``).
        slide_dimensions
            (width, height) level-0 px; default: the extent of the tiles.
        tile_um
            The tile size asked for; default: the actual side ``tile_px * mpp``.

        Raises
        ------
        ValueError
            The table lacks the position columns, or the tile size cannot be known (no ``size`` column, no
            ``tile_px`` and a single tile at the origin).
        """
        x_col = "x_px" if "x_px" in table.columns else "x"
        y_col = "y_px" if "y_px" in table.columns else "y"
        size_col = "size_px" if "size_px" in table.columns else "size"
        missing = [c for c in ("tile_id", "row", "col", x_col, y_col) if c not in table.columns]
        if missing:
            raise ValueError(f"the tile table lacks the column(s) {', '.join(missing)}")
        has_size = size_col in table.columns
        rows, cols = table["row"].to_numpy(np.int64), table["col"].to_numpy(np.int64)
        if tile_px is None and has_size:
            tile_px = int(round(float(table[size_col].mode().iloc[0])))
        if tile_px is None:  # e.g. the tile CSV of earlier ``he2rna predict``: x = col * tile_px
            steps = np.r_[
                table[x_col].to_numpy(float)[cols > 0] / cols[cols > 0],
                table[y_col].to_numpy(float)[rows > 0] / rows[rows > 0],
            ]
            if not steps.size:
                raise ValueError("the tile table does not give the tile size (no size_px/size column)")
            tile_px = int(round(float(np.median(steps))))
        tile_px = int(tile_px)
        if slide_dimensions is None:
            slide_dimensions = (int((cols.max() + 1) * tile_px), int((rows.max() + 1) * tile_px))
        w, h = (int(v) for v in slide_dimensions)
        n_rows = max(int(math.ceil(h / tile_px)), int(rows.max()) + 1)
        n_cols = max(int(math.ceil(w / tile_px)), int(cols.max()) + 1)
        grid_table = pd.DataFrame(
            {
                "tile_id": table["tile_id"].to_numpy(),
                "row": rows,
                "col": cols,
                "x": table[x_col].to_numpy(np.int64),
                "y": table[y_col].to_numpy(np.int64),
                "size": table[size_col].to_numpy(np.int64) if has_size else tile_px,
                "tissue_fraction": (
                    table["tissue_fraction"].to_numpy() if "tissue_fraction" in table else np.nan
                ),
            }
        )
        side = tile_px * float(mpp)
        tile_um = side if tile_um is None else float(tile_um)
        return cls(grid_table, tile_px, tile_um, float(mpp), n_rows, n_cols, (w, h))

    def centers(self) -> np.ndarray:
        """(N, 2) float64 tile centres (x, y) in level-0 pixels."""
        half = self.tile_px / 2.0
        return self.table[["x", "y"]].to_numpy(dtype=np.float64) + half


def mask_size_for(dimensions: tuple[int, int], tile_px: int) -> int:
    """Thumbnail side giving ~16 mask pixels per tile side (tissue fraction in 1/256 steps), 1–4k px."""
    n_tiles_long_side = max(dimensions) / tile_px
    return int(min(max(16 * n_tiles_long_side, 1024), 4096))


@dataclass
class SlideMasks:
    """The tissue mask a slide's tiles are cut from, and the pen ink removed from it, for display.

    ``tissue`` and ``ink`` are ``(h, w)`` bool over the whole slide; ``scale`` is the (y, x) size of one mask
    pixel in µm (None when the slide has no pixel size: then in level-0 pixels, ``pixel_scale``).
    """

    tissue: np.ndarray
    ink: np.ndarray
    pixel_scale: tuple[float, float]
    scale: tuple[float, float] | None


def slide_masks(slide, tile_um: float = 112.0) -> SlideMasks:
    """The tissue and ink masks of ``slide`` at the resolution :func:`tile_grid` computes them at."""
    mpp = slide.mpp
    tile_px = max(int(round(tile_um / mpp)), 1) if mpp else 224
    thumb = slide.thumbnail(mask_size_for(slide.dimensions, tile_px))
    tissue, ink = tissue_and_ink_masks(thumb)
    w, h = slide.dimensions
    pixel_scale = (h / tissue.shape[0], w / tissue.shape[1])
    scale = (pixel_scale[0] * mpp, pixel_scale[1] * mpp) if mpp else None
    return SlideMasks(tissue=tissue, ink=ink, pixel_scale=pixel_scale, scale=scale)


def tile_fractions(mask: np.ndarray, dimensions: tuple[int, int], tile_px: int) -> np.ndarray:
    """Tissue fraction of every tile of the full grid from a mask of the whole slide.

    Each mask pixel is assigned to the tile holding its centre (in level-0 pixels); a tile's fraction is the
    share of tissue among the mask pixels inside the slide that fall in it (0 for a tile with none).

    Parameters
    ----------
    mask : (h, w) bool
        Tissue mask of the whole slide at any resolution.
    dimensions : (int, int)
        Level-0 (width, height).
    tile_px : int
        Tile side in level-0 pixels.

    Returns
    -------
    (n_rows, n_cols) float64
    """
    width, height = dimensions
    n_cols, n_rows = math.ceil(width / tile_px), math.ceil(height / tile_px)
    h, w = mask.shape
    # Mask pixel centres in level-0 px -> tile indices (exact float scale; the thumbnail may round its size).
    cols = np.minimum(((np.arange(w) + 0.5) * (width / w) // tile_px).astype(np.int64), n_cols - 1)
    rows = np.minimum(((np.arange(h) + 0.5) * (height / h) // tile_px).astype(np.int64), n_rows - 1)
    flat = (rows[:, None] * n_cols + cols[None, :]).ravel()
    counts = np.bincount(flat, minlength=n_rows * n_cols)
    tissue = np.bincount(flat, weights=mask.ravel().astype(np.float64), minlength=n_rows * n_cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(counts > 0, tissue / np.maximum(counts, 1), 0.0)
    return fractions.reshape(n_rows, n_cols)


def tile_grid(
    slide,
    tile_um: float = 112.0,
    min_tissue: float = 0.5,
    max_tiles: int | None = 8000,
    seed: int = 0,
    mask: np.ndarray | None = None,
    remove_ink: bool = True,
) -> TileGrid:
    """The grid of ``tile_um`` squares over a slide and the tiles that hold tissue.

    Parameters
    ----------
    slide : Slide
        An open slide (:func:`napari_he2rna.slides.slide.open_slide`) with a known pixel size.
    tile_um : float
        Tile side in µm (112 µm = 224 px at 0.5 µm/px, the paper's tiles). A tile given in pixels at a
        magnification is :func:`tile_side_px` level-0 px, i.e. that times the slide's mpp in µm
        (:meth:`~napari_he2rna.features.extraction.ExtractOptions.for_slide` converts it).
    min_tissue : float
        Smallest tissue fraction (0–1) of a kept tile, measured over the part of the tile inside the slide.
    max_tiles : int or None
        At most this many tiles; when more hold tissue, this many are drawn at random (reproducibly, from
        ``seed``) and kept in grid order.
    seed : int
        Seed of that draw.
    mask : (h, w) bool, optional
        A tissue mask of the whole slide to use instead of :func:`tissue_mask` on a thumbnail.
    remove_ink : bool
        Remove marker-pen ink and its halo from the thumbnail's mask (:func:`tissue_mask`); ignored with
        ``mask``. Record :func:`mask_method` with anything computed from the tiles.

    Returns
    -------
    TileGrid

    Raises
    ------
    MissingMPPError
        The slide does not know its pixel size.
    TissueError
        No tile holds enough tissue.
    """
    mpp = float(slide.require_mpp())
    dimensions = tuple(int(v) for v in slide.dimensions)
    tile_px = check_tile_size(tile_um, mpp, dimensions)
    if mask is None:
        mask = tissue_mask(slide.thumbnail(mask_size_for(dimensions, tile_px)), remove_ink=remove_ink)
    fractions = tile_fractions(np.asarray(mask, dtype=bool), dimensions, tile_px)
    n_rows, n_cols = fractions.shape
    rows, cols = np.nonzero((fractions >= min_tissue) & (fractions > 0))
    if rows.size == 0:
        raise TissueError(
            f"no tissue found on {getattr(slide, 'path', 'the slide')}: no {tile_um:g} µm tile is at least "
            f"{min_tissue:.0%} tissue (is it an H&E slide, and is its pixel size right?)."
        )
    if max_tiles is not None and rows.size > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(rows.size, size=max_tiles, replace=False))
        rows, cols = rows[keep], cols[keep]
    table = pd.DataFrame(
        {
            "tile_id": (rows * n_cols + cols).astype(np.int64),
            "row": rows.astype(np.int64),
            "col": cols.astype(np.int64),
            "x": (cols * tile_px).astype(np.int64),
            "y": (rows * tile_px).astype(np.int64),
            "size": np.full(rows.size, tile_px, dtype=np.int64),
            "tissue_fraction": fractions[rows, cols].astype(np.float64),
        }
    )
    return TileGrid(
        table=table,
        tile_px=tile_px,
        tile_um=float(tile_um),
        mpp=mpp,
        n_rows=n_rows,
        n_cols=n_cols,
        slide_dimensions=dimensions,
    )


def read_tile(slide, grid: TileGrid, i: int, out_px: int = 224) -> np.ndarray:
    """The pixels of tile ``i`` (a row of ``grid.table``), resized to ``out_px`` square.

    Read from the most downsampled level that is still at least as fine as the output (so a 40x scan is
    read at 20x when it has such a level), resized with antialiasing (PIL's bilinear filter widens its
    support when shrinking); the part of an edge tile outside the slide is white.

    Parameters
    ----------
    slide : Slide
    grid : TileGrid
    i : int
        Row index (position) in ``grid.table``, not the ``tile_id``.
    out_px : int
        Output side in pixels.

    Returns
    -------
    (out_px, out_px, 3) uint8
    """
    x, y = (int(v) for v in grid.table[["x", "y"]].iloc[i])
    return read_tile_at(slide, x, y, grid.tile_px, out_px)


def read_tile_at(slide, x: int, y: int, tile_px: int, out_px: int = 224) -> np.ndarray:
    """The level-0 square ``[x, x+tile_px) x [y, y+tile_px)`` as (out_px, out_px, 3) uint8, white outside."""
    level = slide.get_best_level_for_downsample(tile_px / out_px)  # never upsample
    ds = float(slide.level_downsamples[level])
    width, height = slide.dimensions
    side = max(int(round(tile_px / ds)), 1)  # the tile's side at that level
    # Only the part inside the slide is read (some readers do not pad); the rest stays white.
    inside_w = min(x + tile_px, width) - x
    inside_h = min(y + tile_px, height) - y
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    if inside_w > 0 and inside_h > 0:
        read_w = min(max(int(math.ceil(inside_w / ds)), 1), side)
        read_h = min(max(int(math.ceil(inside_h / ds)), 1), side)
        region = np.asarray(slide.read_region((x, y), level, (read_w, read_h)))[..., :3]
        canvas[:read_h, :read_w] = region[:read_h, :read_w]
    if side == out_px:
        return canvas
    return np.asarray(Image.fromarray(canvas).resize((out_px, out_px), Image.Resampling.BILINEAR))


def read_tiles(
    slide,
    grid: TileGrid,
    indices: Sequence[int] | np.ndarray | None = None,
    out_px: int = 224,
    num_workers: int = 2,
) -> np.ndarray:
    """Many tiles at once, read in a thread pool (OpenSlide releases the GIL while decoding).

    Parameters
    ----------
    slide : Slide
    grid : TileGrid
    indices : sequence of int, optional
        Row positions in ``grid.table``; all rows when omitted.
    out_px : int
    num_workers : int
        Reader threads (1 reads in the calling thread).

    Returns
    -------
    (len(indices), out_px, out_px, 3) uint8
    """
    if indices is None:
        indices = range(len(grid.table))
    xs = grid.table["x"].to_numpy()
    ys = grid.table["y"].to_numpy()
    idx = [int(i) for i in indices]
    out = np.empty((len(idx), out_px, out_px, 3), dtype=np.uint8)

    def one(k: int) -> None:
        out[k] = read_tile_at(slide, int(xs[idx[k]]), int(ys[idx[k]]), grid.tile_px, out_px)

    if num_workers <= 1 or len(idx) <= 1:
        for k in range(len(idx)):
            one(k)
    else:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(one, range(len(idx))))
    return out
