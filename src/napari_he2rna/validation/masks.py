"""Segmentation masks as ground truth: reading, where a mask lies on the slide, and fractions per tile.

A mask covers the whole slide from its top-left corner at any resolution: it is scaled to the slide by size
or by its own µm/px (:func:`mask_geometry`); a mask of another shape raises
:class:`~napari_he2rna.errors.DataError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .geojson import check_file
from .grid import tile_index
from .transform import Alignment

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
    check_file(path, "mask")
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
        (:class:`napari_he2rna.validation.comparison.Comparison`); it replaces ``mask_downsample``,
        ``mask_mpp`` and
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
    rows, cols = tile_index(grid)
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
    rows, cols = tile_index(grid)
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
    rows, cols = tile_index(grid)
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
