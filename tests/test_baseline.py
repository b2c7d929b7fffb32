"""The linear baseline: ridge on slide-mean features, same folds as HE2RNA, saved and painted like a model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.cohorts.cohort import load_expression, load_samples, match_cohort
from napari_he2rna.errors import DataError
from napari_he2rna.model.baseline import fit_ridge
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.cohort_prediction import bundle_oof_predictions
from napari_he2rna.model.fitting import fit
from napari_he2rna.model.folds import cv_folds
from napari_he2rna.model.training import TrainConfig, bundle_metadata


def linear_cohort(n_patients=60, dim=12, seed=0):
    """Each gene a linear function of the slide-mean feature (plus noise); CTRL genes noise only."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    rows, feats, expr = [], {}, []
    for p in range(n_patients):
        for s in range(1 + (p % 4 == 0)):
            sid = f"S{p:03d}_{s}"
            x = rng.normal(size=(int(rng.integers(8, 30)), dim)).astype(np.float32) * 3 + rng.normal(size=dim)
            m = x.mean(axis=0)
            expr.append(
                pd.Series(
                    {
                        "LIN1": 3 + m @ w + rng.normal(0, 0.3),
                        "LIN2": 2 - 0.5 * m[0] + rng.normal(0, 0.1),
                        "CTRL": 1 + rng.normal(0, 0.3),
                    },
                    name=sid,
                )
            )
            feats[sid] = x
            rows.append({"sample_id": sid, "patient_id": f"P{p:03d}", "cancer_type": "AB"[p % 2]})
    expression = load_expression(pd.DataFrame(expr), transform="log", filter_zero_median=False)
    return match_cohort(expression, load_samples(pd.DataFrame(rows)), feats)[0]


def test_ridge_recovers_a_linear_signal_and_chooses_alpha_by_grouped_cv():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 20))
    y = np.stack([x @ rng.normal(size=20), rng.normal(size=80)], 1)
    groups = np.repeat(np.arange(40), 2).astype(str)
    coef, intercept, alpha = fit_ridge(x, y, groups, np.zeros(80, str))
    assert np.corrcoef(x @ coef[:, 0] + intercept[0], y[:, 0])[0, 1] > 0.99
    assert alpha[1] > alpha[0]  # the noise gene is shrunk harder


def test_baseline_on_the_same_folds_saved_as_a_bundle_paints_tiles_linearly(tmp_path):
    cohort = linear_cohort()
    config = TrainConfig(n_folds=4, seed=3)
    result = fit(cohort, "ridge", config)
    np.testing.assert_array_equal(result.folds, cv_folds(cohort.samples.loc[cohort.sample_ids], 4, 3))
    r = {g: np.corrcoef(cohort.expression[g], result.oof[g])[0, 1] for g in cohort.genes}
    assert r["LIN1"] > 0.9 and r["LIN2"] > 0.9 and abs(r["CTRL"]) < 0.4
    meta = bundle_metadata(result, cohort)
    path = save_bundle(
        tmp_path / "ridge.safetensors",
        result.models,
        cohort.genes,
        "bb",
        12,
        112.0,
        (1,),
        meta,
        aggregation="mean",
    )
    bundle = load_bundle(path)
    assert bundle.aggregation == "mean" and bundle.hidden == ()
    # out-of-fold predictions come back from the bundle, from raw features
    pred, folds = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_allclose(pred.to_numpy(), result.oof.to_numpy(), rtol=1e-4, atol=1e-4)
    # a tile's score is the linear map of that tile's features; the slide is the mean of its tiles
    tiles = cohort.features[cohort.sample_ids[0]]
    w = np.mean([f[0][0].numpy() for f in bundle.layers], axis=0)  # (G, dim), folds averaged
    b = np.mean([f[0][1].numpy() for f in bundle.layers], axis=0)
    np.testing.assert_allclose(bundle.tile_scores(tiles), tiles @ w.T + b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        bundle.slide_prediction(tiles), bundle.tile_scores(tiles).mean(axis=0), rtol=1e-5
    )


def test_baseline_cannot_be_fine_tuned():
    cohort = linear_cohort(n_patients=12)
    with pytest.raises(DataError, match="cannot be fine-tuned"):
        fit(cohort, "ridge", TrainConfig(n_folds=3), initial_models=[object()] * 3)
    with pytest.raises(DataError, match="Unknown model type"):
        fit(cohort, "forest", TrainConfig(n_folds=3))
