"""Heatmaps: per-tile values laid onto the tile grid, their placement in µm, colour limits, and the PNG.

A heatmap is a score column laid back onto the tile grid: one pixel per tile, ``NaN`` off tissue, placed in µm
over the slide layer (:func:`heatmap_transform`). What a map *shows* is finer (:func:`display_raster`):
``f x f`` pixels per tile, so that the tiles of the last row and column stop at the slide's edge instead of
painting past it, and (with a tissue mask, :func:`tissue_cover`) only the tissue inside a tile is painted.
Its colours: :func:`robust_limits` (contrast limits) and :func:`render_heatmap_png` (the PNG over the slide
thumbnail: the percentile within the slide, fading colormap, labelled colour bar, scale bar, warnings; see
:mod:`.map_style`). Plain NumPy and matplotlib (Agg): no Qt, no napari.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..model.mixed import HE2RNA_NAME
from . import map_style

if TYPE_CHECKING:  # only for type hints
    from ..slides.tiling import TileGrid


def heatmap_raster(grid: TileGrid, values: np.ndarray | pd.Series | Sequence[float]) -> np.ndarray:
    """Lay per-tile values back onto the tile grid.

    Parameters
    ----------
    grid
        The tile grid; ``grid.table`` has ``row`` and ``col``.
    values
        (N,) one value per ``grid.table`` row (a Series is taken by position).

    Returns
    -------
    numpy.ndarray
        (grid.n_rows, grid.n_cols) float32: ``raster[row, col]`` is the tile's value, ``NaN`` where there is
        no kept tile (off tissue).
    """
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    table = grid.table
    if len(vals) != len(table):
        raise ValueError(f"{len(vals)} values for a grid of {len(table)} tiles")
    raster = np.full((int(grid.n_rows), int(grid.n_cols)), np.nan, dtype=np.float32)
    raster[table["row"].to_numpy(dtype=np.intp), table["col"].to_numpy(dtype=np.intp)] = vals
    return raster


def heatmap_transform(grid: TileGrid) -> tuple[tuple[float, float], tuple[float, float]]:
    """``scale`` and ``translate`` (µm, (y, x)) of a one-pixel-per-tile heatmap layer.

    napari puts pixel centres on integer data coordinates: level-0 pixel ``i`` of the slide layer
    (``scale = mpp``) is centred at ``i * mpp`` µm, so tile ``c`` (pixels ``c*T ... c*T + T - 1``) is centred
    at ``(c*T + (T - 1)/2) * mpp``. Hence ``scale = T * mpp`` and ``translate = (T - 1)/2 * mpp`` (the grid
    starts at level-0 (0, 0)).

    Returns
    -------
    tuple
        ``((s, s), (t, t))`` with ``s = tile_px * mpp`` and ``t = (tile_px - 1) / 2 * mpp``, in µm.
    """
    s = grid.tile_side_um
    t = (float(grid.tile_px) - 1.0) / 2.0 * float(grid.mpp)
    return (s, s), (t, t)


def display_factor(grid: TileGrid, max_px: int = 2048) -> int:
    """Pixels per tile side of a displayed map: 1 to 8, so that a side stays under ``max_px``."""
    return int(np.clip(max_px // max(int(grid.n_rows), int(grid.n_cols), 1), 1, 8))


def display_transform(grid: TileGrid, f: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``scale`` and ``translate`` (µm, (y, x)) of a map with ``f x f`` pixels per tile
    (:func:`heatmap_transform` at ``f = 1``): pixel ``j`` covers level-0 ``[j*T/f, (j+1)*T/f)``."""
    mpp, tile_px = float(grid.mpp), float(grid.tile_px)
    s = tile_px * mpp / f
    t = (tile_px / f - 1.0) / 2.0 * mpp
    return (s, s), (t, t)


