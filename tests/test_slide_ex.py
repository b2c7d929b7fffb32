"""SLIDE-EX: deconvolved targets, nested cross-validation without leaks, bundles painted per cell type."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna import slide_ex as sx
from napari_he2rna.cohorts.cohort import Cohort, load_samples
from napari_he2rna.errors import DataError
from napari_he2rna.maps.scoring import score_tiles
from napari_he2rna.model.bundle import load_bundle
from napari_he2rna.model.cohort_prediction import bundle_oof_predictions
from napari_he2rna.model.network import HE2RNA

TINY = dict(
    outer_folds=3,
    inner_folds=2,
    widths=(4, 8),
    epochs=(5, 20),
    lr=1e-2,
    batch_size=8,
    null_inits=50,
    device="cpu",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(n_patients: int = 36, dim: int = 12, seed: int = 0):
    """Slides of 8-14 tiles; "stroma" tiles carry +3 on feature 0, scaled features elsewhere.

    fibroblast COL1A1 = the slide's stroma fraction (+ small noise), fibroblast VIM = noise; T_cell CD8A =
    mean of feature 1 (+ noise); abundances follow the stroma fraction; responder = stroma fraction > 0.3.
    A quarter of the patients have two samples.
    """
    rng = np.random.default_rng(seed)
    rows, feats, fib, tcell, ab, resp = [], {}, {}, {}, {}, {}
    for p in range(n_patients):
        for s in range(1 + (p % 4 == 0)):
            sid = f"S{p:02d}_{s}"
            n = int(rng.integers(8, 15))
            x = rng.normal(size=(n, dim))
            stroma = rng.random(n) < rng.uniform(0.0, 0.7)
            x[stroma, 0] += 3.0
            x[:, 2] = 40 + 10 * x[:, 2]  # a feature on another scale: standardisation must cope
            feats[sid] = x.astype(np.float32)
            frac = float(stroma.mean())
            rows.append({"sample_id": sid, "patient_id": f"P{p:02d}", "cancer_type": "BRCA"})
            fib[sid] = {"COL1A1": 1 + 2 * frac + rng.normal(0, 0.05), "VIM": 2 + rng.normal(0, 0.3)}
            tcell[sid] = {"CD8A": 1 + 0.5 * x[:, 1].mean() + rng.normal(0, 0.05)}
            ab[sid] = {"fibroblast": 0.1 + 0.6 * frac, "T_cell": 0.9 - 0.6 * frac}
            resp[sid] = int(frac > 0.3)
    samples = pd.DataFrame(rows).set_index("sample_id")
    expression = {"fibroblast": pd.DataFrame(fib).T, "T_cell": pd.DataFrame(tcell).T}
    return feats, samples, expression, pd.DataFrame(ab).T, pd.Series(resp, name="responder")


def _write_tables(folder, expression, abundance=None):
    (folder / "celltype_expression").mkdir(parents=True, exist_ok=True)
    for ct, tab in expression.items():
        tab.rename_axis("sample_id").to_csv(folder / "celltype_expression" / f"{ct}.tsv", sep="\t")
    if abundance is not None:
        abundance.rename_axis("sample_id").to_csv(folder / "celltype_abundance.tsv", sep="\t")


# ------------------------------------------------------------------------------------------ nested CV


def test_outer_test_samples_never_reach_training_or_model_choice(monkeypatch):
    feats, samples, expr, _, _ = planted()
    targets = expr["fibroblast"].astype(np.float32)
    config = sx.NestedCVConfig(**TINY)
    folds = sx.outer_folds(samples.loc[targets.index], 3, seed=0)

    # Record what every training run and every prediction of the nested CV was given.
    calls: list[tuple[str, list[str], list[str]]] = []
    real_train, real_predict = sx.nested_cv.train_one, sx.nested_cv.predict_slides

    def train_spy(model, slides, y, types, train_idx, val_idx, *args, **kwargs):
        calls.append(("train", [slides.ids[i] for i in train_idx], [slides.ids[i] for i in val_idx]))
        return real_train(model, slides, y, types, train_idx, val_idx, *args, **kwargs)

    def predict_spy(model, slides, idx, *args, **kwargs):
        calls.append(("predict", [slides.ids[i] for i in idx], []))
        return real_predict(model, slides, idx, *args, **kwargs)

    monkeypatch.setattr(sx.nested_cv, "train_one", train_spy)
    monkeypatch.setattr(sx.nested_cv, "predict_slides", predict_spy)
    res = sx.nested_cross_validate(feats, targets, samples, config, folds=folds)
    monkeypatch.undo()

    trains = [c for c in calls if c[0] == "train"]
    per_fold = len(config.widths) * config.inner_folds + 1
    assert len(trains) == 3 * per_fold
    for f, rec in enumerate(res.outer):
        test = set(rec.test_ids)
        assert test == {s for s, k in zip(res.sample_ids, res.folds, strict=True) if k == f}
        for _kind, train_ids, val_ids in trains[f * per_fold : (f + 1) * per_fold]:
            assert not test & set(train_ids), f"outer test samples of fold {f} were trained on"
            assert val_ids == []  # no early stopping on anything: the epoch count comes from the inner folds
        for inner_train, inner_val in rec.inner_splits:
            assert not test & (set(inner_train) | set(inner_val))
            assert set(inner_train) | set(inner_val) == set(rec.train_ids)
    # Predictions, in order: while fold f chooses, only inner validation samples (inside its outer training
    # set); the outer test fold is predicted once, last, by the retrained model.
    f, seen_train = 0, 0
    for kind, ids, _ in calls:
        if kind == "train":
            seen_train += 1
            continue
        rec = res.outer[f]
        if seen_train < (f + 1) * per_fold:
            assert set(ids) <= set(rec.train_ids)
        else:
            assert ids == rec.test_ids
            f += 1
    assert f == 3

    # The strongest check: fold 0's model and choice do not depend on fold 0's test samples at all.
    feats2 = dict(feats)
    targets2 = targets.copy()
    rng = np.random.default_rng(1)
    for sid in res.outer[0].test_ids:
        feats2[sid] = (feats[sid] * 5 + 3).astype(np.float32)
        targets2.loc[sid] = rng.normal(50, 10, size=targets.shape[1]).astype(np.float32)
    res2 = sx.nested_cross_validate(feats2, targets2, samples, config, folds=folds)
    a, b = res.models[0].state_dict(), res2.models[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (res.outer[0].width, res.outer[0].epochs) == (res2.outer[0].width, res2.outer[0].epochs)
    pd.testing.assert_frame_equal(res.outer[0].inner_scores, res2.outer[0].inner_scores)
    # ... while the other folds, which trained on those samples, did change.
    assert not torch.equal(res.models[1].layers[0].weight, res2.models[1].layers[0].weight)


def test_patients_are_never_split():
    feats, samples, expr, _, resp = planted(n_patients=24)
    folds = sx.outer_folds(samples, 3, seed=0, labels=resp)
    assert pd.Series(folds).groupby(samples["patient_id"].to_numpy()).nunique().max() == 1
    res = sx.nested_cross_validate(
        feats, resp.astype(np.float32).to_frame(), samples, sx.NestedCVConfig(**TINY), task="classification"
    )
    patient = samples["patient_id"]
    for rec in res.outer:
        assert not set(patient[rec.train_ids]) & set(patient[rec.test_ids])
        for inner_train, inner_val in rec.inner_splits:
            assert not set(patient[inner_train]) & set(patient[inner_val])
    # Explicit folds that split a patient are refused.
    bad = folds.copy()
    two = samples.index.get_indexer(samples.index[samples["patient_id"] == "P00"])
    bad[two[0]], bad[two[1]] = 0, 1
    with pytest.raises(DataError, match="split across folds"):
        sx.nested_cross_validate(feats, expr["T_cell"], samples, sx.NestedCVConfig(**TINY), folds=bad)


def test_padding_keeps_a_network_exact():
    torch.manual_seed(0)
    small = HE2RNA(6, 3, (4, 4)).eval()
    big = sx.pad_hidden(small, (9, 9)).eval()
    x = torch.randn(2, 6, 7)
    assert torch.allclose(small(x), big(x), atol=1e-6)


# ------------------------------------------------------------------------------------------ pipeline


def test_slide_ex_learns_planted_genes_and_bundles_paint_per_cell_type(tmp_path):
    feats, samples, expr, abundance, resp = planted()
    targets = sx.load_deconvolved(expr, abundance)
    result = sx.run_slide_ex(feats, samples, targets, resp, sx.NestedCVConfig(**TINY))
    paths = sx.write_slide_ex(result, tmp_path / "out", "hed-stats", 112.0, demo=True)

    per_gene = result.per_gene().set_index("name")
    assert per_gene.loc["fibroblast COL1A1", "r"] > 0.6
    assert bool(per_gene.loc["fibroblast COL1A1", "significant"])
    assert not bool(per_gene.loc["fibroblast VIM", "significant"])
    assert bool(per_gene.loc["fibroblast abundance", "significant"])
    summary = result.summary().set_index("target")
    assert summary.loc["fibroblast", "significant"] == "COL1A1"
    assert result.responder_evaluation["auc_patients"] > 0.8
    for name in ("summary.csv", "per_gene.csv", "predictions.csv", "inner_scores.csv", "report.md"):
        assert (tmp_path / "out" / name).is_file()

    bundle = load_bundle(paths["model:fibroblast"])
    assert bundle.genes == ["fibroblast COL1A1", "fibroblast VIM"]
    assert bundle.n_folds == 3 and bundle.demo
    tiles = np.concatenate([feats[s] for s in list(feats)[:6]])  # some tiles of several slides
    col1a1 = bundle.tile_scores(tiles, ["fibroblast COL1A1"])[:, 0]
    assert col1a1.shape == (len(tiles),) and np.isfinite(col1a1).all()
    # Stroma tiles (feature 0 high) score higher than the others: the per-tile map means something.
    hot = tiles[:, 0] > 1.5
    assert col1a1[hot].mean() > col1a1[~hot].mean()
    painted = score_tiles(bundle, tiles, ["fibroblast COL1A1"])
    assert list(painted.columns) == ["fibroblast COL1A1"]
    # The bundle takes raw features (standardisation folded in, folds padded) and gives back, per
    # sample, exactly the outer test prediction of the fold that held it out.
    cohort = Cohort(expression=result.celltypes["fibroblast"].oof, samples=samples, features=feats)
    again, fold_of = bundle_oof_predictions(bundle, cohort, device="cpu")
    np.testing.assert_allclose(again.to_numpy(), result.celltypes["fibroblast"].oof.to_numpy(), atol=1e-4)
    assert (fold_of == result.celltypes["fibroblast"].folds).all()
    assert load_bundle(paths["model:abundance"]).genes == ["fibroblast abundance", "T_cell abundance"]
    assert load_bundle(paths["model:responder"]).genes == ["responder"]


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_data_errors(tmp_path):
    feats, samples, expr, abundance, _ = planted(n_patients=12)
    _write_tables(tmp_path, expr, abundance)
    folder = tmp_path / "celltype_expression"
    sx.load_deconvolved(folder, tmp_path / "celltype_abundance.tsv")  # sound tables read fine

    with pytest.raises(
        DataError, match=r"No expression table for cell type\(s\) 'macrophage'.*found: T_cell"
    ):
        sx.load_deconvolved(folder, cell_types=["fibroblast", "macrophage"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no cell-type expression table"):
        sx.load_deconvolved(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        sx.load_deconvolved(tmp_path / "nowhere")

    expr["T_cell"].drop(index=expr["T_cell"].index[:2]).rename_axis("sample_id").to_csv(
        folder / "T_cell.tsv", sep="\t"
    )
    with pytest.raises(
        DataError, match=r"fibroblast.tsv and T_cell.tsv list different samples: 2 only in fibroblast.tsv"
    ):
        sx.load_deconvolved(folder)
    _write_tables(tmp_path, expr)

    abundance.rename(index={abundance.index[0]: "STRANGER"}).rename_axis("sample_id").to_csv(
        tmp_path / "ab.tsv", sep="\t"
    )
    with pytest.raises(DataError, match="ab.tsv and .* list different samples.*STRANGER"):
        sx.load_deconvolved(folder, tmp_path / "ab.tsv")

    text = (folder / "fibroblast.tsv").read_text().splitlines()
    text[3] = text[3].rsplit("\t", 1)[0] + "\thigh"
    (folder / "fibroblast.tsv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"fibroblast.tsv has non-numeric gene columns \(e.g. \['VIM'\]\)"):
        sx.load_deconvolved(folder)
    _write_tables(tmp_path, expr)

    bad_ab = abundance.astype(object)
    bad_ab.iloc[2, 1] = "n/a"
    with pytest.raises(DataError, match="non-numeric values in column"):
        sx.read_abundance(bad_ab)

    targets = sx.load_deconvolved(folder)
    with pytest.raises(DataError, match="not in the sample sheet.*patient id"):
        sx.run_slide_ex(
            feats, samples.drop(index=samples.index[:3]), targets, None, sx.NestedCVConfig(**TINY)
        )
    with pytest.raises(DataError, match="lacks the column 'responder'"):
        sx.read_responders(pd.DataFrame({"sample_id": ["a", "b"], "label": [0, 1]}))


def test_cli_on_a_tiny_synthetic_cohort(tmp_path, capsys):
    from napari_he2rna.cli import main
    from napari_he2rna.synthetic import make_cohort

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=8, seed=3, size_px=(896, 896))
    out = tmp_path / "slide_ex"
    base = [
        "slide-ex",
        "--samples",
        str(cohort / "samples.tsv"),
        "--celltype-expression",
        str(cohort / "celltype_expression"),
        "--cache-dir",
        str(tmp_path / "features"),
        "--backbone",
        "hed-stats",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    small = [
        "--outer-folds",
        "2",
        "--inner-folds",
        "2",
        "--widths",
        "4",
        "--epochs",
        "2",
        "--null-inits",
        "5",
    ]
    # Bad input first: a clear one-line error, exit code 2.
    assert main([*base, "--cell-types", "macrophage"]) == 2
    assert "he2rna: error: No expression table for cell type(s) 'macrophage'" in capsys.readouterr().err

    rc = main(
        [
            *base,
            *small,
            "--abundance",
            str(cohort / "celltype_abundance.tsv"),
            "--responders",
            str(cohort / "responders.tsv"),
            "--demo",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fibroblast [" in text and "responder classifier" in text
    bundle = load_bundle(out / "models" / "fibroblast.safetensors")
    assert "fibroblast COL1A1" in bundle.genes and bundle.backbone == "hed-stats" and bundle.feature_dim == 33
    assert (out / "models" / "abundance.safetensors").is_file()
    per_gene = pd.read_csv(out / "per_gene.csv")
    assert set(per_gene["target"]) == {"T_cell", "B_cell", "tumor", "fibroblast", "abundance"}
    samples = load_samples(cohort / "samples.tsv")
    assert set(pd.read_csv(out / "outer_folds.csv")["sample_id"]) == set(samples.index)
