"""The transcriptomic representation (simple HE2RNA) and the hospital A/B transfer experiment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna import transfer as T
from napari_he2rna.cli import main
from napari_he2rna.errors import DataError, ModelError

TINY = T.TransferConfig(
    rep_hidden=(32, 16),
    direct_hidden=(16, 8),
    code_hidden=(8,),
    ae_hidden=(32, 16, 32),
    epochs=5,
    batch_size=16,
    lr=3e-3,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(n_patients=60, dim=12, n_genes=6, seed=0, two_sample_every=4):
    """Patients with a latent immune level z: label = z > 0 (plus noise), features and genes carry z.

    Feature 0 of every sample is the sample's row number, so the tests can tell which rows a network saw.
    """
    rng = np.random.default_rng(seed)
    pats, labels, zs = [], [], []
    for p in range(n_patients):
        z = rng.normal()
        lab = int(z + 0.3 * rng.normal() > 0)
        for _ in range(1 + (p % two_sample_every == 0)):
            pats.append(f"P{p:03d}")
            labels.append(lab)
            zs.append(z + 0.2 * rng.normal())
    zs = np.array(zs)
    n = len(zs)
    x = rng.normal(size=(n, dim)) + np.outer(zs, rng.normal(size=dim))
    x[:, 0] = np.arange(n)
    y = 2.0 + np.outer(zs, rng.uniform(0.5, 1.0, n_genes)) + 0.2 * rng.normal(size=(n, n_genes))
    ids = [f"S{i:03d}" for i in range(n)]
    return x.astype(np.float32), y.astype(np.float32), np.array(labels), np.array(pats), ids


# ------------------------------------------------------------------------------------------ grouping


def test_group_folds_keep_each_patient_in_one_fold_and_spread_labels():
    _, _, labels, pats, _ = planted(n_patients=45)
    folds = T.group_folds(pats, 3, seed=1, strata=labels)
    per_patient = pd.Series(folds).groupby(pats).nunique()
    assert (per_patient == 1).all()
    assert set(folds.tolist()) == {0, 1, 2}
    for f in range(3):  # every fold holds both classes
        assert set(labels[folds == f].tolist()) == {0, 1}
    with pytest.raises(DataError, match="patients cannot fill"):
        T.group_folds(["a", "a", "b"], 3)


def test_hospitals_and_folds_never_share_a_patient(monkeypatch):
    """Record every network's training rows (feature 0 = row number) and check them against the splits."""
    x, y, labels, pats, ids = planted(n_patients=36)
    seen: dict[str, list[np.ndarray]] = {"rep": [], "ae": [], "clf_train": [], "clf_test": []}

    def rows(a):
        return np.asarray(a)[:, 0].round().astype(int)

    def wrap(fn, key):
        def inner(xx, *a, **k):
            seen[key].append(rows(xx))
            return fn(xx, *a, **k)

        return inner

    monkeypatch.setattr(T.experiment, "train_simple_he2rna", wrap(T.train_simple_he2rna, "rep"))
    monkeypatch.setattr(T.experiment, "train_autoencoder", wrap(T.train_autoencoder, "ae"))
    predict = T.predict_proba

    def proba(model, xx):
        if xx.shape[1] == x.shape[1]:
            seen["clf_test"].append(rows(xx))
        return predict(model, xx)

    monkeypatch.setattr(T.experiment, "predict_proba", proba)
    train_clf = T.train_classifier

    def clf(xx, lab, *a, **k):
        if xx.shape[1] == x.shape[1]:  # the direct classifier: raw rows, which we can identify
            seen["clf_train"].append(rows(xx))
        return train_clf(xx, lab, *a, **k)

    monkeypatch.setattr(T.experiment, "train_classifier", clf)
    res = T.run_transfer_experiment(
        x, y, labels, pats, ratios=[0.5], n_bootstrap=1, config=TINY, sample_ids=ids, seed=3
    )
    sp = res.splits
    assert len(sp) == len(x) and list(sp["sample"]) == ids
    # a patient is in one hospital, in one fold there, and A has fold_A / B has fold_B only
    assert (sp.groupby("patient")["hospital"].nunique() == 1).all()
    assert (sp.groupby("patient")["fold_A"].nunique() == 1).all()
    assert (sp.groupby("patient")["fold_B_0"].nunique() == 1).all()
    in_a = sp["hospital"].to_numpy() == "A"
    assert (sp.loc[in_a, "fold_B_0"] == -1).all() and (sp.loc[~in_a, "fold_A"] == -1).all()
    assert set(sp.loc[in_a, "fold_A"]) == {0, 1, 2} and set(sp.loc[~in_a, "fold_B_0"]) == {0, 1, 2}
    # both classes split alike between the hospitals
    per_patient = sp.groupby("patient").first()
    for c in (0, 1):
        share = (per_patient.loc[per_patient["label"] == c, "hospital"] == "A").mean()
        assert 0.4 <= share <= 0.6
    a_rows, b_rows = set(np.flatnonzero(in_a)), set(np.flatnonzero(~in_a))
    # hospital A's 3 fold models: A's rows only, each without its own fold
    assert len(seen["rep"]) == 3
    fold_a = sp["fold_A"].to_numpy()
    for f, r in enumerate(seen["rep"]):
        assert set(r) <= a_rows and set(r) == set(np.flatnonzero(in_a & (fold_a != f)))
    # autoencoder A on A's rows; autoencoder B on B's training folds only
    fold_b = sp["fold_B_0"].to_numpy()
    assert set(seen["ae"][0]) == a_rows
    for f, r in enumerate(seen["ae"][1:]):
        assert set(r) == set(np.flatnonzero(~in_a & (fold_b != f)))
    # the direct classifier: trained on B's training folds, tested on the held-out fold of B
    assert len(seen["clf_train"]) == 3
    for f, r in enumerate(seen["clf_train"]):
        assert set(r) <= b_rows
        test = set(np.flatnonzero(~in_a & (fold_b == f)))
        assert not set(pats[list(r)]) & set(pats[list(test)])
    assert len(seen["clf_test"]) == 3
    for f, r in enumerate(seen["clf_test"]):
        assert set(r) == set(np.flatnonzero(~in_a & (fold_b == f)))


