"""Slides at the working resolution of the alignment: the haematoxylin image registered and the tissue mask.

The **haematoxylin** optical density (colour deconvolution, :func:`skimage.color.rgb2hed`) is the image
registered: it is the one stain H&E and a DAB/haematoxylin IHC share, so the change of stain matters little;
the tissue masks come from the total optical density (Otsu on its logarithm). :func:`prepare_image` makes an
:class:`AlignImage` of both from a working-resolution RGB image, :func:`read_working_image` reads one from a
slide, :func:`mirrored` turns one over (a section mounted face-down). Nothing here imports Qt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Summed optical density (natural log, R+G+B) below which a pixel is glass whatever Otsu says.
MIN_TISSUE_OD = 0.15


@dataclass
class AlignImage:
    """A slide at the working resolution, ready to register.

    Attributes
    ----------
    rgb
        (h, w, 3) uint8 image of the whole slide.
    haem
        (h, w) float32 haematoxylin optical density (smoothed by one pixel).
    mask
        (h, w) bool tissue mask.
    downsample
        (sx, sy): level-0 pixels per working pixel along x and y.
    mpp
        µm per level-0 pixel used for the physical coordinates (1.0 when unknown: coordinates in px).
    dimensions
        Level-0 (width, height) in px.
    """

    rgb: np.ndarray
    haem: np.ndarray
    mask: np.ndarray
    downsample: tuple[float, float]
    mpp: float
    dimensions: tuple[int, int]

    @property
    def spacing(self) -> tuple[float, float]:
        """Physical size (µm, or px when the pixel size is unknown) of one working pixel, (x, y)."""
        return (self.downsample[0] * self.mpp, self.downsample[1] * self.mpp)

    @property
    def origin(self) -> tuple[float, float]:
        """Physical position of working pixel (0, 0)'s centre: level-0 ``(ds - 1) / 2`` px."""
        return ((self.downsample[0] - 1) / 2 * self.mpp, (self.downsample[1] - 1) / 2 * self.mpp)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w, 3) float32 ``-ln((I + 1) / 256)``, about 0 for white."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB image (Ruifrok-Johnston deconvolution), float32, >= 0.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 H&E or DAB/haematoxylin IHC image.

    Returns
    -------
    numpy.ndarray
        (h, w) float32; 0 on glass, larger on nuclei (in the stain's optical density units).
    """
    from skimage.color import rgb2hed

    h = rgb2hed(np.asarray(rgb)[..., :3])[..., 0]
    return np.maximum(h, 0.0).astype(np.float32)


def tissue_od_mask(rgb: np.ndarray, sigma_px: float = 2.0) -> np.ndarray:
    """Tissue of a low-resolution slide image, whatever its stain: Otsu on the log of the optical density.

    The total optical density (R+G+B, smoothed by ``sigma_px``) is split by Otsu's threshold on its
    logarithm, which keeps pale haematoxylin counterstain with the dense DAB (a plain Otsu would put the pale
    tissue of an IHC with the glass), floored at :data:`MIN_TISSUE_OD`; specks and holes smaller than 0.2 %
    of the image are removed / filled.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8.
    sigma_px
        Gaussian smoothing before thresholding, in pixels of ``rgb``.

    Returns
    -------
    numpy.ndarray
        (h, w) bool, True on tissue; all False for a blank image.
    """
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    od = gaussian(_optical_density(np.asarray(rgb)[..., :3]).sum(axis=-1), sigma_px)
    if np.ptp(od) <= 1e-6:
        return np.zeros(od.shape, dtype=bool)
    log_od = np.log(np.maximum(od, 1e-3))
    threshold = max(float(np.exp(threshold_otsu(log_od))), MIN_TISSUE_OD)
    mask = od > threshold
    size = max(int(2e-3 * mask.size), 1)
    mask = remove_small_objects(mask, max_size=size)
    return remove_small_holes(mask, max_size=size)


def prepare_image(
    rgb: np.ndarray,
    downsample: float | Sequence[float],
    mpp: float | None,
    dimensions: tuple[int, int] | None = None,
) -> AlignImage:
    """Haematoxylin image and tissue mask of a working-resolution image.

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 image of the whole slide at the working resolution.
    downsample
        Level-0 px per working px (one factor, or (sx, sy)).
    mpp
        µm per level-0 px, or None (physical coordinates are then level-0 px).
    dimensions
        Level-0 (width, height); default ``rgb``'s size times the downsample.
    """
    from skimage.filters import gaussian

    rgb = np.ascontiguousarray(np.asarray(rgb)[..., :3], dtype=np.uint8)
    ds = (float(downsample), float(downsample)) if np.isscalar(downsample) else tuple(map(float, downsample))
    h, w = rgb.shape[:2]
    dims = dimensions or (round(w * ds[0]), round(h * ds[1]))
    haem = gaussian(haematoxylin(rgb), 1.0).astype(np.float32)
    return AlignImage(rgb, haem, tissue_od_mask(rgb), (ds[0], ds[1]), float(mpp or 1.0), tuple(dims))


def read_working_image(slide: Any, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide with its longer side at most ``max_side`` px, and its level-0 px per px (x, y)."""
    thumb = slide.thumbnail(max_size=int(max_side))
    w, h = slide.dimensions
    return thumb, (w / thumb.shape[1], h / thumb.shape[0])


def mirrored(image: AlignImage) -> AlignImage:
    """The section turned over (mounted face-down): mirrored left to right, same spacing and origin."""
    return AlignImage(
        np.ascontiguousarray(image.rgb[:, ::-1]),
        np.ascontiguousarray(image.haem[:, ::-1]),
        np.ascontiguousarray(image.mask[:, ::-1]),
        image.downsample,
        image.mpp,
        image.dimensions,
    )


def mirror_matrix(image: AlignImage) -> np.ndarray:
    """The physical 3x3 from :func:`mirrored` ``(image)`` to ``image``, its own inverse:
    ``x -> 2 ox + (w - 1) sx - x`` (``ox``, ``sx``: origin and spacing along x; ``w``: the width in px)."""
    k = 2 * image.origin[0] + (image.mask.shape[1] - 1) * image.spacing[0]
    return np.array([[-1.0, 0.0, k], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
