"""Is a slide like the slides a model learnt from? A feature reference, tile/slide distances, an assessment.

A model only means something on slides like its training slides. A slide from another scanner, stain or
tissue (or the bundled demo model, trained on synthetic slides, run on real H&E) gives tile features the
network never saw, and its outputs are then extrapolations: the demo model predicts T cells at -85
log10(1 + FPKM-UQ) on the real CMU-1 region. This module measures how far a slide's tile features are from
the training tiles and says so, and whether predictions leave the range of the training targets.

Fitting side (called by the training code)::

    builder = ReferenceBuilder()
    for feats in training_slides:          # (n_tiles, dim) raw backbone features, one slide at a time
        builder.add(feats)
    metadata[REFERENCE_KEY] = builder.finish()
    metadata[TARGET_RANGE_KEY] = target_range(expression)   # samples x genes training targets
    model.save_bundle(..., metadata=metadata)

Inference side: :func:`assess` (bundle, features, predictions) -> :class:`OODAssessment`, whose ``message``
is the one sentence the CLI, the viewer and the heatmap PNGs show. No Qt, no napari.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError

if TYPE_CHECKING:
    import pandas as pd

    from .bundle import ModelBundle

#: ``ModelBundle.metadata`` key of the feature reference (the dict from :meth:`ReferenceBuilder.finish`).
REFERENCE_KEY = "feature_reference"
#: ``ModelBundle.metadata`` key of the training targets' range (the dict from :func:`target_range`).
TARGET_RANGE_KEY = "target_range"

#: The distance definition written in the reference (``"distance"`` key).
DISTANCE_NAME = "rms_z"
REFERENCE_VERSION = 1

#: Column of the tile-score CSV holding :func:`tile_distance`.
DISTANCE_COLUMN = "feature_distance"

#: Units of :func:`tile_distance` (heatmap legends, CSV headers).
DISTANCE_UNITS = "RMS z-score to the training tiles"

#: Slide-level predictions may exceed the training targets' range by this fraction of its width before
#: they are flagged (a model shrinks towards the mean; a little overshoot on an extreme slide is normal).
RANGE_TOLERANCE = 0.1


# --------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------
class ReferenceBuilder:
    """Streaming fit of a feature reference, one training slide at a time.

    Per-feature moments are merged slide by slide (Chan et al.'s pairwise update in float64: the result
    equals the moments of all tiles stacked). For the thresholds, a seeded random subsample of at most
    ``tiles_per_slide`` tiles of each slide is kept, for at most ``max_slides`` slides (a seeded reservoir
    over slides), so memory stays bounded (256 x 64 x 2048 float32 = 128 MiB for ResNet50 features at
    most; a few MiB for the 33 ``hed-stats`` features).

    **Distance.** The distance of a tile is the root mean square of its per-feature z-scores,
    ``sqrt(mean_j ((x_j - mean_j) / s_j)^2)``, with ``s_j = max(std_j, std_floor)``, ``std_floor =
    floor_fraction * median_j(std_j)``. Why this one:

    * it is a diagonal Mahalanobis distance divided by ``sqrt(dim)``, so an in-distribution tile is near 1
      whatever the backbone (33 colour statistics or 2048 ResNet50 activations) and thresholds read alike;
    * a full-covariance Mahalanobis distance needs a ``dim x dim`` covariance: for 2048-d ResNet features
      that is 4M numbers to estimate from correlated tiles, singular without shrinkage, too large for a
      bundle header, and dominated by its smallest eigenvalues (noise directions) -- not robust;
    * ResNet features after the ReLU/pooling are often near-constant (a dead channel has std ~ 0); with a
      raw std their z-scores explode on any slide. The floor (10% of the median std) keeps one such channel
      from deciding alone, while a shift shared by many features still moves the RMS;
    * the hed-stats colour statistics have very different units (optical densities, fractions, gradient
      energies); z-scoring puts them on one scale.

    A slide's distance is the **median** of its tile distances: a few odd tiles (pen, folds, blur) do not
    move it, a slide of another stain or scanner (most tiles shifted) does.

    **Thresholds.** ``tile_threshold`` = the ``tile_quantile`` (99%) quantile of the kept training tiles'
    distances times ``margin``; ``slide_threshold`` = the ``slide_quantile`` (99%, i.e. about the largest
    for a few slides) quantile of the training slides' distances times ``margin``. A slide is outside when
    its distance is above ``slide_threshold`` or more than ``tile_fraction_limit`` of its tiles are above
    ``tile_threshold``.

    Parameters
    ----------
    tiles_per_slide, max_slides
        Bound on the tiles kept for the thresholds.
    seed
        Seeds the subsampling: the same slides in the same order give the same reference.
    tile_quantile, slide_quantile, margin, floor_fraction, tile_fraction_limit
        See above.
    """

    def __init__(
        self,
        tiles_per_slide: int = 64,
        max_slides: int = 256,
        seed: int = 0,
        tile_quantile: float = 0.99,
        slide_quantile: float = 0.99,
        margin: float = 1.5,
        floor_fraction: float = 0.1,
        tile_fraction_limit: float = 0.25,
    ) -> None:
        if tiles_per_slide < 1 or max_slides < 1:
            raise ValueError("tiles_per_slide and max_slides must be at least 1")
        if not (0 < tile_quantile <= 1 and 0 < slide_quantile <= 1):
            raise ValueError("the quantiles must be in (0, 1]")
        if margin < 1:
            raise ValueError("margin must be at least 1")
        self.tiles_per_slide = int(tiles_per_slide)
        self.max_slides = int(max_slides)
        self.seed = int(seed)
        self.tile_quantile = float(tile_quantile)
        self.slide_quantile = float(slide_quantile)
        self.margin = float(margin)
        self.floor_fraction = float(floor_fraction)
        self.tile_fraction_limit = float(tile_fraction_limit)
        self.dim: int | None = None
        self.n_tiles = 0
        self.n_slides = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._kept: list[np.ndarray] = []

    def add(self, tiles: np.ndarray) -> None:
        """Add one training slide's raw tile features ``(n_tiles, dim)``; a slide without tiles is skipped.

        Raises ``ValueError`` (one sentence) for a non-2-D array, another feature size than the first
        slide's, or non-finite values.
        """
        x = np.asarray(tiles)
        if x.ndim != 2:
            raise ValueError(f"tile features must be an (n_tiles, dim) array, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self.dim is None:
            self.dim = int(x.shape[1])
        elif x.shape[1] != self.dim:
            raise ValueError(f"this slide has {x.shape[1]} features per tile, the first slide had {self.dim}")
        x64 = x.astype(np.float64, copy=False)
        if not np.isfinite(x64).all():
            raise ValueError(f"slide {self.n_slides + 1} has non-finite tile features")
        n_b = x64.shape[0]
        mean_b = x64.mean(axis=0)
        m2_b = ((x64 - mean_b) ** 2).sum(axis=0)
        if self._mean is None:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n_a = self.n_tiles
            n = n_a + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.n_tiles += n_b

        index = self.n_slides
        self.n_slides += 1
        rng = np.random.default_rng([self.seed, index])
        k = min(n_b, self.tiles_per_slide)
        sample = np.asarray(x[np.sort(rng.choice(n_b, size=k, replace=False))], dtype=np.float32)
        if len(self._kept) < self.max_slides:
            self._kept.append(sample)
        else:  # reservoir over slides: every slide ends up kept with the same probability
            j = int(rng.integers(0, index + 1))
            if j < self.max_slides:
                self._kept[j] = sample

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("no training slide with tiles was added")
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof = 0) of every feature over all tiles added."""
        if self._m2 is None:
            raise ValueError("no training slide with tiles was added")
        return np.sqrt(np.maximum(self._m2 / self.n_tiles, 0.0))

    def finish(self) -> dict[str, Any]:
        """The JSON-able reference: moments, distance definition, thresholds and counts.

        Keys: ``version``, ``distance`` (``"rms_z"``), ``dim``, ``mean``, ``std`` (lists, raw feature space),
        ``std_floor``, ``tile_threshold``, ``slide_threshold``, ``tile_fraction_limit``,
        ``training_tile_quantile`` and ``training_slide_max`` (before the margin), ``training_slide_median``,
        ``margin``, ``tile_quantile``, ``slide_quantile``, ``n_slides``, ``n_tiles``, ``n_tiles_sampled``.
        """
        mean, std = self.mean, self.std
        positive = std[std > 0]
        floor = self.floor_fraction * float(np.median(positive)) if positive.size else 1.0
        floor = max(floor, 1e-12)
        ref: dict[str, Any] = {
            "version": REFERENCE_VERSION,
            "distance": DISTANCE_NAME,
            "dim": int(self.dim),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "std_floor": float(floor),
        }
        tile_d = [tile_distance(ref, s) for s in self._kept]
        all_d = np.concatenate(tile_d)
        slide_d = np.array([float(np.median(d)) for d in tile_d])
        tile_q = float(np.quantile(all_d, self.tile_quantile))
        slide_q = float(np.quantile(slide_d, self.slide_quantile))
        ref.update(
            tile_threshold=tile_q * self.margin,
            slide_threshold=slide_q * self.margin,
            tile_fraction_limit=self.tile_fraction_limit,
            training_tile_quantile=tile_q,
            training_slide_max=float(slide_d.max()),
            training_slide_median=float(np.median(slide_d)),
            margin=self.margin,
            tile_quantile=self.tile_quantile,
            slide_quantile=self.slide_quantile,
            n_slides=int(self.n_slides),
            n_tiles=int(self.n_tiles),
            n_tiles_sampled=int(all_d.size),
        )
        return ref


