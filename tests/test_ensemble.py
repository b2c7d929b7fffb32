"""The default model of ``he2rna train`` (``--model-type ensemble``): HE2RNA and its linear baseline trained
on the same folds and averaged tile by tile (model/blend.py, model/fitting.py, model/gene_comparison.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import FAST, make_planted_cohort

from napari_he2rna.model.blend import Blend
from napari_he2rna.model.bundle import load_bundle
from napari_he2rna.model.cohort_prediction import bundle_oof_predictions
from napari_he2rna.model.fitting import fit, save_result
from napari_he2rna.model.gene_comparison import (
    HE2RNA_NAME,
    LINEAR_NAME,
    compare_genes,
    comparison_markdown,
    null_strength_notes,
    per_type_r,
)
from napari_he2rna.model.mixed import BLEND_NAME
from napari_he2rna.model.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ensemble():
    torch.set_num_threads(1)
    cohort = make_planted_cohort(n_patients=60)
    config = TrainConfig(max_epochs=15, patience=10, **FAST)
    return cohort, config, fit(cohort, "ensemble", config)


def test_the_ensemble_predicts_held_out_samples_with_the_mean_of_both_fold_models(ensemble):
    cohort, config, result = ensemble
    he2rna = fit(cohort, "he2rna", config)  # the same folds and seeds: the same fold models
    ridge = fit(cohort, "ridge", config, folds=he2rna.folds)
    assert result.model_type == "ensemble" and len(result.linear_models) == len(result.models)
    np.testing.assert_array_equal(result.folds, he2rna.folds)
    # a held-out sample: HE2RNA's aggregation (top-k means over the k list) of the blended tile scores
    sid = cohort.sample_ids[0]
    f = int(result.folds[0])
    x = torch.from_numpy(np.asarray(cohort.features[sid]).T[None].astype(np.float32))
    with torch.no_grad():
        tiles = Blend(result.models[f], result.linear_models[f])(x)[0].numpy()  # (G, N)
        mlp = he2rna.models[f](x)[0].numpy()
        lin = ridge.models[f](x)[0].numpy()
    np.testing.assert_allclose(tiles, 0.5 * mlp + 0.5 * lin, rtol=1e-5, atol=1e-5)
    desc = -np.sort(-tiles, axis=1)
    want = np.mean([desc[:, : min(k, tiles.shape[1])].mean(axis=1) for k in config.k_list], axis=0)
    np.testing.assert_allclose(result.oof.loc[sid].to_numpy(), want, rtol=1e-4, atol=1e-5)
    # both models' own out-of-fold predictions travel with it, and every gene's R for the three
    pd.testing.assert_frame_equal(result.comparison.oof_he2rna, he2rna.oof)
    table = result.comparison.table().set_index("gene")
    assert table.loc["PLANT1", "r_ensemble"] > 0.5 and table.loc["PLANT1", "r_linear"] > 0.5


def test_the_saved_ensemble_reproduces_its_out_of_fold_predictions(ensemble, tmp_path):
    cohort, _, result = ensemble
    path = save_result(result, cohort, tmp_path / "e.safetensors", "test-bb", 112.0)
    bundle = load_bundle(path)
    assert bundle.linear_weight == 0.5 and bundle.linear_genes == cohort.genes
    assert bundle.model_of("PLANT1") == BLEND_NAME
    assert set(bundle.metadata["gene_models"]["genes"]) == set(cohort.genes)
    pred, folds = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_array_equal(folds, result.folds)
    np.testing.assert_allclose(pred.to_numpy(), result.oof.to_numpy(), rtol=1e-4, atol=1e-5)


def test_the_headline_says_where_the_linear_baseline_alone_is_better():
    rng = np.random.default_rng(0)
    idx = pd.Index([f"s{i}" for i in range(30)])
    types = np.array(["T1", "T2", "T3"] * 10)
    y = pd.DataFrame(rng.normal(size=(30, 3)), index=idx, columns=["A", "B", "C"])
    noise = pd.DataFrame(rng.normal(size=(30, 3)), index=idx, columns=y.columns)
    lin = y + noise * [0.2, 3.0, 1.0]  # A: linear right; B: linear noise
    mlp = y + noise * [3.0, 0.2, 1.0]
    comp = compare_genes(y, mlp, lin, (mlp + lin) / 2, types)
    assert list(comp.linear_better) == [True, False, False]  # C: a tie goes to HE2RNA
    text = comp.headline()
    assert "better than HE2RNA on this cohort for 1 of 3 genes" in text and "--model-type ridge" in text
    table = comp.table().set_index("gene")
    assert table.loc["A", "best"] in (LINEAR_NAME, "ensemble") and table.loc["B", "best"] != LINEAR_NAME
    assert "| A |" in comparison_markdown(comp)
    same = compare_genes(y, mlp, mlp, mlp, types)
    assert same.headline().startswith(f"{HE2RNA_NAME} is at least as good")


def test_per_type_r_leaves_out_tiny_types_and_null_notes_name_the_r_needed():
    y = np.arange(12, dtype=float).reshape(6, 2) ** 1.5
    pred = y + np.array([[0.1, -0.1]] * 6)
    r = per_type_r(y, pred, np.array(["A"] * 4 + ["B"] * 2))  # B (2 samples) is left out
    np.testing.assert_allclose(r, per_type_r(y[:4], pred[:4], np.array(["A"] * 4)))
    assert np.isnan(per_type_r(y[:2], pred[:2], np.array(["A", "B"]))).all()
    notes = null_strength_notes(pd.DataFrame({"cancer_type": ["T1", "T2"], "null_r_q99": [0.66, 0.31]}))
    assert len(notes) == 1 and notes[0].startswith("T1") and "R of about 0.66" in notes[0]


def test_another_linear_weight_travels_to_the_bundle(ensemble, tmp_path):
    cohort, config, _ = ensemble
    result = fit(cohort, "ensemble", config, linear_weight=0.75)
    assert result.linear_weight == 0.75
    bundle = load_bundle(save_result(result, cohort, tmp_path / "w.safetensors", "test-bb", 112.0))
    assert bundle.linear_weight == 0.75 and "0.25 x HE2RNA's + 0.75 x" in bundle.describe()
    pred, _ = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_allclose(pred.to_numpy(), result.oof.to_numpy(), rtol=1e-4, atol=1e-5)


def _tile_gap(models, linear_models, cohort) -> float:
    """Mean squared difference between the fold models' and the linear fold models' tile scores."""
    gaps = []
    for m, lin in zip(models, linear_models, strict=True):
        for sid in cohort.sample_ids[:40]:
            x = torch.from_numpy(np.asarray(cohort.features[sid]).T[None].astype(np.float32))
            with torch.no_grad():
                gaps.append(float(((m.eval()(x) - lin.eval()(x)) ** 2).mean()))
    return float(np.mean(gaps))


def test_the_anchor_holds_he2rna_tile_scores_near_the_linear_map(ensemble, tmp_path):
    cohort, config, ens = ensemble
    plain = fit(cohort, "he2rna", config)
    anchored = fit(cohort, "he2rna", replace(config, anchor=1.0))
    ridge = fit(cohort, "ridge", config, folds=plain.folds)
    np.testing.assert_array_equal(anchored.folds, plain.folds)
    # tile by tile, the anchored fold models are closer to the linear maps than the paper's HE2RNA, the
    # more so the stronger the anchor
    strong = fit(cohort, "he2rna", replace(config, anchor=10.0))
    gaps = [_tile_gap(r.models, ridge.models, cohort) for r in (plain, anchored, strong)]
    assert gaps[2] < gaps[1] < 0.8 * gaps[0]
    # and they learn the slide means (here faster than the paper's HE2RNA, still near R 0 at 15 epochs)
    r = [np.corrcoef(m.oof["PLANT1"], cohort.expression["PLANT1"])[0, 1] for m in (plain, anchored)]
    assert r[1] > 0.3 and r[1] > r[0]
    # the bundle is a plain HE2RNA bundle that says how it was trained
    path = save_result(anchored, cohort, tmp_path / "anchored.safetensors", "test", 112.0)
    bundle = load_bundle(path)
    assert not bundle.linear_genes and bundle.metadata["training"]["anchor"] == 1.0
    assert "held near the linear baseline's map in training (anchor 1" in bundle.describe()
    # without an anchor the training record has no anchor key (earlier checkpoints keep their key)
    assert "anchor" not in config.fingerprint()


def test_an_anchor_needs_the_linear_fold_models_and_is_not_negative(ensemble):
    from napari_he2rna.errors import DataError
    from napari_he2rna.model.training import cross_validate

    cohort, config, _ = ensemble
    with pytest.raises(DataError, match="needs its 3 fold models"):
        cross_validate(cohort, replace(config, anchor=1.0))
    with pytest.raises(DataError, match="0 or more"):
        TrainConfig(anchor=-1.0)
