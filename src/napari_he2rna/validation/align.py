"""Automatic alignment of a second scan (an IHC consecutive section) onto the H&E slide, and landmark errors.

Pathologists rarely have the IHC on the very glass of the H&E: the usual truth comes from a consecutive
section scanned separately, shifted, rotated, a little scaled and deformed. :func:`align_slides` finds the
affine map from the *moving* slide (the IHC) to the *fixed* one (the H&E), on low-resolution images of both:

1. both slides are read at one working pixel size (the fixed slide's longer side at most ``max_side`` px,
   the moving one at the same µm per pixel when both pixel sizes are known);
2. the **haematoxylin** optical density (colour deconvolution, :func:`skimage.color.rgb2hed`) is the image
   registered: it is the one stain H&E and a DAB/haematoxylin IHC share, so the change of stain matters
   little; the tissue masks come from the total optical density (Otsu on its logarithm);
3. a **rigid initialisation**: the tissue masks' centroids and areas give the shift and the scale, and every
   rotation on a ``rotation_step_deg`` circle is scored by Mattes mutual information on a coarse image; the
   best few are refined (similarity transform) and the best kept;
4. an intensity-based **affine** refinement with SimpleITK (Mattes mutual information, gradient descent,
   three resolutions);
5. a **check**: the correlation of the two haematoxylin images inside the tissue both share, and the overlap
   (Dice) of the tissue masks. Below :data:`MIN_SIMILARITY` / :data:`MIN_TISSUE_DICE` the alignment has
   failed (no overlapping tissue, the wrong slide) and :class:`~napari_he2rna.errors.AlignmentError` says so
   instead of returning a wrong transform.

The result (:class:`AlignmentResult`) holds the 3x3 matrix ``affine_px`` mapping a moving level-0 pixel
``(x, y, 1)`` to the fixed level-0 pixel, the same in µm, and what was reached; it is written to and read
from JSON (``he2rna align``) and turns into the :class:`~napari_he2rna.truth.Alignment` that maps the IHC's
QuPath export onto the H&E (:meth:`AlignmentResult.alignment`).

Landmarks (ANHIR/BIRL CSV with ``X, Y`` columns, BIRL ``.pts``, QuPath point GeoJSON or TSV with ``x, y``)
give the error of a transform: :func:`landmark_errors` reports the median and maximum distance in µm and as a
fraction of the fixed image's diagonal (ANHIR's relative target registration error, rTRE).

Coordinates are level-0 pixels with pixel ``j``'s centre at ``j`` (x before y). Nothing here imports Qt.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import AlignmentError, DataError, TissueError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report

__all__ = [
    "AlignmentResult",
    "AlignImage",
    "align_images",
    "align_slides",
    "prepare_image",
    "tissue_od_mask",
    "haematoxylin",
    "read_landmarks",
    "affine_from_parts",
    "restain_as_ihc",
    "warp_image",
    "synthetic_pair",
    "match_landmarks",
    "landmark_errors",
    "MIN_SIMILARITY",
    "MIN_TISSUE_DICE",
]

#: Correlation of the two haematoxylin images in their shared tissue below which the alignment has failed.
#: Consecutive sections reach 0.5-0.8 (rat kidney H&E vs pan-cytokeratin: 0.68), synthetic restained pairs
#: 0.95-0.99; unrelated tissue measured 0.06-0.11 (while its tissue masks may still overlap by 0.6-0.9).
MIN_SIMILARITY = 0.3
#: Overlap (Dice) of the two tissue masks after alignment below which the alignment has failed.
MIN_TISSUE_DICE = 0.6
#: Smallest tissue area, as a share of the image, for a mask to count as tissue.
MIN_TISSUE_FRACTION = 0.005
#: Summed optical density (natural log, R+G+B) below which a pixel is glass whatever Otsu says.
MIN_TISSUE_OD = 0.15
#: How many of the best-scored initial rotations are refined before the best is kept.
N_ROTATIONS_REFINED = 4
#: Iterations of the affine refinement at the full working resolution (the costly level).
FINE_ITERATIONS = 15
#: Most fixed-image samples the mutual information is estimated on, per resolution level.
MAX_SAMPLES = 10_000
#: Format version of the transform JSON.
TRANSFORM_FORMAT = 1


# ------------------------------------------------------------------------------------------------------------
# Images at the working resolution


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


def _read_working_image(slide: Any, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide with its longer side at most ``max_side`` px, and its level-0 px per px (x, y)."""
    thumb = slide.thumbnail(max_size=int(max_side))
    w, h = slide.dimensions
    return thumb, (w / thumb.shape[1], h / thumb.shape[0])