def fit_reference(slides: Iterable[np.ndarray], **kwargs: Any) -> dict[str, Any]:
    """A feature reference from training slides' tile features (see :class:`ReferenceBuilder`)."""
    builder = ReferenceBuilder(**kwargs)
    for tiles in slides:
        builder.add(tiles)
    return builder.finish()


def target_range(expression: pd.DataFrame) -> dict[str, list[float]]:
    """``{gene: [min, max]}`` of the training targets (samples x genes, log10(1 + FPKM-UQ)), JSON-able.

    Non-finite values are ignored; a gene without any finite value is left out.
    """
    values = np.asarray(expression.to_numpy(dtype=np.float64))
    finite = np.isfinite(values)
    lo = np.where(finite, values, np.inf).min(axis=0) if values.size else np.array([])
    hi = np.where(finite, values, -np.inf).max(axis=0) if values.size else np.array([])
    out: dict[str, list[float]] = {}
    for gene, a, b in zip(expression.columns, lo, hi, strict=True):
        if math.isfinite(a) and math.isfinite(b):
            out[str(gene)] = [float(a), float(b)]
    return out


# --------------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------------
def _moments(reference: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        if reference.get("distance", DISTANCE_NAME) != DISTANCE_NAME:
            raise ModelError(
                f"the feature reference uses the distance {reference.get('distance')!r}; this version knows "
                f"{DISTANCE_NAME!r}."
            )
        mean = np.asarray(reference["mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(reference["std"], dtype=np.float64).reshape(-1)
        floor = float(reference.get("std_floor", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"the feature reference is malformed ({exc!s}).") from None
    if mean.size == 0 or mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ModelError("the feature reference is malformed (its mean and std do not match).")
    return mean, np.maximum(std, max(floor, 1e-12))


def tile_distance(reference: Mapping[str, Any], features: np.ndarray) -> np.ndarray:
    """``(N,)`` float32 distance of every tile to the training tiles: RMS of per-feature z-scores.

    About 1 for a typical training tile; see :class:`ReferenceBuilder` for the definition. Raises
    :class:`~napari_he2rna.errors.ModelError` when the features do not have the reference's size.
    """
    mean, scale = _moments(reference)
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != mean.size:
        raise ModelError(
            f"the feature reference is for {mean.size} features per tile, these features have shape "
            f"{tuple(x.shape)}."
        )
    mean32, inv = mean.astype(np.float32), (1.0 / scale).astype(np.float32)
    out = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], 4096):  # bounded memory for 2048-d features
        z = (x[start : start + 4096] - mean32) * inv
        out[start : start + 4096] = np.sqrt(np.mean(z * z, axis=1))
    return out


def slide_distance(reference: Mapping[str, Any], features: np.ndarray) -> float:
    """A slide's distance to the training data: the median of its tile distances (NaN without tiles)."""
    d = tile_distance(reference, features)
    return float(np.median(d)) if d.size else float("nan")


# --------------------------------------------------------------------------------------------------------
# Assessment
# --------------------------------------------------------------------------------------------------------
@dataclass
class OODAssessment:
    """How a slide compares with a model's training data.

    ``outside`` is the one flag to warn on: the features are outside (``features_outside``) or slide-level
    predictions left the training targets' range (``out_of_range``). ``message`` is one sentence for people:
    the warning when ``outside``, else what was checked (or why nothing could be).
    """

    available: bool  # the bundle has a usable feature reference
    message: str
    tile_distances: np.ndarray | None = None
    slide_distance: float | None = None
    tile_threshold: float | None = None
    slide_threshold: float | None = None
    training_slide_max: float | None = None
    fraction_beyond: float | None = None  # of tiles above tile_threshold
    features_outside: bool = False
    range_checked: bool = False  # the bundle has training target ranges and predictions were checked
    out_of_range: dict[str, float] = field(default_factory=dict)  # gene -> prediction beyond the range
    target_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # of those genes

    @property
    def outside(self) -> bool:
        return bool(self.features_outside or self.out_of_range)

    @property
    def genes_out_of_range(self) -> list[str]:
        return list(self.out_of_range)

    @property
    def n_out_of_range(self) -> int:
        return len(self.out_of_range)

    def summary(self) -> dict[str, Any]:
        """Small key -> value facts for export headers."""
        if not self.available:
            out: dict[str, Any] = {"feature_check": "unavailable"}
        else:
            out = {
                "feature_distance": round(float(self.slide_distance), 3),
                "feature_slide_threshold": round(float(self.slide_threshold), 3),
                "tiles_beyond_threshold": f"{100 * float(self.fraction_beyond):.1f}%",
            }
        if self.range_checked:
            out["predictions_out_of_training_range"] = self.n_out_of_range
        out["outside_training_data"] = self.outside
        return out


def bundle_reference(bundle: ModelBundle) -> dict[str, Any] | None:
    """The bundle's feature reference, or None (older or converted bundles have none)."""
    ref = (getattr(bundle, "metadata", None) or {}).get(REFERENCE_KEY)
    return ref if isinstance(ref, Mapping) and ref else None


def bundle_target_range(bundle: ModelBundle) -> dict[str, tuple[float, float]]:
    """The bundle's ``{gene: (min, max)}`` training target range ({} when it has none)."""
    raw = (getattr(bundle, "metadata", None) or {}).get(TARGET_RANGE_KEY)
    out: dict[str, tuple[float, float]] = {}
    if isinstance(raw, Mapping):
        for gene, pair in raw.items():
            try:
                a, b = (float(v) for v in pair)
            except (TypeError, ValueError):
                continue
            if math.isfinite(a) and math.isfinite(b):
                out[str(gene)] = (min(a, b), max(a, b))
    return out


def _predictions_for(
    bundle: ModelBundle, features: np.ndarray, genes: list[str], positions: np.ndarray | None = None
) -> dict[str, float]:
    out: dict[str, float] = {}
    for start in range(0, len(genes), 512):  # bounded memory for models of 20,000 genes
        chunk = genes[start : start + 512]
        values = np.asarray(bundle.slide_prediction(features, chunk, positions), dtype=np.float64).reshape(-1)
        out.update(zip(chunk, (float(v) for v in values), strict=True))
    return out


def _fmt(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def assess(
    bundle: ModelBundle,
    features: np.ndarray,
    predictions: Mapping[str, float] | pd.Series | None = None,
    positions: np.ndarray | None = None,
) -> OODAssessment:
    """Compare a slide's tile features (and predictions) with the model's training data.

    Parameters
    ----------
    bundle
        The model; its ``metadata`` may hold :data:`REFERENCE_KEY` and :data:`TARGET_RANGE_KEY`.
    features
        ``(N, feature_dim)`` raw tile features of the slide (what the model is fed).
    predictions
        Slide-level predictions ``{gene: value}`` to check against the training targets' range; names
        that are not genes of the range (gene sets) are ignored. ``None``: the model's slide predictions of
        every gene with a range are computed here.
    positions
        The tile centres (level-0 px), which a model trained on supertiles needs for those predictions.

    Returns
    -------
    OODAssessment
        Never raises for a bundle without a reference or with a malformed one: the assessment then says the
        check is unavailable. Features of the wrong size still raise :class:`ModelError`.
    """
    ref = bundle_reference(bundle)
    ranges = bundle_target_range(bundle)
    feats = np.asarray(features, dtype=np.float32)
    result = OODAssessment(available=False, message="")
    reason = "the model bundle has no feature reference (it predates the check or was converted)"
    if ref is not None:
        try:
            d = tile_distance(ref, feats)
            tile_thr = float(ref["tile_threshold"])
            slide_thr = float(ref["slide_threshold"])
            limit = float(ref.get("tile_fraction_limit", 0.25))
        except ModelError as exc:
            if feats.ndim == 2 and feats.shape[1] != int(getattr(bundle, "feature_dim", feats.shape[1])):
                raise
            reason = str(exc).rstrip(".")
        except (KeyError, TypeError, ValueError) as exc:
            reason = f"the model's feature reference is malformed ({exc!s})"
        else:
            sd = float(np.median(d)) if d.size else float("nan")
            frac = float(np.mean(d > tile_thr)) if d.size else 0.0
            result.available = True
            result.tile_distances = d
            result.slide_distance = sd
            result.tile_threshold = tile_thr
            result.slide_threshold = slide_thr
            result.training_slide_max = float(ref.get("training_slide_max", slide_thr))
            result.fraction_beyond = frac
            result.features_outside = bool(d.size and (sd > slide_thr or frac > limit))

    if ranges:
        if predictions is None:
            genes = [g for g in getattr(bundle, "genes", []) if g in ranges]
            preds = _predictions_for(bundle, feats, genes, positions) if genes and feats.shape[0] else {}
        else:
            preds = {str(k): float(v) for k, v in dict(predictions).items()}
        result.range_checked = True
        for gene, value in preds.items():
            if gene not in ranges or not math.isfinite(value):
                continue
            lo, hi = ranges[gene]
            tol = RANGE_TOLERANCE * max(hi - lo, 1e-6)
            if value < lo - tol or value > hi + tol:
                result.out_of_range[gene] = value
                result.target_ranges[gene] = (lo, hi)

    result.message = _message(result, reason)
    return result


def _message(r: OODAssessment, reason: str) -> str:
    parts = []
    if r.features_outside:
        if r.slide_distance is not None and r.slide_distance > (r.slide_threshold or 0):
            parts.append(
                "this slide's features are outside the model's training data: its scores are not "
                f"predictions (distance {_fmt(r.slide_distance)}, training slides up to "
                f"{_fmt(r.training_slide_max)})"
            )
        else:
            parts.append(
                f"{100 * r.fraction_beyond:.0f}% of this slide's tiles have features outside the model's "
                f"training data: their scores are not predictions (slide distance "
                f"{_fmt(r.slide_distance)}, training slides up to {_fmt(r.training_slide_max)})"
            )
    if r.out_of_range:
        genes = list(r.out_of_range)
        g = genes[0]
        lo, hi = r.target_ranges[g]
        shown = ", ".join(genes[:3]) + (f" and {len(genes) - 3} more" if len(genes) > 3 else "")
        noun = "gene" if len(genes) == 1 else "genes"
        text = (
            f"predictions of {len(genes)} {noun} ({shown}) are outside the range of the training targets "
            f"(e.g. {g} {_fmt(r.out_of_range[g])}, trained on {_fmt(lo)} to {_fmt(hi)})"
        )
        parts.append(text if r.features_outside else text + ": they are not predictions")
    if parts:
        return "; ".join(parts) + "."
    if r.available:
        return (
            f"this slide's features are within the model's training data (distance "
            f"{_fmt(r.slide_distance)}, training slides up to {_fmt(r.training_slide_max)})."
        )
    if r.range_checked:
        return f"the training-data check of features is unavailable: {reason}; predictions are in range."
    return f"the training-data check is unavailable: {reason}."
