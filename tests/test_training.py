"""Cohort data, patient-grouped cross-validation, standardisation, the validation criterion and HE2RNA
training on a planted cohort."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.cohorts.cohort import load_expression, load_samples, match_cohort
from napari_he2rna.errors import Cancelled, DataError
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.cohort_prediction import bundle_oof_predictions
from napari_he2rna.model.evaluation import evaluate
from napari_he2rna.model.folds import choose_criterion, cv_folds, validation_split
from napari_he2rna.model.training import (
    TrainConfig,
    bundle_metadata,
    cross_validate,
    fold_scalers,
    untrained_predictions,
)

PLANTED = ["PLANT1", "PLANT2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_planted_cohort(n_patients=150, dim=16, n_ctrl=12, seed=0):
    """Slides of 10-20 tiles; a random fraction of "hot" tiles carry +3 on feature 0.

    PLANT genes = their slide's fraction of hot tiles (plus noise): what the top-k aggregation can learn.
    CTRL genes = noise, independent of the slide. Cancer type B is shifted by +0.5 everywhere (per-type R
    must not see it). A third of the patients have two samples.
    """
    rng = np.random.default_rng(seed)
    rows, feats, expr = [], {}, []
    for p in range(n_patients):
        ctype = "A" if p % 2 == 0 else "B"
        for s in range(1 + (p % 3 == 0)):
            sid = f"S{p:03d}_{s}"
            n = int(rng.integers(10, 21))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            hot = rng.random(n) < rng.uniform(0.0, 0.6)
            x[hot, 0] += 3.0
            e = {
                "PLANT1": 1 + 2 * hot.mean() + rng.normal(0, 0.1),
                "PLANT2": 2 + 1.5 * hot.mean() + rng.normal(0, 0.1),
            }
            e.update({f"CTRL{j}": 1 + 0.1 * j + rng.normal(0, 0.3) for j in range(n_ctrl)})
            if ctype == "B":
                e = {k: v + 0.5 for k, v in e.items()}
            rows.append({"sample_id": sid, "patient_id": f"P{p:03d}", "cancer_type": ctype})
            feats[sid] = x
            expr.append(pd.Series(e, name=sid))
    expression = load_expression(pd.DataFrame(expr), transform="log")
    return match_cohort(expression, load_samples(pd.DataFrame(rows)), feats)[0]


FAST = dict(hidden=(16,), ks=(1, 2, 5, 10, 20), lr=3e-3, val_fraction=0.2, n_folds=3, seed=0)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    cohort = make_planted_cohort()
    config = TrainConfig(max_epochs=30, patience=10, **FAST)
    result = cross_validate(cohort, config)
    return cohort, config, result


# ------------------------------------------------------------------------------------------ tables


def test_load_expression_raw_fpkm_is_filtered_and_logged(tmp_path):
    table = pd.DataFrame(
        {
            "sample": ["s1", "s2", "s3"],
            "GENE_A": [0.0, 100.0, 999.0],
            "ZERO_MEDIAN": [0.0, 0.0, 80.0],
            "GENE_B": [9.0, 3.0, 1.0],
        }
    )
    table.to_csv(tmp_path / "expr.tsv", sep="\t", index=False)
    expr = load_expression(tmp_path / "expr.tsv")  # auto: 999 > 50 -> raw FPKM-UQ
    assert list(expr.columns) == ["GENE_A", "GENE_B"] and list(expr.index) == ["s1", "s2", "s3"]
    np.testing.assert_allclose(expr["GENE_A"], np.log10([1.0, 101.0, 1000.0]), rtol=1e-6)
    assert expr.attrs["n_genes_dropped_zero_median"] == 1 and expr.attrs["transform"] == "log10(1+x)"
    # genes x samples, CSV, already log
    small = pd.DataFrame({"gene": ["G1", "G2"], "s1": [1.5, 0.0], "s2": [2.0, 0.0], "s3": [0.5, 0.1]})
    small.to_csv(tmp_path / "expr.csv", index=False)
    logged = load_expression(tmp_path / "expr.csv", genes_as_rows=True)
    assert list(logged.columns) == ["G1"] and logged.loc["s2", "G1"] == pytest.approx(2.0)


def test_load_expression_errors(tmp_path):
    pd.DataFrame({"s": ["a", "a"], "G": [1, 2]}).to_csv(tmp_path / "dup.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match="more than once"):
        load_expression(tmp_path / "dup.tsv")
    pd.DataFrame({"s": ["a", "b"], "G": [1, 2], "note": ["x", "y"]}).to_csv(
        tmp_path / "txt.tsv", sep="\t", index=False
    )
    with pytest.raises(DataError, match="non-numeric"):
        load_expression(tmp_path / "txt.tsv")
    pd.DataFrame({"s": ["a", "b"], "G": [-1.0, 200.0]}).to_csv(tmp_path / "neg.tsv", sep="\t", index=False)
    with pytest.raises(DataError, match="negative"):
        load_expression(tmp_path / "neg.tsv")
    with pytest.raises(DataError, match="does not exist"):
        load_expression(tmp_path / "missing.tsv")


def test_sample_sheet_and_matching_report(tmp_path):
    sheet = pd.DataFrame(
        {
            "Sample_ID": ["a", "b", "c"],
            "patient_id": ["p1", "p1", "p2"],
            "cancer_type": ["BRCA"] * 3,
            "slide": ["a.svs", "b.svs", "/abs/c.svs"],
        }
    )
    sheet.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    samples = load_samples(tmp_path / "samples.tsv")
    assert samples.loc["a", "slide"] == str(tmp_path / "a.svs") and samples.loc["c", "slide"] == "/abs/c.svs"
    expr = pd.DataFrame({"G": [1.0, 2.0, 3.0]}, index=["a", "b", "z"])
    cohort, report = match_cohort(expr, samples, {"a": np.zeros((3, 2)), "c": np.zeros((3, 2))})
    assert cohort.sample_ids == ["a"]
    assert report.expression_only == ["z"] and report.sheet_only == ["c"] and report.without_features == ["b"]
    assert "without features: b" in report.summary()
    with pytest.raises(DataError, match="No sample"):
        match_cohort(expr, samples, {})
    with pytest.raises(DataError, match="cancer_type"):
        load_samples(pd.DataFrame({"sample_id": ["a"], "patient_id": ["p"]}))


def test_folds_never_split_a_patient_and_spread_cancer_types():
    rng = np.random.default_rng(0)
    patients = [f"P{i}" for i in range(60) for _ in range(int(rng.integers(1, 4)))]
    ptype = {f"P{i}": ["BRCA", "LIHC", "COAD"][i % 3] for i in range(60)}
    samples = pd.DataFrame(
        {"patient_id": patients, "cancer_type": [ptype[p] for p in patients]},
        index=[f"s{i}" for i in range(len(patients))],
    )
    folds = cv_folds(samples, 5, seed=1)
    assert set(folds) == set(range(5))
    assert (samples.assign(f=folds).groupby("patient_id")["f"].nunique() == 1).all()
    counts = pd.crosstab(samples["cancer_type"], folds)
    assert (counts > 0).all().all()  # every type in every fold
    np.testing.assert_array_equal(folds, cv_folds(samples, 5, seed=1))
    val = validation_split(samples[folds != 0], 0.1, seed=0)
    sub = samples[folds != 0].assign(v=val)
    assert 0 < val.mean() < 0.25
    assert (sub.groupby("patient_id")["v"].nunique() == 1).all()
    with pytest.raises(DataError, match="patients"):
        cv_folds(samples.iloc[:3], 5)


# ------------------------------------------------------------------------------------------ training


def test_training_beats_untrained_null_for_planted_genes_only(trained):
    cohort, config, result = trained
    assert len(result.models) == 3 and result.oof.shape == cohort.expression.shape
    assert not result.oof.isna().any().any()
    # each sample is predicted by the model of the fold that held it out
    for f in range(3):
        assert set(result.fold_predictions(f).index) == set(np.array(cohort.sample_ids)[result.folds == f])
    null = untrained_predictions(cohort, config.hidden, n_inits=50, ks=config.k_list)
    ev = evaluate(cohort.expression, result.oof, result.cancer_types, result.folds, null)
    pg = ev.per_gene.set_index(["cancer_type", "gene"])
    for t in ("A", "B"):
        for g in PLANTED:
            assert pg.loc[(t, g), "significant_bh"], (t, g, pg.loc[(t, g), "r"])
            assert pg.loc[(t, g), "r"] > 0.5
            assert pg.loc[(t, g), "steiger_z"] > 0  # trained beats the untrained init it is compared with
        controls = pg.loc[t].drop(index=PLANTED)
        assert not controls["significant"].any()
        assert controls["r"].abs().max() < 0.5


def test_bundle_of_cv_result_reproduces_out_of_fold_predictions(trained, tmp_path):
    cohort, config, result = trained
    meta = bundle_metadata(result, cohort)
    assert meta["cohort"]["n_patients"] == 150 and set(meta["validation_r"]) == {"A", "B"}
    path = save_bundle(
        tmp_path / "m.safetensors", result.models, cohort.genes, "test-bb", 16, 112.0, config.k_list, meta
    )
    bundle = load_bundle(path)
    pred, folds = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_array_equal(folds, result.folds)
    np.testing.assert_allclose(pred.to_numpy(), result.oof.to_numpy(), rtol=1e-4, atol=1e-5)
    assert bundle.metadata["validation_r"]["A"]["PLANT1"] > 0.5


def test_training_is_deterministic_resumable_and_cancellable(tmp_path):
    cohort = make_planted_cohort(n_patients=30, n_ctrl=2)
    config = TrainConfig(max_epochs=3, patience=2, **FAST)
    seen = []
    a = cross_validate(cohort, config, progress=lambda d, t, m: seen.append((d, t)), checkpoint_dir=tmp_path)
    assert seen[-1] == (9, 9) and all(d1 <= d2 for (d1, _), (d2, _) in zip(seen, seen[1:], strict=False))
    b = cross_validate(cohort, config)
    np.testing.assert_array_equal(a.oof.to_numpy(), b.oof.to_numpy())
    assert len(list(tmp_path.glob("fold*.safetensors"))) == 3
    stop = threading.Event()
    stop.set()
    # every fold is checkpointed: resuming needs no training, so even a set cancel token completes
    c = cross_validate(cohort, config, cancel=stop, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(a.oof.to_numpy(), c.oof.to_numpy())
    assert all(h.get("resumed") for h in c.histories)
    with pytest.raises(Cancelled):
        cross_validate(cohort, config, cancel=stop)
    # other settings do not reuse the checkpoints
    other = cross_validate(
        cohort, TrainConfig(max_epochs=3, patience=2, **{**FAST, "seed": 1}), checkpoint_dir=tmp_path
    )
    assert not any(h.get("resumed") for h in other.histories)


def test_full_tile_mode_with_variable_tile_counts():
    cohort = make_planted_cohort(n_patients=24, n_ctrl=2)
    calls = []
    lazy = dict(cohort.features)

    def load(sid):  # a callable source, as for full tiles read from the cache on demand
        calls.append(sid)
        return lazy[sid]

    cohort2, _ = match_cohort(cohort.expression, cohort.samples, load)
    config = TrainConfig(mode="tiles", max_epochs=2, patience=5, **{**FAST, "ks": None})
    assert config.batch == 4 and config.k_list[-1] == 5000
    result = cross_validate(cohort2, config)
    assert np.isfinite(result.oof.to_numpy()).all()
    assert len(calls) > len(cohort.sample_ids)  # loaded per batch, not kept


def test_bad_features_are_reported():
    cohort = make_planted_cohort(n_patients=12, n_ctrl=1)
    sid = cohort.sample_ids[3]
    cohort.features[sid] = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(DataError, match="dimensions"):
        cross_validate(cohort, TrainConfig(max_epochs=1, **FAST))
    cohort.features[sid] = np.full((5, 16), np.nan, dtype=np.float32)
    with pytest.raises(DataError, match="NaN"):
        cross_validate(cohort, TrainConfig(max_epochs=1, **FAST))


# ----------------------------------------------------------------------------- validation and scaling


def test_validation_criterion_is_always_defined():
    assert choose_criterion(["A"] * 5 + ["B"] * 5, ["A", "B"]) == "per-type R"
    assert choose_criterion(["A"] * 5 + ["B"] * 2, ["A", "B"]) == "pooled R"
    assert choose_criterion(["A"] * 5, ["A", "B"]) == "pooled R"  # B trained on but never validated
    assert choose_criterion(["A", "B", "C"], ["A", "B", "C"]) == "loss"
    assert choose_criterion([], ["A"]) == "none"


def test_one_validation_sample_per_type_still_early_stops_on_a_real_score():
    """The bug this guards against: 1-2 validation samples per type gave a NaN per-type R every epoch, so
    the first epoch's weights were restored and saved (an untrained model, silently)."""
    cohort = make_planted_cohort(n_patients=150, n_ctrl=2)
    config = TrainConfig(max_epochs=30, patience=30, **{**FAST, "val_fraction": 0.05})
    result = cross_validate(cohort, config)
    for h in result.histories:
        assert h["criterion"] in ("pooled R", "loss")  # 5 to 9 validation samples in 2 types
        assert h["n_val"] < 10
        assert all(v is not None and np.isfinite(v) for v in h["val_scores"])
        assert h["epochs_run"] == 30
    assert max(h["best_epoch"] for h in result.histories) > 0  # it learnt past epoch 1
    types = cohort.samples.loc[cohort.sample_ids, "cancer_type"].to_numpy()
    for t in ("A", "B"):
        sel = types == t
        r = [np.corrcoef(cohort.expression[g][sel], result.oof[g][sel])[0, 1] for g in PLANTED]
        assert min(r) > 0.5, (t, r)