def test_patient_auc_averages_the_samples_of_a_patient():
    scores = np.array([0.9, 0.1, 0.2, 0.3])
    labels = np.array([1, 1, 0, 0])
    # P1 = mean(0.9, 0.1) = 0.5 ranks above both negatives
    assert T.patient_auc(scores, labels, np.array(["P1", "P1", "P2", "P3"])) == 1.0
    # as separate patients the 0.1 sample would rank below both negatives
    assert T.patient_auc(scores, labels, np.array(["P1", "P4", "P2", "P3"])) == 0.5
    assert np.isnan(T.patient_auc(scores, np.ones(4), np.array(["a", "b", "c", "d"])))


# ------------------------------------------------------------------------------------------ networks


def test_networks_train_on_cpu_and_learn():
    x, y, labels, pats, _ = planted(n_patients=80)
    x = x[:, 1:]  # drop the row number
    clf = T.train_classifier(x, labels, hidden=(32, 16), epochs=30, lr=3e-3)
    ae = T.train_autoencoder(x, hidden=(32, 16, 32), epochs=30, lr=3e-3)
    rep = T.train_simple_he2rna(x, y, hidden=(32, 16), epochs=30, lr=3e-3)
    assert T.patient_auc(T.predict_proba(clf, x), labels, pats) > 0.9
    z = (x - x.mean(0)) / x.std(0)
    with torch.no_grad():
        recon = ae(torch.as_tensor(x)).numpy()
        pred = rep(torch.as_tensor(x)).numpy()
    assert np.mean((recon - z) ** 2) < 0.8 * np.mean(z**2)  # beats predicting the mean
    assert np.mean((pred - y) ** 2) < 0.5 * np.mean((y - y.mean(0)) ** 2)
    codes, r = T.encode(ae, x), T.represent(rep, x)
    assert codes.shape == (len(x), 16) and r.shape == (len(x), 16)
    assert ((r > 0) & (r < 1)).all()  # sigmoid units
    # same seed, same network: reproducible
    again = T.train_simple_he2rna(x, y, hidden=(32, 16), epochs=30, lr=3e-3)
    np.testing.assert_array_equal(T.represent(again, x), r)


def test_experiment_finds_a_planted_label_and_writes_reloadable_results(tmp_path):
    x, y, labels, pats, ids = planted(n_patients=60, seed=1)
    x = x[:, 1:]
    cfg = T.TransferConfig(**{**TINY.__dict__, "epochs": 25})
    res = T.run_transfer_experiment(
        x, y, labels, pats, ratios=["1/2", 0.0], n_bootstrap=2, config=cfg, sample_ids=ids, seed=0
    )
    assert len(res.aucs) == 2 * 2 * 4
    at_half = res.aucs[res.aucs["ratio"] == 0.5]
    assert at_half["auc"].notna().all()
    means = at_half.groupby("method")["auc"].mean()
    assert means["direct"] > 0.75 and means["representation"] > 0.75  # a label-shuffling bug gives ~0.5
    at_zero = res.aucs[res.aucs["ratio"] == 0.0].set_index("method")["auc"]
    assert at_zero[["representation", "autoencoder_A"]].isna().all()  # nothing at A to learn from
    assert at_zero[["direct", "autoencoder_B"]].notna().all()
    tests = res.tests[(res.tests["ratio"] == 0.5) & (res.tests["method_1"] == "representation")]
    assert set(tests["method_2"]) == {"direct", "autoencoder_A", "autoencoder_B"}
    assert tests["n"].eq(2).all() and tests["p"].between(0, 1).all()

    paths = T.write_transfer_results(res, tmp_path / "res", focus_ratio=0.5)
    for name in ("aucs.csv", "tests.csv", "summary.csv", "summary.md", "splits.csv.gz", "config.json"):
        assert (tmp_path / "res" / name).is_file()
    assert paths["figure"].stat().st_size > 10_000
    back = T.load_transfer_results(tmp_path / "res")
    pd.testing.assert_frame_equal(back.aucs, res.aucs, check_dtype=False)
    pd.testing.assert_frame_equal(back.summary(), res.summary(), check_dtype=False)
    assert back.config == cfg
    assert back.splits["sample"].tolist() == res.splits["sample"].tolist()
    assert "| 0.5:0.5 |" in (tmp_path / "res" / "summary.md").read_text()
    with pytest.raises(DataError, match="no transfer results"):
        T.load_transfer_results(tmp_path)


