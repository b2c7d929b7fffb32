"""Automatic alignment of a second scan (an IHC consecutive section) onto the H&E slide.

Pathologists rarely have the IHC on the very glass of the H&E: the usual truth comes from a consecutive
section scanned separately, shifted, rotated, a little scaled and deformed. :func:`align_slides` finds the
affine map from the *moving* slide (the IHC) to the *fixed* one (the H&E), on low-resolution images of both:

1. both slides are read at one working pixel size (the fixed slide's longer side at most ``max_side`` px,
   the moving one at the same µm per pixel when both pixel sizes are known);
2. the **haematoxylin** optical density (colour deconvolution, :func:`skimage.color.rgb2hed`) is the image
   registered: it is the one stain H&E and a DAB/haematoxylin IHC share, so the change of stain matters
   little; the tissue masks come from the total optical density (Otsu on its logarithm); both are made in
   :mod:`.align_image`;
3. a **rigid initialisation**: the tissue masks' centroids and areas give the shift and the scale, and every
   rotation on a ``rotation_step_deg`` circle is scored by Mattes mutual information on a coarse image; the
   best few are refined (similarity transform) and the best kept; all of it for the moving section as
   scanned and mirrored (mounted face-down), the mirror kept when it fits clearly better
   (:attr:`AlignmentResult.flipped`);
4. an intensity-based **affine** refinement with SimpleITK (Mattes mutual information, gradient descent,
   three resolutions);
5. a **check**: the correlation of the two haematoxylin images inside the tissue both share (at one
   resolution, :data:`CHECK_SIDE`), and the overlap (Dice) of the tissue masks. Below :data:`MIN_SIMILARITY`
   / :data:`MIN_TISSUE_DICE` the alignment has failed (no overlapping tissue, the wrong slide, a mirrored
   section fitted as scanned) and :class:`~napari_he2rna.errors.AlignmentError` says so
   instead of returning a wrong transform.

The result (:class:`AlignmentResult`) holds the 3x3 matrix ``affine_px`` mapping a moving level-0 pixel
``(x, y, 1)`` to the fixed level-0 pixel, the same in µm, and what was reached; it is written to and read
from JSON (``he2rna align``) and turns into the :class:`~napari_he2rna.validation.transform.Alignment` that
maps the IHC's QuPath export onto the H&E (:meth:`AlignmentResult.alignment`).

The error of a transform on landmarks is in :mod:`.landmarks`; synthetic pairs of a known transform, for tests
and benchmarks, in :mod:`.synthetic_sections`.

Coordinates are level-0 pixels with pixel ``j``'s centre at ``j`` (x before y). Nothing here imports Qt.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AlignmentError, DataError, TissueError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from .align_image import AlignImage, mirror_matrix, mirrored, prepare_image, read_working_image
from .transform_file import TRANSFORM_FORMAT, read_transform_json, validate_transform

__all__ = [
    "AlignmentResult",
    "align_images",
    "align_slides",
    "affine_from_parts",
    "MIN_SIMILARITY",
    "MIN_TISSUE_DICE",
    "check_rotation_step",
    "check_max_side",
]

#: Correlation of the two haematoxylin images in their shared tissue (at :data:`CHECK_SIDE`) below which
#: the alignment has failed. Measured (issue 21) at max_side 256 / 512 / 1024 on right fits (landmark median
#: rTRE <= 0.005): the real rat-kidney H&E vs pan-cytokeratin pair, as scanned, mirrored, turned and moved
#: (12 each) 0.82-0.86 / 0.70-0.74 / 0.66-0.70, synthetic restained pairs of 7 H&E images 0.97-1.00; on
#: wrong fits (23 each: unrelated tissue, one half against the other, mirrored sections fitted unmirrored)
#: at most 0.41 / 0.32 / 0.36, mirrored sections the highest (the issue's 0.31 passed the old floor, 0.3).
MIN_SIMILARITY = 0.5
#: Working resolution (the fixed image's longer side, px) the similarity is measured at: a finer image is
#: blurred to it first, so that one floor holds at every ``max_side``. Unblurred, the right rat-kidney fit
#: fell from 0.70 at 512 px to 0.47 at 1024 and 0.41 at its full 1164 px (the mirrored wrong fit: 0.31-0.21).
CHECK_SIDE = 512
#: Overlap (Dice) of the two tissue masks after alignment below which the alignment has failed.
MIN_TISSUE_DICE = 0.6
#: Smallest tissue area, as a share of the image, for a mask to count as tissue.
MIN_TISSUE_FRACTION = 0.005
#: How many of the best-scored initial rotations are refined before the best is kept.
N_ROTATIONS_REFINED = 4
#: How much better (similarity) the mirrored section must fit than the section as scanned to be kept mirrored.
MIRROR_MARGIN = 0.05
#: Finest spacing of the initial rotations (degrees): finer only costs time, the refinement does the rest.
MIN_ROTATION_STEP = 0.5
#: Working resolutions (the fixed slide's longer side, px) accepted: below, a wrong fit's similarity nears the
#: floor (0.41 at 256 px); above, the registration takes minutes for no gain at the scale it works on.
MAX_SIDE_RANGE = (256, 4096)
#: Iterations of the affine refinement at the full working resolution (the costly level).
FINE_ITERATIONS = 15
#: Most fixed-image samples the mutual information is estimated on, per resolution level.
MAX_SAMPLES = 10_000


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
        """The :class:`~.transform.Alignment` that maps the moving slide's truth onto the fixed one.

        The truth must be read in the moving slide's level-0 px (QuPath µm tables: with ``mpp_moving``);
        the alignment works in µm at the fixed slide's pixel size, as everything in :mod:`.truth` does.
        """
        from .transform import Alignment

        return Alignment.from_affine_px(self.affine_px, self.mpp_fixed or 1.0)

    def summary(self) -> str:
        """One line: rotation, scale, shift and the similarity reached (after a left-right mirror when
        :attr:`flipped`)."""
        from .transform import Alignment

        # a mirrored map is said as "mirrored left to right, then rotated": the mirror undone first
        unmirrored = self.affine_um @ np.diag([-1.0, 1.0, 1.0]) if self.flipped else self.affine_um
        (dx, dy), scale, rot, _ = Alignment.from_affine(unmirrored).to_offset_scale()
        unit = "µm" if self.mpp_fixed else "px"
        face = "mirrored left to right (the section lay face-down), then " if self.flipped else ""
        return (
            f"{face}rotation {rot:.2f}°, scale {scale:.4f}, shift ({dx:.1f}, {dy:.1f}) {unit}; "
            f"similarity {self.similarity:.2f}, tissue overlap {self.tissue_dice:.2f}, {self.seconds:.1f} s"
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
            "fixed_dimensions": [int(v) for v in self.fixed_dimensions],
            "moving_dimensions": [int(v) for v in self.moving_dimensions],
            "working_um_per_px": _finite_or_none(self.working_um_per_px),
            "seconds": _finite_or_none(self.seconds),
            "landmarks": self.landmarks,
            "flipped": self.flipped,
        }

    @property
    def flipped(self) -> bool:
        """True when the map mirrors the moving slide (a section mounted face-down): ``affine_px`` then has a
        negative determinant, so whatever applies it (:meth:`alignment`) mirrors the truth with it."""
        return bool(np.linalg.det(np.asarray(self.affine_px, dtype=float)[:2, :2]) < 0)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the transform") -> AlignmentResult:
        """Read back :meth:`to_dict`; only ``affine_px`` is required (a hand-written 3x3 or 2x3 works).

        Every field is checked by :func:`~.transform_file.validate_transform` (:class:`DataError`).
        """
        fields = validate_transform(data, source)
        return cls(**{k: v for k, v in fields.items() if k in _FIELDS})

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the JSON atomically; an existing file is kept unless ``overwrite``."""
        from ..maps.exports import atomic_write

        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)

    @classmethod
    def read(cls, path: str | Path) -> AlignmentResult:
        """Read a transform JSON written by :meth:`write` (or ``he2rna align``); a bad one is a DataError."""
        fields = read_transform_json(path)
        return cls(**{k: v for k, v in fields.items() if k in _FIELDS})