def test_scaler_is_fitted_on_training_folds_only():
    cohort = make_planted_cohort(n_patients=30, n_ctrl=1)
    ids = cohort.sample_ids
    folds = cv_folds(cohort.samples.loc[ids], 3, seed=0)
    before = fold_scalers(cohort.features, ids, folds)
    held_out = ids[int(np.flatnonzero(folds == 0)[0])]
    changed = dict(cohort.features)
    changed[held_out] = changed[held_out] * 100 + 1000  # a wildly different held-out slide
    after = fold_scalers(changed, ids, folds)
    np.testing.assert_array_equal(before[0].mean, after[0].mean)  # fold 0 never saw it
    np.testing.assert_array_equal(before[0].std, after[0].std)
    assert not np.allclose(before[1].mean, after[1].mean)  # the folds that train on it did


def test_bundle_records_the_fold_scalers_and_takes_raw_features(trained, tmp_path):
    cohort, config, result = trained
    meta = bundle_metadata(result, cohort)
    scalers = meta["input_standardization"]["folds"]
    assert len(scalers) == 3 and len(scalers[0]["mean"]) == 16
    assert meta["training"]["validation_criteria"] == [h["criterion"] for h in result.histories]
    # a model trained on standardised inputs, saved, reproduces its OOF predictions on raw features
    path = save_bundle(
        tmp_path / "m.safetensors", result.models, cohort.genes, "test-bb", 16, 112.0, config.k_list, meta
    )
    bundle = load_bundle(path)
    pred, _ = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_allclose(pred.to_numpy(), result.oof.to_numpy(), rtol=1e-4, atol=1e-5)


