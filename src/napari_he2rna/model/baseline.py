"""The linear baseline beside HE2RNA: ridge regression on the slide-mean feature, per gene.

What HEST-Benchmark and most expression-from-histology papers compare against: each slide is its mean tile
feature (standardised with the fold's training samples), each gene a ridge regression on it, its
regularisation chosen per gene by an inner patient-grouped cross-validation. It is trained on the same folds
as HE2RNA and saved as the same kind of bundle: a network without hidden layers (one linear layer applied
to every tile) whose slide prediction is the mean of its tile scores. Because the map is linear, that mean
is exactly the ridge prediction of the slide-mean feature, and applying it to each tile paints a heatmap
like any model.

The closed form (one SVD per fold and inner fold, every alpha at once) is written out with numpy rather
than scikit-learn's ``RidgeCV``: ``RidgeCV`` chooses alpha per target only by leave-one-out, which splits a
patient's slides between training and validation; here the inner folds are patient-grouped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..cohorts.cohort import Cohort, tile_mean
from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from .folds import cv_folds, group_folds
from .network import HE2RNA
from .scaling import FeatureScaler
from .training import CVResult, check_targets

#: Ridge penalties tried, as multiples of the number of training samples (features are standardised).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 4, 15))


@dataclass
class RidgeConfig:
    """Settings of the linear baseline."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    inner_folds: int = 3
    n_folds: int = 5
    seed: int = 0
    mode: str = "supertiles"  # how the cohort's features were loaded (the slide mean uses every tile)
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d["alphas"] = [float(a) for a in self.alphas]
        d["model"] = "ridge on the slide-mean feature, alpha per gene by inner grouped CV"
        return d


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray, x_eval: np.ndarray) -> np.ndarray:
    """Predictions ``(n_alphas, n_eval, n_genes)`` of ridge fits on centred ``x``/``y`` for every alpha."""
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)  # (r, G)
    xe = (x_eval - xm) @ vt.T  # (n_eval, r)
    d = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # (A, r)
    return np.einsum("er,ar,rg->aeg", xe, d, uty) + ym


def fit_ridge(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    strata: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    inner_folds: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge per gene with alpha chosen by an inner patient-grouped cross-validation.

    Parameters
    ----------
    x
        ``(n, d)`` standardised slide-mean features of the training samples.
    y
        ``(n, G)`` targets.
    groups, strata
        Patient and cancer type of each sample (the inner folds keep patients whole).
    alphas
        Penalties tried, as multiples of ``n``.

    Returns
    -------
    (coef, intercept, alpha)
        ``(d, G)``, ``(G,)`` and the chosen ``(G,)`` penalties (absolute).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = x.shape[0]
    grid = np.asarray(alphas, np.float64) * n
    n_groups = len(set(map(str, groups)))
    k = min(int(inner_folds), n_groups)
    err = np.zeros((len(grid), y.shape[1]))
    if k >= 2:
        inner = group_folds(strata, groups, k, seed)
        for f in range(k):
            tr, va = inner != f, inner == f
            pred = _ridge_path(x[tr], y[tr], grid * tr.mean(), x[va])  # same penalty per sample
            err += ((pred - y[va][None]) ** 2).sum(axis=1)
        best = grid[np.argmin(err, axis=0)]
    else:  # one patient: nothing to choose with; the middle of the grid
        best = np.full(y.shape[1], grid[len(grid) // 2])
    xm, ym = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    coef = np.zeros((x.shape[1], y.shape[1]))
    for a in np.unique(best):
        cols = best == a
        coef[:, cols] = vt.T @ ((s / (s**2 + a))[:, None] * uty[:, cols])
    intercept = ym - xm @ coef
    return coef, intercept, best


def linear_module(coef: np.ndarray, intercept: np.ndarray) -> HE2RNA:
    """A one-layer :class:`HE2RNA` (no hidden layer) computing ``x @ coef + intercept`` on every tile."""
    d, g = coef.shape
    m = HE2RNA(d, g, hidden=(), dropout=0.0)
    with torch.no_grad():
        m.layers[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(coef.T, dtype=np.float32))[:, :, None])
        m.layers[0].bias.copy_(torch.from_numpy(np.asarray(intercept, dtype=np.float32)))
    return m.eval()


def ridge_cross_validate(
    cohort: Cohort,
    config: RidgeConfig | None = None,
    folds: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> CVResult:
    """The linear baseline on the same patient-grouped folds as
    :func:`napari_he2rna.model.training.cross_validate`.

    Parameters
    ----------
    cohort
        From :func:`napari_he2rna.cohorts.cohort.match_cohort`; each sample's slide-mean feature is its mean
        over
        all tiles (:func:`napari_he2rna.cohorts.cohort.tile_mean`).
    folds
        Fold per sample (default: :func:`napari_he2rna.model.folds.cv_folds` with the config's seed: the same
        folds HE2RNA gets with the same seed and fold count).

    Returns
    -------
    CVResult
        ``model_type="ridge"``, ``aggregation="mean"``; its models take raw features, one linear layer each.
    """
    config = config or RidgeConfig()
    ids = cohort.sample_ids
    y = cohort.expression.to_numpy(np.float64)
    samples = cohort.samples.loc[ids]
    types = samples["cancer_type"].astype(str).to_numpy()
    patients = samples["patient_id"].astype(str).to_numpy()
    if folds is None:
        folds = cv_folds(samples, config.n_folds, config.seed)
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    means = np.stack([tile_mean(cohort.features, s) for s in ids])
    if not np.isfinite(means).all():
        raise DataError("Some slide features contain NaN or infinite values.")
    oof = np.full(y.shape, np.nan)
    models, scalers, histories = [], [], []
    for f in range(n_folds):
        check_cancel(cancel)
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        check_targets(y, cohort.genes, tr, f)
        scaler = FeatureScaler.fit([means[tr]])
        coef, intercept, alpha = fit_ridge(
            scaler.transform(means[tr]),
            y[tr],
            patients[tr],
            types[tr],
            config.alphas,
            config.inner_folds,
            config.seed + f,
        )
        oof[te] = scaler.transform(means[te]) @ coef + intercept
        model = linear_module(coef, intercept)
        scaler.fold_into(model)
        models.append(model)
        scalers.append(scaler)
        rel = alpha / len(tr)
        histories.append(
            {
                "fold": f,
                "criterion": "inner grouped CV (squared error)",
                "n_train": int(len(tr)),
                "alpha_per_sample_median": float(np.median(rel)),
                "alpha_per_sample_range": [float(rel.min()), float(rel.max())],
            }
        )
        report(progress, f + 1, n_folds, f"ridge fold {f + 1}/{n_folds} done")
    return CVResult(
        models=models,
        genes=cohort.genes,
        sample_ids=ids,
        cancer_types=types,
        folds=folds,
        oof=pd.DataFrame(oof.astype(np.float32), index=pd.Index(ids, name="sample_id"), columns=cohort.genes),
        histories=histories,
        config=config,
        scalers=scalers,
        model_type="ridge",
        aggregation="mean",
    )