#: The fields of :class:`AlignmentResult` a transform file gives (``flipped`` is read off the matrix).
_FIELDS = frozenset(f.name for f in fields(AlignmentResult))


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
    """(similarity, tissue Dice) of the moving image resampled onto the fixed one by the physical matrix.

    The similarity is measured at :data:`CHECK_SIDE`: a finer working image is first blurred to it.
    """
    from scipy import ndimage

    h, w = fixed.mask.shape
    f_haem, m_haem = fixed.haem, moving.haem
    k = max(h, w) / CHECK_SIDE
    if k > 1:  # the 1 px blur prepare_image gives a CHECK_SIDE image, in this image's px: sqrt(k^2 - 1) more
        sigma = math.sqrt(k * k - 1)
        f_haem = ndimage.gaussian_filter(f_haem, sigma)
        m_haem = ndimage.gaussian_filter(m_haem, sigma * fixed.spacing[0] / moving.spacing[0])
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
    warped_haem = ndimage.map_coordinates(m_haem, coords, order=1, cval=0.0)
    both = fixed.mask & warped_mask
    total = fixed.mask.sum() + warped_mask.sum()
    dice = float(2 * both.sum() / total) if total else 0.0
    if both.sum() < 50:
        return 0.0, dice
    f, m = f_haem[both].astype(np.float64), warped_haem[both].astype(np.float64)
    if np.ptp(f) == 0 or np.ptp(m) == 0:
        return 0.0, dice
    return float(np.corrcoef(f, m)[0, 1]), dice