# ------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class AlignmentResult:
    """An affine map from the moving slide (IHC) to the fixed slide (H&E) and how well it fits.

    Attributes
    ----------
    affine_px
        (3, 3) float64 acting on a moving level-0 pixel ``(x, y, 1)``, giving the fixed level-0 pixel.
    mpp_fixed, mpp_moving
        µm per level-0 px of each slide (None when unknown; the other's, or 1, was used).
    method
        What was done, e.g. ``"rotation search (15°) + similarity + affine, Mattes MI on haematoxylin"``.
    similarity
        Pearson correlation of the two haematoxylin images in their shared tissue (0 unrelated, 1 same).
    tissue_dice
        Overlap of the tissue masks after alignment (Dice, 0 to 1).
    mutual_information
        Mattes mutual information reached (nats, larger is better).
    fixed_dimensions, moving_dimensions
        Level-0 (width, height) of each slide.
    working_um_per_px
        Physical size of a working pixel of the fixed image (µm, px when the pixel size is unknown).
    seconds
        Wall time of the alignment.
    fixed, moving
        The files aligned (for the record; may be empty).
    landmarks
        Landmark errors (:func:`landmark_errors`) when landmarks were given.
    """

    affine_px: np.ndarray
    mpp_fixed: float | None
    mpp_moving: float | None
    method: str = ""
    similarity: float = math.nan
    tissue_dice: float = math.nan
    mutual_information: float = math.nan
    fixed_dimensions: tuple[int, int] = (0, 0)
    moving_dimensions: tuple[int, int] = (0, 0)
    working_um_per_px: float = math.nan
    seconds: float = math.nan
    fixed: str = ""
    moving: str = ""
    landmarks: dict[str, Any] = field(default_factory=dict)

    @property
    def affine_um(self) -> np.ndarray:
        """(3, 3) acting on a moving point in µm (moving px x moving µm/px), giving the fixed point in µm."""
        mf = self.mpp_fixed or self.mpp_moving or 1.0
        mm = self.mpp_moving or self.mpp_fixed or 1.0
        return np.diag([mf, mf, 1.0]) @ np.asarray(self.affine_px) @ np.diag([1 / mm, 1 / mm, 1.0])

    def alignment(self):
        """The :class:`~napari_he2rna.truth.Alignment` that maps the moving slide's truth onto the fixed one.

        The truth must be read in the moving slide's level-0 px (QuPath µm tables: with ``mpp_moving``);
        the alignment works in µm at the fixed slide's pixel size, as everything in :mod:`.truth` does.
        """
        from .truth import Alignment

        return Alignment.from_affine_px(self.affine_px, self.mpp_fixed or 1.0)

    def summary(self) -> str:
        """One line: rotation, scale, shift and the similarity reached."""
        from .truth import Alignment

        parts = Alignment.from_affine(self.affine_um).to_offset_scale()
        (dx, dy), scale, rot, _ = parts
        unit = "µm" if self.mpp_fixed else "px"
        return (
            f"rotation {rot:.2f}°, scale {scale:.4f}, shift ({dx:.1f}, {dy:.1f}) {unit}; similarity "
            f"{self.similarity:.2f}, tissue overlap {self.tissue_dice:.2f}, {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``affine_px``, ``affine_um``, pixel sizes, method, similarity, landmarks."""
        return {
            "format": "napari-he2rna transform",
            "version": TRANSFORM_FORMAT,
            "direction": "moving level-0 (x, y, 1) -> fixed level-0 (x, y, 1)",
            "affine_px": np.asarray(self.affine_px, dtype=float).tolist(),
            "affine_um": self.affine_um.tolist(),
            "mpp_fixed": self.mpp_fixed,
            "mpp_moving": self.mpp_moving,
            "method": self.method,
            "similarity": _finite_or_none(self.similarity),
            "tissue_dice": _finite_or_none(self.tissue_dice),
            "mutual_information": _finite_or_none(self.mutual_information),
            "fixed": self.fixed,
            "moving": self.moving,
            "fixed_dimensions": list(self.fixed_dimensions),
            "moving_dimensions": list(self.moving_dimensions),
            "working_um_per_px": _finite_or_none(self.working_um_per_px),
            "seconds": _finite_or_none(self.seconds),
            "landmarks": self.landmarks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the transform") -> AlignmentResult:
        """Read back :meth:`to_dict`; only ``affine_px`` is required (a hand-written 3x3 or 2x3 works)."""
        if not isinstance(data, dict) or "affine_px" not in data:
            raise DataError(f"{source} has no 'affine_px' (the 3x3 moving-to-fixed pixel matrix)")
        a = np.asarray(data["affine_px"], dtype=float)
        if a.shape == (2, 3):
            a = np.vstack([a, [0.0, 0.0, 1.0]])
        if a.shape != (3, 3) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:2, :2])) < 1e-12:
            raise DataError(
                f"{source}: 'affine_px' must be a finite, invertible 3x3 matrix, got {a.tolist()}"
            )

        def num(key: str) -> float | None:
            v = data.get(key)
            return None if v is None else float(v)

        return cls(
            affine_px=a,
            mpp_fixed=num("mpp_fixed"),
            mpp_moving=num("mpp_moving"),
            method=str(data.get("method", "")),
            similarity=num("similarity") if data.get("similarity") is not None else math.nan,
            tissue_dice=num("tissue_dice") if data.get("tissue_dice") is not None else math.nan,
            mutual_information=(
                num("mutual_information") if data.get("mutual_information") is not None else math.nan
            ),
            fixed_dimensions=tuple(data.get("fixed_dimensions") or (0, 0)),
            moving_dimensions=tuple(data.get("moving_dimensions") or (0, 0)),
            working_um_per_px=num("working_um_per_px") or math.nan,
            seconds=num("seconds") or math.nan,
            fixed=str(data.get("fixed", "")),
            moving=str(data.get("moving", "")),
            landmarks=dict(data.get("landmarks") or {}),
        )

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the JSON atomically; an existing file is kept unless ``overwrite``."""
        from ..maps.spatial import atomic_write

        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)

    @classmethod
    def read(cls, path: str | Path) -> AlignmentResult:
        """Read a transform JSON written by :meth:`write` (or ``he2rna align``)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"the transform file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path.name} is not a readable transform JSON ({exc})") from None
        return cls.from_dict(data, path.name)


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------------------
# Registration