def inside_slide(grid: TileGrid, f: int) -> np.ndarray:
    """(n_rows*f, n_cols*f) bool: the map pixels that lie wholly inside the slide (level-0 bounds).

    At ``f = 1`` (a grid too large for finer maps) a tile is kept when its centre is inside, rather than
    losing the partial tiles of the last row and column.
    """
    width, height = (float(v) for v in grid.slide_dimensions)
    side = float(grid.tile_px) / f
    end = 0.5 if f == 1 else 1.0
    rows = (np.arange(int(grid.n_rows) * f) + end) * side <= height + 1e-6
    cols = (np.arange(int(grid.n_cols) * f) + end) * side <= width + 1e-6
    return rows[:, None] & cols[None, :]


def tissue_cover(grid: TileGrid, mask: np.ndarray, f: int) -> np.ndarray:
    """(n_rows*f, n_cols*f) bool: the map pixels that are mostly tissue in ``mask`` (the whole slide).

    A kept tile none of whose pixels is mostly tissue (a mask other than the tiling's) keeps all of them.
    """
    from ..slides.tiling import tile_fractions

    shape = (int(grid.n_rows) * f, int(grid.n_cols) * f)
    frac = tile_fractions(np.asarray(mask, dtype=bool), grid.slide_dimensions, float(grid.tile_px) / f)
    cover = np.zeros(shape, dtype=bool)
    h, w = min(shape[0], frac.shape[0]), min(shape[1], frac.shape[1])
    cover[:h, :w] = frac[:h, :w] >= 0.5
    blocks = cover.reshape(int(grid.n_rows), f, int(grid.n_cols), f).any(axis=(1, 3))
    rows = grid.table["row"].to_numpy(dtype=np.intp)
    cols = grid.table["col"].to_numpy(dtype=np.intp)
    bare = np.zeros_like(blocks)
    bare[rows, cols] = ~blocks[rows, cols]
    return cover | np.kron(bare, np.ones((f, f), dtype=bool))


def display_raster(
    grid: TileGrid,
    values: np.ndarray | pd.Series | Sequence[float],
    f: int | None = None,
    cover: np.ndarray | None = None,
) -> np.ndarray:
    """A map as displayed: (n_rows*f, n_cols*f) float32, each tile's value on its ``f x f`` pixels, NaN off
    the kept tiles, past the slide's edge (:func:`inside_slide`) and off ``cover`` (:func:`tissue_cover`).

    ``f`` defaults to :func:`display_factor`; place the raster with :func:`display_transform`.
    """
    f = display_factor(grid) if f is None else int(f)
    raster = heatmap_raster(grid, values)
    if f > 1:
        raster = np.repeat(np.repeat(raster, f, axis=0), f, axis=1)
    keep = inside_slide(grid, f)
    if cover is not None and cover.shape == keep.shape:
        keep &= cover
    raster[~keep] = np.nan
    return raster


def tile_values(raster: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(N,) the value each kept tile has on a :func:`display_raster` (NaN where none of it is shown)."""
    f = int(raster.shape[0]) // int(grid.n_rows)
    blocks = np.asarray(raster, dtype=np.float32).reshape(int(grid.n_rows), f, int(grid.n_cols), f)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        per_tile = np.nanmax(blocks, axis=(1, 3))
    return per_tile[grid.table["row"].to_numpy(dtype=np.intp), grid.table["col"].to_numpy(dtype=np.intp)]


def robust_limits(
    values: np.ndarray | pd.Series | Sequence[float], percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """Contrast limits from robust percentiles of the finite values.

    Returns
    -------
    tuple
        ``(low, high)`` with ``low < high`` always (napari refuses equal limits): a constant map gets
        ``(v - 0.5, v + 0.5)``, an empty/all-NaN one ``(0, 1)``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, percentiles))
    if not hi > lo:
        return lo - 0.5, lo + 0.5
    return lo, hi


def _nice_length(target: float) -> float:
    """The largest 1/2/5 x 10^k not above ``target`` (> 0)."""
    if target <= 0:
        return 1.0
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return float(m * 10**exp)
    return float(10**exp)


