"""Marker-pen ink on H&E images: the dense ink and the lighter halo around it, told apart from the stains.

Both H&E stains absorb green the most (Ruifrok's optical-density vectors: haematoxylin 0.65/0.70/0.29,
eosin 0.07/0.99/0.11 for R/G/B), so stained tissue has a green optical density at least that of red and
clearly above that of blue. Blue and green inks absorb red more than green; red ink and black marks absorb
blue about as much as green.

Red ink is the hard case: its light halo has the colour of haemorrhage (red blood cells absorb blue and
green, so at a slide's thumbnail scale a bleed and a pale red pen stroke have the same hue, saturation and
R/G/B ratios). Colour alone therefore only finds *dense* ink (far more saturated than any stain); the
halo is the pixels of ink-like colour that are connected to that dense ink through pixels of ink-like
colour (a morphological reconstruction). Haemorrhage and eosin-rich tissue away from a pen stroke are
kept, whatever their colour.

Nothing here imports Qt; all functions take and return numpy arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import gaussian
from skimage.morphology import reconstruction, remove_small_objects

__all__ = ["optical_density", "pen_mask", "local_texture", "ink_mask", "INK_METHOD"]

# Names the rule below, for the provenance of anything computed from a mask that removed ink (features
# caches); change it whenever a threshold changes so that results of another mask are not reused.
INK_METHOD = "ink-v1"

# Any optical density (natural log) below this on every channel is glass, whatever its hue.
GLASS_OD = 0.04
# Dense ink: pixels at least this dark (largest optical density) are judged by hue alone.
DENSE_OD = 0.25
# Dense red ink: HSV saturation above any stain's (eosin-rich tissue at most ~0.75, the 95th percentile of
# the shared real tiles; red pen cores 0.8–0.99) ...
RED_CORE_SATURATION = 0.78
# ... with a red hue (degrees, 0 = red, negative towards magenta; eosin and haematoxylin sit at -80..-25),
RED_HUE_RANGE = (-30.0, 20.0)
# ... absorbing blue nearly as much as green (OD blue / OD green; tissue 0.35–0.78, red pens 0.7–1.5) and
# hardly any red (OD red / OD green; tissue 0.25–0.9, red pen cores 0.1–0.25).
RED_CORE_BLUE_GREEN = 0.65
RED_CORE_RED_GREEN = 0.3
# The red halo: any pixel of red hue absorbing blue at least this much relative to green and red at most
# this much (the pale red fringe of a stroke; haemorrhage looks the same, hence the connectivity rule).
RED_HALO_HUE_RANGE = (-25.0, 20.0)
RED_HALO_BLUE_GREEN = 0.72
RED_HALO_RED_GREEN = 0.6
# ... or, when vivid (saturation above RED_VIVID_SATURATION), absorbing blue at least RED_VIVID_BLUE_GREEN
# relative to green and red at most RED_VIVID_RED_GREEN (a red stroke over tissue at thumbnail scale).
RED_VIVID_SATURATION = 0.5
RED_VIVID_BLUE_GREEN = 0.66
RED_VIVID_RED_GREEN = 0.35
# Dark pixels absorbing blue this much relative to green (dark tissue 0.5–0.8, blurred dark ink 0.75–0.9)
# join a halo only where the image is smooth, as ink is and tissue at full resolution is not: the local
# mean absolute high-pass of the optical density (sigma 1 px, averaged over sigma 2 px) below SMOOTH_OD.
DARK_HALO_OD = 0.3
DARK_HALO_BLUE_GREEN = 0.72
SMOOTH_OD = 0.008
# A halo reaches at most this many times the half-width of the dense ink it surrounds (a blurred stroke
# has a wide core and a wide halo; a thin line at thumbnail scale a thin one), so that haemorrhage or
# eosin-rich tissue that a pen line touches is not swallowed beyond the line's fringe.
HALO_REACH = 16.0
# Halo pixels are coloured at least this much (HSV saturation): glass is grey whatever its faint tint.
HALO_MIN_SATURATION = 0.06
# The blue/green halo: any pixel that absorbs red more than green (no stain does).
BLUE_GREEN_HALO_RED_GREEN = 1.0


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln(I / 255)`` of every channel.

    Parameters
    ----------
    rgb : (..., 3) uint8

    Returns
    -------
    (..., 3) float32, 0 for white (unitless, natural log).
    """
    return -np.log(np.maximum(np.asarray(rgb, dtype=np.float32), 1.0) / 255.0)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of dense marker-pen ink (blue, green, red, black), by their absorption alone.

    A pixel at least :data:`DENSE_OD` dark is ink when it absorbs red clearly more than green (blue and
    green inks) or blue about as much as green (red ink, black and grey marks). The pale halo of a pen mark
    is not found here; see :func:`ink_mask`.

    Parameters
    ----------
    rgb : (h, w, 3) uint8

    Returns
    -------
    (h, w) bool, True on pen ink.
    """
    od = optical_density(rgb[..., :3])
    od_r, od_g, od_b = od[..., 0], od[..., 1], od[..., 2]
    inked = channel_max(od) > DENSE_OD  # faint pixels are glass whatever their hue
    blue_or_green = od_r > od_g * 1.15 + 0.05
    red_or_black = od_b > od_g * 0.85 + 0.05
    return inked & (blue_or_green | red_or_black)


def channel_max(image: np.ndarray) -> np.ndarray:
    """Per-pixel maximum over the last axis of an (h, w, c) array: the same as ``image.max(axis=-1)``.

    Written as elementwise maxima because numpy reduces a short last axis about 10x slower (a 2,048 px
    thumbnail: ~0.14 s against ~0.01 s), and this runs several times before the first tile of a run.
    """
    out = image[..., 0].copy()
    for k in range(1, image.shape[-1]):
        np.maximum(out, image[..., k], out=out)
    return out


def channel_min(image: np.ndarray) -> np.ndarray:
    """Per-pixel minimum over the last axis (``image.min(axis=-1)``), as :func:`channel_max`."""
    out = image[..., 0].copy()
    for k in range(1, image.shape[-1]):
        np.minimum(out, image[..., k], out=out)
    return out


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees (-180, 180], 0 = red, and saturation (0–1) of (h, w, 3) uint8."""
    c = rgb.astype(np.float32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    cmax, cmin = channel_max(c), channel_min(c)
    delta = cmax - cmin
    saturation = np.where(cmax > 0, delta / np.maximum(cmax, 1.0), 0.0)
    # atan2 form of the hexcone hue: exact at the primaries, smooth in between, 0 for grey.
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b))
    return hue.astype(np.float32), saturation.astype(np.float32)