def _sitk_image(image: AlignImage, array: np.ndarray):
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    return out


def _centroid_area(image: AlignImage) -> tuple[np.ndarray, float]:
    """Physical centroid (x, y) and area of the tissue mask."""
    ys, xs = np.nonzero(image.mask)
    sx, sy = image.spacing
    ox, oy = image.origin
    return np.array([ox + xs.mean() * sx, oy + ys.mean() * sy]), float(len(xs) * sx * sy)


def _sampling(n_pixels: int, shrink: int) -> float:
    """Share of the fixed pixels sampled at a level: :data:`MAX_SAMPLES` at most, a quarter at least 2,000."""
    at_level = max(n_pixels / shrink**2, 1.0)
    return float(min(0.25, max(MAX_SAMPLES / at_level, min(1.0, 2000 / at_level))))


def _method(
    sitk,
    n_pixels,
    shrink: Sequence[int],
    sigmas: Sequence[float],
    iterations: int,
    step: float,
    min_step: float | None = None,
):
    """Mattes MI, regular-step gradient descent from ``step`` down to ``min_step`` (physical units)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([_sampling(n_pixels, k) for k in shrink], 12345)
    reg.SetInterpolator(sitk.sitkLinear)
    if iterations and min_step is None:
        # plain gradient descent, the learning rate estimated once per level so that no step moves a point
        # more than ``step``; stops when the metric has not changed by 1e-5 over 8 iterations
        reg.SetOptimizerAsGradientDescent(
            learningRate=1.0,
            numberOfIterations=iterations,
            convergenceMinimumValue=1e-5,
            convergenceWindowSize=8,
            estimateLearningRate=reg.EachIteration,
            maximumStepSizeInPhysicalUnits=step,
        )
    else:
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=step,
            minStep=min_step or step,
            numberOfIterations=iterations,
            relaxationFactor=0.6,
            gradientMagnitudeTolerance=1e-8,
        )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _to_matrix(transform) -> np.ndarray:
    """3x3 of a SimpleITK 2-D affine-like transform (fixed physical -> moving physical)."""
    import SimpleITK as sitk

    a = sitk.AffineTransform(2)
    a.SetMatrix(transform.GetMatrix())
    a.SetTranslation(transform.GetTranslation())
    a.SetCenter(transform.GetCenter())
    m = np.asarray(a.GetMatrix(), dtype=float).reshape(2, 2)
    c = np.asarray(a.GetCenter(), dtype=float)
    t = np.asarray(a.GetTranslation(), dtype=float)
    out = np.eye(3)
    out[:2, :2] = m
    out[:2, 2] = t + c - m @ c
    return out


def _check(fixed: AlignImage, moving: AlignImage, fixed_to_moving: np.ndarray) -> tuple[float, float]:
    """(similarity, tissue Dice) of the moving image resampled onto the fixed one by the physical matrix."""
    from scipy import ndimage

    h, w = fixed.mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    px = fixed.origin[0] + xx * fixed.spacing[0]
    py = fixed.origin[1] + yy * fixed.spacing[1]
    a = fixed_to_moving
    mx = a[0, 0] * px + a[0, 1] * py + a[0, 2]
    my = a[1, 0] * px + a[1, 1] * py + a[1, 2]
    cols = (mx - moving.origin[0]) / moving.spacing[0]
    rows = (my - moving.origin[1]) / moving.spacing[1]
    coords = np.stack([rows, cols])
    warped_mask = ndimage.map_coordinates(moving.mask.astype(np.float32), coords, order=1, cval=0.0) > 0.5
    warped_haem = ndimage.map_coordinates(moving.haem, coords, order=1, cval=0.0)
    both = fixed.mask & warped_mask
    total = fixed.mask.sum() + warped_mask.sum()
    dice = float(2 * both.sum() / total) if total else 0.0
    if both.sum() < 50:
        return 0.0, dice
    f, m = fixed.haem[both].astype(np.float64), warped_haem[both].astype(np.float64)
    if np.ptp(f) == 0 or np.ptp(m) == 0:
        return 0.0, dice
    return float(np.corrcoef(f, m)[0, 1]), dice


def align_images(
    fixed: AlignImage,
    moving: AlignImage,
    *,
    rotation_step_deg: float = 15.0,
    affine: bool = True,
    min_similarity: float = MIN_SIMILARITY,
    min_tissue_dice: float = MIN_TISSUE_DICE,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> AlignmentResult:
    """Register ``moving`` onto ``fixed`` (from :func:`prepare_image`): rotations, similarity, affine.

    Parameters
    ----------
    fixed, moving
        The two slides at the working resolution.
    rotation_step_deg
        Spacing of the initial rotations tried (degrees); 360 tries none (the sections are not rotated).
    affine
        Refine the similarity (rotation, one scale, shift) to a full affine (shear, two scales).
    min_similarity, min_tissue_dice
        Below either, :class:`AlignmentError` (the alignment failed) instead of a result.
    progress, cancel
        ``progress(done, total, message)`` and a cancel token (see :mod:`.jobs`).

    Returns
    -------
    AlignmentResult
        With ``affine_px`` (moving level-0 px -> fixed level-0 px), similarity and timing.

    Raises
    ------
    TissueError
        No tissue found in one of the images.
    AlignmentError
        The best transform found leaves the images unrelated (similarity or tissue overlap too low).
    """
    import SimpleITK as sitk

    start = time.perf_counter()
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.mask.mean() < MIN_TISSUE_FRACTION:
            raise TissueError(
                f"no tissue was found on the {name} slide ({100 * image.mask.mean():.2f} % of it): "
                "the alignment needs stained tissue on both; set the alignment by hand"
            )
    steps = 5
    report(progress, 0, steps, "initial rotation search")
    f_img, m_img = _sitk_image(fixed, fixed.haem), _sitk_image(moving, moving.haem)
    c_f, area_f = _centroid_area(fixed)
    c_m, area_m = _centroid_area(moving)
    scale0 = math.sqrt(area_m / area_f)  # fixed -> moving
    spacing = max(fixed.spacing)
    n_pix = int(fixed.mask.size)
    coarse = max(1, int(round(max(fixed.mask.shape) / 160)))

    def similarity_at(angle: float):
        t = sitk.Similarity2DTransform()
        t.SetCenter(tuple(c_f))
        t.SetScale(scale0)
        t.SetAngle(angle)
        t.SetTranslation(tuple(c_m - c_f))
        return t

    # 1. every rotation, scored by mutual information on a coarse image (metric: lower is better)
    f_coarse, m_coarse = sitk.BinShrink(f_img, [coarse] * 2), sitk.BinShrink(m_img, [coarse] * 2)
    angles = np.deg2rad(np.arange(0.0, 360.0, rotation_step_deg)) if rotation_step_deg < 360 else [0.0]
    scored = []
    for angle in angles:
        check_cancel(cancel)
        reg = _method(sitk, n_pix, [1], [0.0], 0, spacing, spacing)
        reg.SetInitialTransform(similarity_at(float(angle)), inPlace=False)
        scored.append((reg.MetricEvaluate(f_coarse, m_coarse), float(angle)))
    scored.sort()
    report(progress, 1, steps, "refining the best rotations")
    best = None
    for _, angle in scored[:N_ROTATIONS_REFINED]:
        check_cancel(cancel)
        t = similarity_at(angle)
        reg = _method(sitk, n_pix, [1], [0.0], 40, 2 * coarse * spacing, 0.05 * coarse * spacing)
        reg.SetInitialTransform(t, inPlace=True)
        reg.Execute(f_coarse, m_coarse)
        # judged by the stain-independent check, not the coarse MI: a square of tissue looks alike at 90°
        value = _check(fixed, moving, _to_matrix(t))[0]
        if best is None or value > best[0]:
            best = (value, t)
    transform = best[1]
    report(progress, 2, steps, "similarity transform")
    check_cancel(cancel)
    reg = _method(sitk, n_pix, [8, 4, 2], [4.0, 2.0, 1.0], 40, 4 * spacing, 0.05 * spacing)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(f_img, m_img)
    method = f"rotation search ({rotation_step_deg:g}°) + similarity"
    report(progress, 3, steps, "affine transform")
    if affine:
        check_cancel(cancel)
        final = sitk.AffineTransform(2)
        final.SetCenter(transform.GetCenter())
        final.SetMatrix(transform.GetMatrix())
        final.SetTranslation(transform.GetTranslation())
        reg = _method(sitk, n_pix, [4, 2], [2.0, 1.0], 40, spacing, 0.02 * spacing)
        reg.SetInitialTransform(final, inPlace=True)
        reg.Execute(f_img, m_img)
        check_cancel(cancel)
        # the full working resolution costs the most per iteration: a few small steps only
        reg = _method(sitk, n_pix, [1], [0.0], FINE_ITERATIONS, 0.5 * spacing, 0.02 * spacing)
        reg.SetInitialTransform(final, inPlace=True)
        reg.Execute(f_img, m_img)
        transform = final
        method += " + affine"
    method += ", Mattes mutual information on the haematoxylin channel (SimpleITK)"
    mi = -float(reg.GetMetricValue())
    report(progress, 4, steps, "checking the fit")
    fixed_to_moving = _to_matrix(transform)
    similarity, dice = _check(fixed, moving, fixed_to_moving)
    moving_to_fixed_um = np.linalg.inv(fixed_to_moving)
    affine_px = (
        np.diag([1 / fixed.mpp, 1 / fixed.mpp, 1.0])
        @ moving_to_fixed_um
        @ np.diag([moving.mpp, moving.mpp, 1.0])
    )
    result = AlignmentResult(
        affine_px=affine_px,
        mpp_fixed=None,
        mpp_moving=None,
        method=method,
        similarity=similarity,
        tissue_dice=dice,
        mutual_information=mi,
        fixed_dimensions=tuple(fixed.dimensions),
        moving_dimensions=tuple(moving.dimensions),
        working_um_per_px=float(spacing),
        seconds=time.perf_counter() - start,
    )
    report(progress, steps, steps, "done")
    if similarity < min_similarity or dice < min_tissue_dice:
        raise AlignmentError(
            f"the automatic alignment failed: the best fit found leaves the two slides unlike each other "
            f"(similarity {similarity:.2f}, needs {min_similarity:.2f}; tissue overlap {dice:.2f}, needs "
            f"{min_tissue_dice:.2f}); check that they are sections of one block, or align by hand",
            result,
        )
    return result


def align_slides(
    fixed: Any,
    moving: Any,
    *,
    mpp_fixed: float | None = None,
    mpp_moving: float | None = None,
    max_side: int = 512,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **kwargs: Any,
) -> AlignmentResult:
    """Align the ``moving`` slide (IHC) onto the ``fixed`` one (H&E) on low-resolution images of both.

    Parameters
    ----------
    fixed, moving
        Paths or open :class:`~napari_he2rna.slide.Slide` objects (whole-slide files or plain JPEG/PNG).
    mpp_fixed, mpp_moving
        µm per level-0 px, overriding the files'. When only one is known the other is taken to be the same;
        when neither is, the transform is found in pixels (its scale absorbs any difference).
    max_side
        The fixed slide is read with its longer side at most this many px (the moving one at the same µm/px).
    progress, cancel
        See :func:`align_images`; ``**kwargs`` go to it too.

    Returns
    -------
    AlignmentResult
    """
    from ..slides.slide import Slide, open_slide

    opened = []

    def get(s: Any, mpp: float | None) -> Slide:
        if isinstance(s, Slide):
            if mpp is not None:
                s.mpp = mpp
            return s
        out = open_slide(s, mpp=mpp)
        opened.append(out)
        return out

    try:
        f_slide, m_slide = get(fixed, mpp_fixed), get(moving, mpp_moving)
        mf, mm = f_slide.mpp, m_slide.mpp
        mf_used, mm_used = mf or mm or 1.0, mm or mf or 1.0
        f_rgb, f_ds = _read_working_image(f_slide, max_side)
        work_um = max(f_ds) * mf_used
        m_side = int(round(max(m_slide.dimensions) * mm_used / work_um))
        m_rgb, m_ds = _read_working_image(m_slide, max(m_side, 16))
        check_cancel(cancel)
        f_img = prepare_image(f_rgb, f_ds, mf_used, tuple(f_slide.dimensions))
        m_img = prepare_image(m_rgb, m_ds, mm_used, tuple(m_slide.dimensions))
        paths = (str(f_slide.path), str(m_slide.path))
    finally:
        for s in opened:
            s.close()
    try:
        result = align_images(f_img, m_img, progress=progress, cancel=cancel, **kwargs)
    except AlignmentError as exc:
        if exc.result is not None:
            exc.result.mpp_fixed, exc.result.mpp_moving = mf, mm
        raise
    result.mpp_fixed, result.mpp_moving = mf, mm
    result.fixed, result.moving = paths
    return result


# ------------------------------------------------------------------------------------------------------------
# Synthetic consecutive sections, for tests and benchmarks


def affine_from_parts(
    rotation_deg: float = 0.0,
    scale: float | Sequence[float] = 1.0,
    shear: float = 0.0,
    shift_px: Sequence[float] = (0.0, 0.0),
    center_px: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """3x3 pixel affine: about ``center_px``, shear x by y, scale (one or (sx, sy)), rotate, then shift.

    ``rotation_deg`` is anticlockwise on screen, as in
    :meth:`~napari_he2rna.truth.Alignment.from_offset_scale`.
    """
    sx, sy = (float(scale), float(scale)) if np.isscalar(scale) else map(float, scale)
    t = np.deg2rad(-rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    m = rot @ np.diag([sx, sy]) @ np.array([[1.0, float(shear)], [0.0, 1.0]])
    c = np.asarray(center_px, dtype=float)
    out = np.eye(3)
    out[:2, :2] = m
    out[:2, 2] = c - m @ c + np.asarray(shift_px, dtype=float)
    return out


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


# ------------------------------------------------------------------------------------------------------------
# Landmarks


def read_landmarks(path: str | Path) -> pd.DataFrame:
    """Read landmark points as a table with columns ``x``, ``y`` (level-0 px) indexed by landmark id.

    Parameters
    ----------
    path
        ANHIR/BIRL CSV (an index column, then ``X``, ``Y``), any CSV/TSV with ``x``/``y`` columns (QuPath's
        point export), BIRL ``.pts`` (``point``, the count, then ``x y`` per line) or a QuPath GeoJSON of
        points. Without an index column the id is the row order (0, 1, ...).

    Returns
    -------
    pandas.DataFrame
        Columns ``x``, ``y`` (float); the index is the id used by :func:`match_landmarks`.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"the landmark file {path} is missing or empty")
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        rows = _geojson_points(path)
        out = pd.DataFrame(rows, columns=["x", "y"], dtype=float)
    elif suffix == ".pts":
        lines = [ln.split() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        nums = []
        for parts in lines:
            try:
                vals = [float(v) for v in parts]
            except ValueError:
                continue
            if len(vals) >= 2:
                nums.append(vals[:2])
        out = pd.DataFrame(nums, columns=["x", "y"], dtype=float)
    else:
        sep = "\t" if suffix in (".tsv", ".txt") else ","
        try:
            table = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{path.name} is not a readable landmark table ({exc})") from None
        cols = {str(c).strip().lower(): c for c in table.columns}
        if "x" not in cols or "y" not in cols:
            raise DataError(
                f"{path.name} has no X and Y columns (its columns are: {', '.join(map(str, table.columns))})"
            )
        first = table.columns[0]
        out = pd.DataFrame(
            {
                "x": pd.to_numeric(table[cols["x"]], errors="coerce"),
                "y": pd.to_numeric(table[cols["y"]], errors="coerce"),
            }
        )
        if str(first).startswith("Unnamed") or str(first).strip() == "":
            out.index = pd.Index(table[first].to_numpy(), name="id")
    has_ids = out.index.name == "id"
    out = out[np.isfinite(out["x"]) & np.isfinite(out["y"])]
    out.attrs["has_ids"] = has_ids
    if out.empty:
        raise DataError(f"{path.name} holds no landmark with finite X and Y")
    return out


def _geojson_points(path: Path) -> list[tuple[float, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid GeoJSON ({exc})") from None
    features = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    rows: list[tuple[float, float]] = []
    for feat in features or []:
        geom = (feat or {}).get("geometry") or {}
        if geom.get("type") == "Point":
            rows.append(tuple(map(float, geom["coordinates"][:2])))
        elif geom.get("type") == "MultiPoint":
            rows.extend(tuple(map(float, p[:2])) for p in geom["coordinates"])
    if not rows:
        raise DataError(f"{path.name} contains no points")
    return rows


def match_landmarks(fixed: pd.DataFrame, moving: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The landmarks both files have: ((K, 2) fixed x/y, (K, 2) moving x/y).

    Matched by id when both files have an id column (ANHIR CSV), else by order. ANHIR lists may differ in
    length (the rat-kidney H&E has 71, its IHC 69): only the shared ids (or the first K of each) are kept.
    """
    if not (fixed.attrs.get("has_ids") and moving.attrs.get("has_ids")):
        k = min(len(fixed), len(moving))
        return fixed[["x", "y"]].to_numpy(float)[:k], moving[["x", "y"]].to_numpy(float)[:k]
    common = fixed.index.intersection(moving.index, sort=False)
    if len(common) < 1:
        raise DataError("the two landmark files share no landmark id")
    return (
        fixed.loc[common, ["x", "y"]].to_numpy(float),
        moving.loc[common, ["x", "y"]].to_numpy(float),
    )


def landmark_errors(
    affine_px: Any,
    fixed_xy: Any,
    moving_xy: Any,
    *,
    fixed_dimensions: tuple[int, int],
    mpp_fixed: float | None = None,
) -> dict[str, Any]:
    """Distances between the fixed landmarks and the moving ones mapped by ``affine_px``.

    Parameters
    ----------
    affine_px
        (3, 3) moving level-0 px -> fixed level-0 px (identity: the error left unaligned).
    fixed_xy, moving_xy
        (K, 2) matched landmarks in level-0 px of each slide.
    fixed_dimensions
        (width, height) of the fixed slide in level-0 px: rTRE is the distance over its diagonal.
    mpp_fixed
        µm per fixed level-0 px; without it the µm figures are None.

    Returns
    -------
    dict
        ``n``, ``median_px``, ``max_px``, ``median_um``, ``max_um``, ``median_rtre``, ``max_rtre``.
    """
    a = np.asarray(affine_px, dtype=float)
    f = np.asarray(fixed_xy, dtype=float).reshape(-1, 2)
    m = np.asarray(moving_xy, dtype=float).reshape(-1, 2)
    mapped = m @ a[:2, :2].T + a[:2, 2]
    d = np.hypot(*(mapped - f).T)
    diag = math.hypot(*fixed_dimensions)
    um = None if not mpp_fixed else float(mpp_fixed)
    return {
        "n": int(len(d)),
        "median_px": float(np.median(d)),
        "max_px": float(d.max()),
        "median_um": None if um is None else float(np.median(d) * um),
        "max_um": None if um is None else float(d.max() * um),
        "median_rtre": float(np.median(d) / diag),
        "max_rtre": float(d.max() / diag),
    }
