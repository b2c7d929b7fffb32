"""Synthetic consecutive sections, for tests and benchmarks: an H&E image restained as an IHC and moved
by a known affine (:func:`synthetic_pair`), with matched landmarks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .align_image import tissue_od_mask


def restain_as_ihc(rgb: np.ndarray, seed: int = 0, dab: float = 1.0) -> np.ndarray:
    """An H&E image re-coloured as a DAB/haematoxylin IHC of the same tissue (for synthetic pairs).

    The haematoxylin is kept (a little paler, as an IHC counterstain), the eosin dropped, and DAB added on a
    random half of the eosin-rich tissue (smooth blobs ~ 1/20 of the image), so the IHC shares the nuclei but
    not the colours; a mild blur and noise stand for the other scan.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 H&E image.
    seed
        Seed of the DAB pattern and the noise.
    dab
        Strength of the DAB (optical density scale).

    Returns
    -------
    numpy.ndarray
        (h, w, 3) uint8 IHC-like image.
    """
    from skimage.color import combine_stains, rgb2hed, rgb_from_hed
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    hed = rgb2hed(np.asarray(rgb)[..., :3])
    h, w = hed.shape[:2]
    blobs = gaussian(rng.normal(size=(h, w)), max(h, w) / 40)
    positive = blobs > np.median(blobs)
    eosin = np.maximum(gaussian(hed[..., 1], 2.0), 0)
    out = np.zeros_like(hed)
    out[..., 0] = 0.8 * np.maximum(hed[..., 0], 0)
    out[..., 2] = dab * 2.0 * eosin * positive
    # the IHC's haematoxylin is another batch: a bluer hue than the H&E's (Ruifrok's is 0.65, 0.70, 0.29)
    stains = np.array(rgb_from_hed, dtype=float)
    stains[0] = np.array([0.55, 0.72, 0.42]) / np.linalg.norm([0.55, 0.72, 0.42])
    ihc = combine_stains(out, stains)
    ihc = gaussian(ihc, 0.7, channel_axis=-1) + rng.normal(scale=0.015, size=ihc.shape)
    return (np.clip(ihc, 0, 1) * 255).round().astype(np.uint8)


def warp_image(rgb: np.ndarray, affine_px: Any, shape: tuple[int, int], background: int = 255) -> np.ndarray:
    """The moving image of a known transform: moving pixel ``p`` shows ``rgb`` at ``affine_px @ p``.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 fixed image.
    affine_px
        (3, 3) moving px -> fixed px.
    shape
        (height, width) of the moving image.
    background
        Grey level outside ``rgb`` (white glass).
    """
    from scipy import ndimage

    a = np.asarray(affine_px, dtype=float)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    fx = a[0, 0] * xx + a[0, 1] * yy + a[0, 2]
    fy = a[1, 0] * xx + a[1, 1] * yy + a[1, 2]
    out = np.empty((*shape, 3), dtype=np.uint8)
    for c in range(3):
        band = ndimage.map_coordinates(
            rgb[..., c].astype(np.float32), [fy, fx], order=1, cval=float(background)
        )
        out[..., c] = np.clip(band, 0, 255).round().astype(np.uint8)
    return out


def synthetic_pair(
    rgb: np.ndarray,
    affine_px: Any,
    *,
    seed: int = 0,
    n_landmarks: int = 50,
    margin: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A restained, affinely moved copy of an H&E image, the true transform and matched landmarks.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 H&E image: the fixed slide.
    affine_px
        (3, 3) the shape of the motion, moving px -> fixed px; it is shifted so the moved tissue fits the
        moving image with ``margin`` (a share of its size) of glass around it.
    seed
        For the stain and the landmarks.
    n_landmarks
        Landmarks drawn at random on the fixed tissue.

    Returns
    -------
    (moving_rgb, true_affine_px, fixed_landmarks, moving_landmarks)
        The moving image, the exact moving -> fixed px matrix, and (K, 2) x/y landmarks in each image.
    """
    h, w = rgb.shape[:2]
    a = np.asarray(affine_px, dtype=float).copy()
    inv = np.linalg.inv(a)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=float) @ inv.T
    lo, hi = corners[:, :2].min(0), corners[:, :2].max(0)
    pad = margin * (hi - lo)
    size = np.ceil(hi - lo + 2 * pad).astype(int)
    shift = np.eye(3)
    shift[:2, 2] = lo - pad  # moving px q = fixed-frame moving coordinate - (lo - pad)
    a = a @ shift
    moving = warp_image(restain_as_ihc(rgb, seed), a, (int(size[1]), int(size[0])))
    mask = tissue_od_mask(rgb)
    rng = np.random.default_rng(seed + 1)
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=min(n_landmarks, len(xs)), replace=False)
    fixed_xy = np.column_stack([xs[pick], ys[pick]]).astype(float)
    moving_xy = np.column_stack([fixed_xy, np.ones(len(fixed_xy))]) @ np.linalg.inv(a).T
    return moving, a, fixed_xy, moving_xy[:, :2]