def check_rotation_step(value: Any) -> float:
    """The spacing of the initial rotations, degrees, as a float in [0.5, 360], or :class:`DataError`."""
    try:
        step = float(value)
    except (TypeError, ValueError):
        step = math.nan
    if not (math.isfinite(step) and MIN_ROTATION_STEP <= step <= 360.0):
        raise DataError(
            f"the rotation step must be a number of degrees from {MIN_ROTATION_STEP:g} to 360 (15 tries 24 "
            f"rotations, 360 only the slide as it lies), not {value}."
        )
    return step


def check_max_side(value: Any) -> int:
    """The working resolution (the fixed slide's longer side, px) as an int in :data:`MAX_SIDE_RANGE`."""
    lo, hi = MAX_SIDE_RANGE
    try:
        side = float(value)
    except (TypeError, ValueError):
        side = math.nan
    if not (math.isfinite(side) and side.is_integer() and lo <= side <= hi):
        raise DataError(
            f"the working resolution (max side) must be a whole number of pixels from {lo} to {hi} "
            f"(512 suits most slides), not {value}."
        )
    return int(side)


def _rotation_search(
    sitk, fixed: AlignImage, moving: AlignImage, f_coarse, coarse: int, n_pix: int, step_deg: float, cancel
) -> list[tuple[float, Any]]:
    """(similarity, similarity transform) of the :data:`N_ROTATIONS_REFINED` best initial rotations, refined.

    Every rotation on a ``step_deg`` circle is scored by mutual information on a coarse image (the tissue
    masks' centroids and areas give the shift and scale); the best few are refined on it and judged by the
    stain-independent :func:`_check`, not the coarse MI: a square of tissue looks alike at 90°.
    """
    m_img = _sitk_image(moving, moving.haem)
    c_f, area_f = _centroid_area(fixed)
    c_m, area_m = _centroid_area(moving)
    scale0 = math.sqrt(area_m / area_f)  # fixed -> moving
    spacing = max(fixed.spacing)

    def similarity_at(angle: float):
        t = sitk.Similarity2DTransform()
        t.SetCenter(tuple(c_f))
        t.SetScale(scale0)
        t.SetAngle(angle)
        t.SetTranslation(tuple(c_m - c_f))
        return t

    # every rotation, scored by mutual information on a coarse image (metric: lower is better)
    m_coarse = sitk.BinShrink(m_img, [coarse] * 2)
    angles = np.deg2rad(np.arange(0.0, 360.0, step_deg)) if step_deg < 360 else [0.0]
    scored = []
    for angle in angles:
        check_cancel(cancel)
        reg = _method(sitk, n_pix, [1], [0.0], 0, spacing, spacing)
        reg.SetInitialTransform(similarity_at(float(angle)), inPlace=False)
        scored.append((reg.MetricEvaluate(f_coarse, m_coarse), float(angle)))
    scored.sort()
    out = []
    for _, angle in scored[:N_ROTATIONS_REFINED]:
        check_cancel(cancel)
        t = similarity_at(angle)
        reg = _method(sitk, n_pix, [1], [0.0], 40, 2 * coarse * spacing, 0.05 * coarse * spacing)
        reg.SetInitialTransform(t, inPlace=True)
        reg.Execute(f_coarse, m_coarse)
        out.append((_check(fixed, moving, _to_matrix(t))[0], t))
    return out