def local_texture(image: np.ndarray) -> np.ndarray:
    """Local texture: mean absolute difference from a Gaussian blur (sigma 1 px), averaged (sigma 2 px).

    Parameters
    ----------
    image : (h, w) float
        E.g. the mean optical density.

    Returns
    -------
    (h, w) float64, in the image's units (0 on a flat or linearly varying image).
    """
    image = np.asarray(image, dtype=np.float64)
    return gaussian(np.abs(image - gaussian(image, sigma=1.0)), sigma=2.0)


def _within_reach(seeds: np.ndarray, reach: float) -> np.ndarray:
    """Pixels within ``reach`` times the half-width of the nearest piece of ``seeds`` from that piece."""
    inside = ndi.distance_transform_edt(seeds)  # px to the nearest non-seed pixel
    labels, n = ndi.label(seeds)
    half_width = np.concatenate([[0.0], ndi.maximum(inside, labels, index=np.arange(1, n + 1))])
    outside, (iy, ix) = ndi.distance_transform_edt(~seeds, return_indices=True)
    return outside <= reach * half_width[labels[iy, ix]] + 1.0


def ink_mask(rgb: np.ndarray, min_object_fraction: float = 2e-4) -> np.ndarray:
    """Marker-pen ink and its halo: dense ink found by colour, plus the ink-coloured pixels connected to it.

    Dense ink is :func:`pen_mask` together with dense red ink (saturation above
    :data:`RED_CORE_SATURATION` with a red hue, absorbing blue nearly as much as green and little red);
    pieces of it smaller than ``min_object_fraction`` of the image (red blood cells, a stray dark speck) are
    not seeds. The halo is then grown from those seeds through the pixels whose colour is that of the same
    ink, only lighter: red-hued pixels absorbing blue nearly as much as green for red ink, pixels absorbing
    red more than green for blue and green inks (no stain does). Pixels of that colour not connected to
    dense ink (haemorrhage, eosin-rich stroma) are not ink.

    Parameters
    ----------
    rgb : (h, w, 3) uint8
        An RGB image (a slide thumbnail or a tile; RGBA should be composited on white first).
    min_object_fraction : float
        Smallest piece of dense ink that seeds a halo, as a fraction of the image area.

    Returns
    -------
    (h, w) bool, True on ink.
    """
    rgb = np.asarray(rgb)[..., :3].astype(np.uint8, copy=False)
    od = optical_density(rgb)
    od_r, od_g, od_b = od[..., 0], od[..., 1], od[..., 2]
    od_g_safe = np.maximum(od_g, 1e-3)
    blue_green_ratio, red_green_ratio = od_b / od_g_safe, od_r / od_g_safe
    hue, saturation = _hue_saturation(rgb)
    od_max = channel_max(od)
    coloured = od_max > GLASS_OD

    dark = od_max > DENSE_OD
    blue_green_dense = dark & (od_r > od_g * 1.15 + 0.05)
    red_black_dense = dark & (od_b > od_g * 0.85 + 0.05)  # together: pen_mask
    red_core = (
        (saturation > RED_CORE_SATURATION)
        & (hue > RED_HUE_RANGE[0])
        & (hue < RED_HUE_RANGE[1])
        & (blue_green_ratio > RED_CORE_BLUE_GREEN)
        & (red_green_ratio < RED_CORE_RED_GREEN)
    )
    min_size = max(int(min_object_fraction * rgb.shape[0] * rgb.shape[1]), 1)
    red_hue = (hue > RED_HALO_HUE_RANGE[0]) & (hue < RED_HALO_HUE_RANGE[1])
    red_halo = red_hue & (
        ((blue_green_ratio > RED_HALO_BLUE_GREEN) & (red_green_ratio < RED_HALO_RED_GREEN))
        | (
            (saturation > RED_VIVID_SATURATION)
            & (blue_green_ratio > RED_VIVID_BLUE_GREEN)
            & (red_green_ratio < RED_VIVID_RED_GREEN)
        )
    )
    halo_ok = coloured & (saturation > HALO_MIN_SATURATION)

    def red_black_halo() -> np.ndarray:
        dark_halo = (
            (od_max > DARK_HALO_OD)
            & (blue_green_ratio > DARK_HALO_BLUE_GREEN)
            & (local_texture(od.mean(axis=-1)) < SMOOTH_OD)
        )
        return halo_ok & (red_halo | dark_halo)

    def blue_green_halo() -> np.ndarray:
        return halo_ok & (red_green_ratio > BLUE_GREEN_HALO_RED_GREEN)

    ink = np.zeros(rgb.shape[:2], dtype=bool)
    # Each ink grows its own halo: a red halo from red or black ink, a blue/green one from blue/green ink.
    # A halo is only computed when its ink has seeds (the texture filter is most of the cost of a slide
    # without pen marks).
    for dense, halo_of in ((red_black_dense | red_core, red_black_halo), (blue_green_dense, blue_green_halo)):
        seeds = remove_small_objects(dense, max_size=min_size)
        if not seeds.any():
            continue
        allowed = seeds | (halo_of() & _within_reach(seeds, HALO_REACH))
        # Reconstruction by dilation of the seeds under the allowed pixels: their connected parts.
        ink |= reconstruction(seeds.astype(np.uint8), allowed.astype(np.uint8), method="dilation") > 0
    # Small dense marks that seeded nothing are ink all the same.
    return ink | pen_mask(rgb)