def _length_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def render_heatmap_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float | tuple[float, float],
    grid: TileGrid,
    values: np.ndarray | pd.Series,
    name: str,
    cmap: str = map_style.SCORE_COLORMAP,
    alpha: float = 0.85,
    slide_name: str | None = None,
    demo: bool = False,
    limits: tuple[float, float] | None = None,
    dpi: int = 100,
    overwrite: bool = False,
    warning: str | None = None,
    units: str | None = None,
    *,
    relative: bool = True,
    members: Sequence[str] | None = None,
    prediction: float | None = None,
    prediction_units: str | None = None,
    prediction_note: str = "",
    model: str | None = None,
    threshold: float | None = None,
    fade: float | None = None,
    cover: np.ndarray | None = None,
    outside: bool | None = None,
) -> Path:
    """Render a heatmap over the slide thumbnail to PNG (matplotlib Agg, no GUI).

    Parameters
    ----------
    path
        Destination ``.png``.
    thumbnail
        (h, w, 3) uint8 image of the whole slide.
    thumb_downsample
        Level-0 pixels per thumbnail pixel (a number, or (x, y) factors).
    grid
        The tile grid (level-0 px, ``mpp`` µm/px).
    values
        (N,) per-tile values aligned with ``grid.table`` rows: tile scores (painted as their percentile within
        the slide when ``relative``) or the feature distance (``relative=False``, painted as is).
    name
        Gene or set name (title and colour-bar label).
    cmap, alpha
        Perceptual colormap (its low end fades out, ``fade``) and the heatmap's opacity over the tissue.
    slide_name
        Shown in the title (``"<name> — <slide_name>"``, which :mod:`.output_set` reads back).
    demo
        Add the "DEMO model trained on synthetic slides" warning in a corner.
    limits
        Colour limits; default 0-100 for percentiles, else :func:`robust_limits` (1st-99th percentile).
    warning
        The slide is outside the model's training data (:mod:`napari_he2rna.model.ood`): this sentence is
        drawn in red under the picture (and kept in the PNG's ``Warning`` text chunk), the map is grey and
        hatched and the colour bar says "NOT A PREDICTION".
    units
        What the painted values are in; default :data:`.map_style.PERCENTILE_UNITS` when ``relative``.
    members
        A gene set's genes: the subtitle says the map is their mean.
    prediction, prediction_units, prediction_note
        The slide-level prediction (the model's aggregate, in the target's unit), said in the subtitle.
    model
        Which model made the map (:func:`napari_he2rna.model.mixed.model_of_genes`); the subtitle
        names it unless it is HE2RNA alone (``--model-type auto`` bundles).
    threshold
        The feature distance's training threshold: a white line on the colour bar (and the colormap).
    fade
        See :func:`.map_style.heatmap_fade` (its default).
    cover
        Tissue pixels of the map (:func:`tissue_cover` at :func:`display_factor`); the map is painted there.
    outside
        Grey, hatched and "NOT A PREDICTION" (default: when there is a ``warning``); ``False`` keeps the
        colours of a map that is measured rather than predicted (the feature distance) under a warning.

    The picture is in µm: the thumbnail and the heatmap share one extent, a scale bar gives µm/mm; tiles are
    clipped to the slide's bounds (:func:`display_raster`). The legend's text is also kept in the PNG's
    ``Description`` text chunk.
    """
    import textwrap

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from .exports import atomic_write  # exports imports this module

    thumb = np.asarray(thumbnail)
    if np.ndim(thumb_downsample) == 0:
        dsx = dsy = float(thumb_downsample)
    else:
        dsx, dsy = (float(v) for v in thumb_downsample)
    mpp = float(grid.mpp)
    h, w = thumb.shape[:2]
    width_um, height_um = w * dsx * mpp, h * dsy * mpp
    shown = map_style.percentile_within(values) if relative else np.asarray(values, dtype=np.float32)
    if units is None:
        units = map_style.PERCENTILE_UNITS if relative else ""
    f = display_factor(grid)
    raster = display_raster(grid, shown, f, cover)
    tile_um = grid.tile_side_um
    if limits is not None:
        lo, hi = limits
    else:
        lo, hi = (0.0, 100.0) if relative else robust_limits(shown)
    outside = bool(warning) if outside is None else bool(outside)
    band = None
    if threshold is not None and math.isfinite(threshold) and hi > lo:
        band = (float(threshold) - lo) / (hi - lo)
    fade = map_style.heatmap_fade() if fade is None else float(fade)
    base = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))
    colormap = ListedColormap(map_style.styled_colors(base, fade, grey=outside, band=band)).with_extremes(
        bad=(0, 0, 0, 0)
    )

    fig = Figure(figsize=(8, 8 * max(min(height_um / max(width_um, 1e-9), 2.0), 0.4) + 0.9), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumb, extent=(0, width_um, height_um, 0), interpolation="antialiased")
    extent = (0, grid.n_cols * tile_um, grid.n_rows * tile_um, 0)
    im = ax.imshow(
        np.ma.masked_invalid(raster),
        cmap=colormap,
        vmin=lo,
        vmax=hi,
        alpha=alpha,
        interpolation="nearest",
        extent=extent,
    )
    if outside:  # hatched: these colours are not predictions
        ax.add_patch(
            Rectangle(
                (0, 0), width_um, height_um, fill=False, hatch="//", edgecolor=(0.55, 0.0, 0.0, 0.5), lw=0
            )
        )
    ax.set_xlim(0, width_um)
    ax.set_ylim(height_um, 0)
    ax.set_axis_off()
    title = f"{name} — {slide_name}" if slide_name else name
    sub = []
    if members:
        sub.append(f"mean of its genes {map_style.listed_genes(members)}")
    if prediction is not None and math.isfinite(prediction):
        unit = f" {map_style.plain_unit(prediction_units)}" if prediction_units else ""
        sub.append(f"slide prediction {map_style.number(prediction)}{unit}{prediction_note}")
    if model and model != HE2RNA_NAME:  # --model-type auto: say when the map is not HE2RNA's alone
        sub.append(f"model: {model}")
    heading = title + ("\n" + textwrap.fill(" · ".join(sub), width=90) if sub else "")
    ax.set_title(heading, fontsize=11)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    label = f"{name}: {units}"
    if outside:
        label = "NOT A PREDICTION (outside training data)\n" + label
    wrapped = "\n".join(textwrap.fill(part, width=60) for part in label.split("\n"))
    cbar.set_label(wrapped, fontsize=9, color="darkred" if outside else "black")
    if band is not None and 0.0 <= band <= 1.0:  # the training threshold: a white line and its own tick
        thr = float(threshold)
        cbar.ax.axhline(thr, color="black", lw=3)
        cbar.ax.axhline(thr, color="white", lw=1.5)
        ticks = [t for t in cbar.get_ticks() if lo <= t <= hi and abs(t - thr) > 0.08 * (hi - lo)]
        cbar.set_ticks([*ticks, thr])
        cbar.set_ticklabels([f"{t:g}" for t in ticks] + [f"{thr:.3g} tile threshold (training)"])
    bar_um = _nice_length(width_um / 5)
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            bar_um,
            _length_label(bar_um),
            "lower left",
            pad=0.4,
            borderpad=0.6,
            sep=4,
            color="black",
            frameon=True,
            size_vertical=max(height_um / 150, 1e-9),
        )
    )
    notes = [("right", "DEMO model trained on synthetic slides", {"fontsize": 9})] if demo else []
    if outside:
        text = "OUTSIDE THE MODEL'S TRAINING DATA:\nthese colours are not predictions"
        notes.append(("left", text, {"fontsize": 10, "fontweight": "bold"}))
    for side, text, style in notes:  # red boxes in the picture's top corners
        ax.text(
            0.99 if side == "right" else 0.01,
            0.99,
            text,
            transform=ax.transAxes,
            ha=side,
            va="top",
            color="darkred",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "darkred"},
            **style,
        )
    fig.tight_layout()
    meta = {
        "Title": title,
        "Description": map_style.legend_label(
            name,
            units,
            members=members,
            prediction=prediction,
            prediction_units=prediction_units,
            prediction_note=prediction_note,
            threshold=threshold,
            outside=outside,
        ),
    }
    if warning:
        text = "WARNING: " + warning
        fig.text(
            0.5,
            0.0,
            textwrap.fill(text, width=95),
            ha="center",
            va="top",
            fontsize=9,
            color="darkred",
            bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "darkred"},
        )
        meta["Warning"] = text
    return atomic_write(
        path,
        lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=meta),
        overwrite,
    )