def align_images(
    fixed: AlignImage,
    moving: AlignImage,
    *,
    rotation_step_deg: float = 15.0,
    affine: bool = True,
    min_similarity: float = MIN_SIMILARITY,
    min_tissue_dice: float = MIN_TISSUE_DICE,
    try_mirror: bool = True,
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
    try_mirror
        Also try the moving section mirrored (mounted face-down) and keep it when it fits better by
        :data:`MIRROR_MARGIN`; the result's ``flipped`` says so and its matrix mirrors.
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
    rotation_step_deg = check_rotation_step(rotation_step_deg)
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.mask.mean() < MIN_TISSUE_FRACTION:
            raise TissueError(
                f"no tissue was found on the {name} slide ({100 * image.mask.mean():.2f} % of it): "
                "the alignment needs stained tissue on both; set the alignment by hand"
            )
    steps = 5
    report(progress, 0, steps, "initial rotation search")
    f_img = _sitk_image(fixed, fixed.haem)
    spacing = max(fixed.spacing)
    n_pix = int(fixed.mask.size)
    coarse = max(1, int(round(max(fixed.mask.shape) / 160)))
    f_coarse = sitk.BinShrink(f_img, [coarse] * 2)
    # 1-2. each face of the moving section (as scanned, and mirrored: mounted face-down), every rotation
    # scored on a coarse image, the best few refined; the face and fit of the best similarity are kept
    faces = [(False, moving), (True, mirrored(moving))] if try_mirror else [(False, moving)]
    best = []  # per face: (similarity, transform, flipped, image) of its best rotation
    for flipped, image in faces:
        found = _rotation_search(sitk, fixed, image, f_coarse, coarse, n_pix, rotation_step_deg, cancel)
        value, t = max(found, key=lambda vt: vt[0])
        best.append((value, t, flipped, image))
    if len(best) == 2 and best[1][0] > best[0][0] + MIRROR_MARGIN:
        best.reverse()
    _, transform, flipped, face = best[0]
    m_img = _sitk_image(face, face.haem)
    report(progress, 1, steps, "refining the best rotation")
    report(progress, 2, steps, "similarity transform")
    check_cancel(cancel)
    reg = _method(sitk, n_pix, [8, 4, 2], [4.0, 2.0, 1.0], 40, 4 * spacing, 0.05 * spacing)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(f_img, m_img)
    method = f"rotation search ({rotation_step_deg:g}°{', both faces' if try_mirror else ''}) + similarity"
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
    if flipped:  # the fit was found on the mirrored image: mirror back onto the moving slide's own pixels
        fixed_to_moving = mirror_matrix(moving) @ fixed_to_moving
        method += "; the moving section is mirrored (mounted face-down)"
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
        Paths or open :class:`~napari_he2rna.slides.slide.Slide` objects (whole-slide files or plain
        JPEG/PNG).
    mpp_fixed, mpp_moving
        µm per level-0 px, overriding the files'. When only one is known the other is taken to be the same;
        when neither is, the transform is found in pixels (its scale absorbs any difference).
    max_side
        The fixed slide is read with its longer side at most this many px (the moving one at the same µm/px);
        :data:`MAX_SIDE_RANGE` bounds it.
    progress, cancel
        See :func:`align_images`; ``**kwargs`` go to it too.

    Returns
    -------
    AlignmentResult
    """
    from ..slides.slide import Slide, open_slide

    max_side = check_max_side(max_side)  # before any slide is read: a bad setting fails at once
    if "rotation_step_deg" in kwargs:
        kwargs["rotation_step_deg"] = check_rotation_step(kwargs["rotation_step_deg"])
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
        f_rgb, f_ds = read_working_image(f_slide, max_side)
        work_um = max(f_ds) * mf_used
        m_side = int(round(max(m_slide.dimensions) * mm_used / work_um))
        m_rgb, m_ds = read_working_image(m_slide, max(m_side, 16))
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
# Pixel affines


def affine_from_parts(
    rotation_deg: float = 0.0,
    scale: float | Sequence[float] = 1.0,
    shear: float = 0.0,
    shift_px: Sequence[float] = (0.0, 0.0),
    center_px: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """3x3 pixel affine: about ``center_px``, shear x by y, scale (one or (sx, sy)), rotate, then shift.

    ``rotation_deg`` is anticlockwise on screen, as in
    :meth:`~napari_he2rna.validation.transform.Alignment.from_offset_scale`.
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