def test_constant_gene_and_tiny_cancer_type_are_refused():
    cohort = make_planted_cohort(n_patients=20, n_ctrl=1)
    const = cohort.expression.copy()
    const["CTRL0"] = 1.0
    c2, _ = match_cohort(const, cohort.samples, cohort.features)
    with pytest.raises(DataError, match="constant over the training samples"):
        cross_validate(c2, TrainConfig(max_epochs=1, **FAST))
    samples = cohort.samples.copy()
    samples.loc[samples.index[0], "cancer_type"] = "RARE"
    c3, _ = match_cohort(cohort.expression, samples, cohort.features)
    with pytest.raises(DataError, match="RARE .1 sample"):
        cross_validate(c3, TrainConfig(max_epochs=1, **FAST))


def test_features_of_another_backbone_are_refused_by_the_bundle(trained, tmp_path):
    cohort, config, result = trained
    path = save_bundle(
        tmp_path / "m.safetensors", result.models, cohort.genes, "test-bb", 16, 112.0, config.k_list,
        bundle_metadata(result, cohort),
    )  # fmt: skip
    narrow = {s: np.asarray(cohort.features[s])[:, :8] for s in cohort.sample_ids}
    other, _ = match_cohort(cohort.expression, cohort.samples, narrow)
    with pytest.raises(DataError, match="8 dimensions but the model takes 16"):
        bundle_oof_predictions(load_bundle(path), other, device="cpu")
