"""The alignment of a second scan (an IHC section) onto the H&E slide: an affine map in µm.

When the truth was drawn on another scan of the same tissue, an :class:`Alignment` (offset, scale or a full
affine, in µm) maps it onto the slide before it is binned into tiles; level-0 px of either scan are taken to
µm with the slide's µm/px (:meth:`Alignment.apply_px`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Alignment:
    """An affine map from truth to slide coordinates, in µm: ``slide = matrix @ truth + offset_um``.

    Use :meth:`from_offset_scale` for the common case (the IHC scan is shifted and maybe scaled),
    :meth:`from_affine` for a full 2x3/3x3 matrix and :meth:`from_landmarks` to fit one to matched points.
    """

    matrix: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))
    offset_um: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_offset_scale(
        cls,
        offset_um: Sequence[float] = (0.0, 0.0),
        scale: float | Sequence[float] = 1.0,
        rotation_deg: float = 0.0,
        shape: Any = None,
    ) -> Alignment:
        """Scale (one factor or (sx, sy)), rotate (anticlockwise on screen), then shift by ``offset_um``.

        ``shape`` is an optional 2x2 applied first (the stretch and shear an affine has beyond rotation and
        scale, see :meth:`to_offset_scale`).
        """
        sx, sy = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
        if sx <= 0 or sy <= 0:
            raise DataError(f"the alignment scale must be positive, got {scale}")
        m = _rotation(rotation_deg) @ np.diag([sx, sy])
        if shape is not None:
            k = np.asarray(shape, dtype=float)
            if k.shape != (2, 2) or not np.all(np.isfinite(k)) or abs(np.linalg.det(k)) < 1e-12:
                raise DataError(f"the alignment shape must be an invertible 2x2 matrix, got {k.tolist()}")
            m = m @ k
        return cls(_as_pair_of_pairs(m), (float(offset_um[0]), float(offset_um[1])))

    @classmethod
    def from_affine_px(cls, affine_px: Any, mpp: float) -> Alignment:
        """From a 3x3 (or 2x3) matrix mapping truth-scan level-0 px ``(x, y, 1)`` to slide level-0 px.

        Parameters
        ----------
        affine_px
            E.g. ``affine_px`` of ``he2rna align`` (:class:`~napari_he2rna.validation.align.AlignmentResult`).
        mpp
            The slide's µm per level-0 px: truth px and slide px are both taken to µm with it, as
            :meth:`apply_px` does.
        """
        a = np.asarray(affine_px, dtype=float)
        if a.shape == (2, 3):
            a = np.vstack([a, [0.0, 0.0, 1.0]])
        if a.shape != (3, 3):
            raise DataError(f"a pixel affine must be 2x3 or 3x3, got shape {a.shape}")
        s = np.diag([float(mpp), float(mpp), 1.0])
        return cls.from_affine(s @ a @ np.linalg.inv(s))

    def affine_px(self, mpp: float) -> np.ndarray:
        """The 3x3 acting on truth-scan level-0 px ``(x, y, 1)``, giving slide level-0 px (µm/px ``mpp``)."""
        s = np.diag([float(mpp), float(mpp), 1.0])
        return np.linalg.inv(s) @ self.affine @ s

    def to_offset_scale(self) -> tuple[tuple[float, float], float, float, np.ndarray]:
        """Split into :meth:`from_offset_scale`'s ``(offset_um, scale, rotation_deg, shape)``.

        ``scale`` is the square root of the determinant, ``rotation_deg`` the rotation of the polar
        decomposition (anticlockwise on screen) and ``shape`` what is left (2x2 of determinant ±1: stretch and
        shear), the identity for a pure rotation and scale: ``from_offset_scale(*a.to_offset_scale())``
        gives ``a`` back.
        """
        m = np.asarray(self.matrix, dtype=float)
        det = float(np.linalg.det(m))
        scale = math.sqrt(abs(det))
        u, _, vt = np.linalg.svd(m)
        r = u @ vt
        if np.linalg.det(r) < 0:  # a mirrored map: keep a proper rotation, the mirror goes into the shape
            r = u @ np.diag([1.0, -1.0]) @ vt
        rotation_deg = -math.degrees(math.atan2(r[1, 0], r[0, 0]))
        shape = _rotation(rotation_deg).T @ m / scale
        return (float(self.offset_um[0]), float(self.offset_um[1])), scale, rotation_deg, shape

    @classmethod
    def from_affine(cls, affine: Any) -> Alignment:
        """From a 2x3 or 3x3 affine matrix acting on (x, y, 1) in µm."""
        a = np.asarray(affine, dtype=float)
        if a.shape not in ((2, 3), (3, 3)) or not np.all(np.isfinite(a)):
            raise DataError(f"an alignment affine must be a finite 2x3 or 3x3 matrix, got shape {a.shape}")
        if abs(np.linalg.det(a[:2, :2])) < 1e-12:
            raise DataError("the alignment affine is singular (it squashes the truth onto a line)")
        return cls(_as_pair_of_pairs(a[:2, :2]), (float(a[0, 2]), float(a[1, 2])))

    @classmethod
    def from_landmarks(cls, truth_xy_um: Any, slide_xy_um: Any) -> Alignment:
        """Least-squares affine fit to matched landmarks, (K, 2) x/y in µm each, K >= 3."""
        src = np.asarray(truth_xy_um, dtype=float)
        dst = np.asarray(slide_xy_um, dtype=float)
        if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 3:
            raise DataError("landmarks must be two matching (K, 2) lists of x, y with at least 3 points")
        design = np.column_stack([src, np.ones(len(src))])
        coef, *_ = np.linalg.lstsq(design, dst, rcond=None)  # (3, 2)
        return cls.from_affine(coef.T)

    @property
    def affine(self) -> np.ndarray:
        """The 3x3 matrix acting on (x, y, 1) in µm."""
        a = np.eye(3)
        a[:2, :2] = self.matrix
        a[:2, 2] = self.offset_um
        return a

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.affine, np.eye(3)))

    @property
    def is_axis_aligned(self) -> bool:
        """True when the map only scales and shifts along x and y (no rotation or shear)."""
        m = np.asarray(self.matrix)
        return bool(abs(m[0, 1]) < 1e-12 and abs(m[1, 0]) < 1e-12)

    def inverse(self) -> Alignment:
        return Alignment.from_affine(np.linalg.inv(self.affine))

    def apply_um(self, xy_um: np.ndarray) -> np.ndarray:
        """Map (M, 2) truth x/y in µm to slide x/y in µm."""
        xy = np.asarray(xy_um, dtype=float).reshape(-1, 2)
        return xy @ np.asarray(self.matrix).T + np.asarray(self.offset_um)

    def apply_px(self, xy_px: np.ndarray, mpp: float) -> np.ndarray:
        """Map (M, 2) truth x/y in level-0 px to slide level-0 px (both at ``mpp`` µm/px)."""
        if self.is_identity:
            return np.asarray(xy_px, dtype=float).reshape(-1, 2)
        return self.apply_um(np.asarray(xy_px, dtype=float).reshape(-1, 2) * mpp) / mpp


def _rotation(rotation_deg: float) -> np.ndarray:
    """2x2 rotation that looks anticlockwise on screen by ``rotation_deg`` (y points down in images)."""
    t = np.deg2rad(-rotation_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _as_pair_of_pairs(m: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    return ((float(m[0, 0]), float(m[0, 1])), (float(m[1, 0]), float(m[1, 1])))