def test_bad_input_is_a_data_error_with_a_clear_message():
    x, y, labels, pats, _ = planted(n_patients=30)
    run = T.run_transfer_experiment
    with pytest.raises(DataError, match="single class"):
        run(x, y, np.zeros(len(x)), pats, ratios=[0.5], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match="Unknown transfer method"):
        run(x, y, labels, pats, ratios=[0.5], n_bootstrap=1, config=TINY, methods=["direct", "magic"])
    with pytest.raises(DataError, match="rows must match"):
        run(x, y, labels[:-1], pats, ratios=[0.5], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match="rows for"):
        run(x, y[:-2], labels, pats, ratios=[0.5], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        run(x, y, labels, pats, ratios=[1.0], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match="fraction such as 3/4"):
        T.parse_ratio("three quarters")
    with pytest.raises(DataError, match="NaN or infinite"):
        run(np.where(x > 2, np.nan, x), y, labels, pats, ratios=[0.5], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match="0 or 1"):
        run(x, y, labels * 2, pats, ratios=[0.5], n_bootstrap=1, config=TINY)
    with pytest.raises(DataError, match="autoencoder takes three"):
        T.TransferConfig(ae_hidden=(8, 4))
    # labels from a column
    with pytest.raises(DataError, match="No sample has the positive label"):
        T.binary_labels(["MSS", "MSS"], positive="MSI-H")
    with pytest.raises(DataError, match="say which one is positive"):
        T.binary_labels(["red", "blue"])
    got = T.binary_labels(["MSI-H", "MSS", "MSI-L", None, "MSS"], positive="MSI-H", negative=["MSS"])
    assert got.tolist() == [1, 0, -1, -1, 0]
    assert T.binary_labels([1, 0, 1]).tolist() == [1, 0, 1]
    y_pat, conflicting = T.patient_labels(np.array([1, 0, 0]), np.array(["a", "a", "b"]))
    assert y_pat.tolist() == [1, 1, 0] and conflicting == ["a"]


# ------------------------------------------------------------------------------------ representation


def test_representation_model_reloads_and_rejects_bad_files(tmp_path):
    x, y, _, pats, _ = planted(n_patients=30)
    models, folds = T.train_representation(x, y, pats, n_folds=3, hidden=(16, 8), epochs=3)
    assert len(models) == 3
    assert (pd.Series(folds).groupby(pats).nunique() == 1).all()
    genes = [f"G{i}" for i in range(y.shape[1])]
    path = T.save_representation_model(
        tmp_path / "rep.safetensors", models, genes, "hed-stats", 112.0, {"a": 1}
    )
    back, doc = T.load_representation_model(path)
    assert doc["genes"] == genes and doc["backbone"] == "hed-stats" and doc["extra"] == {"a": 1}
    np.testing.assert_array_equal(T.represent(back, x), T.represent(models, x))
    oof = T.oof_predictions(back, folds, x)
    assert oof.shape == y.shape and np.isfinite(oof).all()
    with pytest.raises(ModelError, match="takes 12"):
        T.represent(back, x[:, :5])
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="cannot be read"):
        T.load_representation_model(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        T.load_representation_model(tmp_path / "missing.safetensors")
    rep = T.representation_frame(T.represent(back, x), [f"S{i}" for i in range(len(x))])
    for name in ("r.tsv", "r.csv", "r.npz"):
        table = T.read_feature_table(T.write_representation(rep, tmp_path / name))
        np.testing.assert_allclose(table.to_numpy(), rep.to_numpy(), rtol=1e-6)
        assert list(table.index) == list(rep.index)


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """12 synthetic slides (10 patients) with cached hed-stats features; labels alternate by patient."""
    from napari_he2rna.cohorts.cohort import load_samples
    from napari_he2rna.synthetic import make_cohort
    from napari_he2rna.transfer import load_slide_features

    root = tmp_path_factory.mktemp("transfer-cohort")
    make_cohort(root, n_slides=12, seed=0, size_px=(896, 896))
    sheet = pd.read_csv(root / "samples.tsv", sep="\t")
    order = {p: i for i, p in enumerate(dict.fromkeys(sheet["patient_id"]))}
    sheet["msi_status"] = ["MSI-H" if order[p] % 2 else "MSS" for p in sheet["patient_id"]]
    sheet.to_csv(root / "samples_balanced.tsv", sep="\t", index=False)
    cache = root / "features"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        feats = load_slide_features(
            load_samples(root / "samples.tsv"), "hed-stats", cache_dir=cache, device="cpu"
        )
    finally:
        torch.set_num_threads(n)
    assert not feats.failed and feats.mean.shape == (12, 33)
    return root, cache


def test_cli_represent_trains_saves_and_exports_beside_the_features(small_cohort, tmp_path, capsys):
    root, cache = small_cohort
    model = tmp_path / "rep.safetensors"
    common = ["--cache-dir", str(cache), "--device", "cpu"]
    rc = main(
        ["represent", "--samples", str(root / "samples.tsv"), "--expression", str(root / "expression.tsv"),
         "--model", str(model), "--backbone", "hed-stats", "--hidden", "32", "16", "--epochs", "5", *common]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "out-of-fold Pearson R per gene" in out
    models, doc = T.load_representation_model(model)
    assert len(models) == 3 and doc["backbone"] == "hed-stats" and doc["input_dim"] == 33
    assert set(doc["extra"]["folds"]) == {f"SYN-{i:04d}" for i in range(12)}
    beside = cache / "rep.representation.tsv"  # default: in the feature cache folder
    rep = T.read_feature_table(beside)
    assert rep.shape == (12, 16) and "trained the model" in out
    # export only, for two slides, from the saved model (backbone taken from the model)
    out_npz = tmp_path / "two.npz"
    slides = [str(root / "SYN-0003.tiff"), str(root / "SYN-0007.tiff")]
    rc = main(["represent", "--slides", *slides, "--model", str(model), "--out", str(out_npz), *common])
    assert rc == 0
    two = T.read_feature_table(out_npz)
    assert list(two.index) == ["SYN-0003", "SYN-0007"]
    np.testing.assert_allclose(two.to_numpy(), rep.loc[["SYN-0003", "SYN-0007"]].to_numpy(), rtol=1e-5)
    # training from --slides is refused with a sentence
    rc = main(["represent", "--slides", *slides, "--expression", str(root / "expression.tsv"),
               "--model", str(model), *common])  # fmt: skip
    assert rc == 2 and "needs a sample sheet" in capsys.readouterr().err


def test_cli_transfer_end_to_end_and_clear_errors(small_cohort, tmp_path, capsys):
    root, cache = small_cohort
    out = tmp_path / "transfer"
    args = [
        "transfer", "--samples", str(root / "samples_balanced.tsv"),
        "--expression", str(root / "expression.tsv"),
        "--backbone", "hed-stats", "--cache-dir", str(cache), "--device", "cpu", "--folds", "2",
        "--rep-hidden", "16", "8", "--direct-hidden", "8", "4", "--code-hidden", "4",
        "--ae-hidden", "16", "8", "16", "--epochs", "3", "--seed", "1",
    ]  # fmt: skip
    rc = main([*args, "--ratios", "1/2", "0", "--bootstrap", "2", "--out", str(out), "--focus-ratio", "1/2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "12 samples, 11 patients (5 positive, 6 negative)" in text  # one label per patient
    assert "two-tailed Wilcoxon" in text
    res = T.load_transfer_results(out)
    assert sorted(res.aucs["ratio"].unique()) == [0.0, 0.5]
    assert res.aucs.loc[res.aucs["ratio"] == 0.5, "auc"].notna().all()
    assert res.config.n_folds == 2 and res.config.rep_hidden == (16, 8)
    assert (out / "transfer.png").is_file()
    # a label column that does not exist, or a positive value that never occurs: exit 2 and one sentence
    rc = main([*args, "--label-column", "grade", "--out", str(tmp_path / "x")])
    assert rc == 2 and "no label column 'grade'" in capsys.readouterr().err
    rc = main([*args, "--positive", "MSI-X", "--out", str(tmp_path / "x")])
    assert rc == 2 and "positive label 'MSI-X'" in capsys.readouterr().err
    rc = main([*args, "--ratios", "5/4", "--out", str(tmp_path / "x")])
    assert rc == 2 and "[0, 1)" in capsys.readouterr().err
