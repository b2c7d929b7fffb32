"""Per-gene, per-cancer-type evaluation, the significance tests and the written report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from napari_he2rna.model.evaluation import (
    adjust_p,
    empirical_p,
    evaluate,
    gene_set_test,
    mean_r_by_type,
    pearson_by_type,
    pearson_columns,
    read_gmt,
    steiger_test,
    write_report,
)


def test_pearson_columns_matches_scipy():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(40, 7))
    p = t * rng.uniform(-1, 1, size=7) + rng.normal(size=(40, 7))
    got = pearson_columns(t, p)
    expected = [stats.pearsonr(t[:, j], p[:, j])[0] for j in range(7)]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    p[:, 2] = 3.0  # constant prediction: undefined
    assert np.isnan(pearson_columns(t, p)[2])
    assert np.isnan(pearson_columns(t[:2], p[:2])).all()  # fewer than 3 samples


def test_correlation_is_never_pooled_across_cancer_types():
    rng = np.random.default_rng(1)
    n = 60
    types = np.array(["BRCA"] * 30 + ["LIHC"] * 30)
    offset = np.where(types == "BRCA", 0.0, 5.0)[:, None]
    # predictions only know the organ: pooled R is high, within-type R is noise
    truth = offset + rng.normal(size=(n, 3))
    pred = offset + rng.normal(size=(n, 3))
    assert pearson_columns(truth, pred).min() > 0.8
    r = pearson_by_type(truth, pred, types, ["a", "b", "c"])
    assert list(r.index) == ["BRCA", "LIHC"] and list(r.columns) == ["a", "b", "c"]
    for t in ("BRCA", "LIHC"):
        sel = types == t
        np.testing.assert_allclose(
            r.loc[t], [stats.pearsonr(truth[sel, j], pred[sel, j])[0] for j in range(3)]
        )
    assert r.abs().max().max() < 0.6
    assert abs(mean_r_by_type(truth, pred, types) - r.to_numpy().mean()) < 1e-12


def test_steiger_matches_hand_computation():
    # Steiger (1980) eq. 14-15, worked by hand for r_jk=.5, r_jh=.3, r_kh=.2, n=100:
    #   rbar = .4, rbar^2 = .16
    #   psi  = .2 (1 - .32) - .5 * .16 (1 - .32 - .04) = .136 - .0512 = .0848
    #   c    = .0848 / .84^2 = .0848 / .7056 = .120181
    #   z    = (atanh .5 - atanh .3) sqrt(97) / sqrt(2 - .240363)
    #        = (.549306 - .309520) * 9.848858 / 1.326514 = 1.78032
    #   p    = 1 - Phi(1.78032) = .03751
    z, p = steiger_test(0.5, 0.3, 0.2, 100)
    assert z == pytest.approx(1.78032, abs=1e-4)
    assert p == pytest.approx(0.03751, abs=1e-4)
    # identical correlations: no evidence; a higher r_kh (more similar predictors) sharpens the test
    z0, p0 = steiger_test(0.4, 0.4, 0.5, 50)
    assert z0 == pytest.approx(0.0) and p0 == pytest.approx(0.5)
    z_hi, _ = steiger_test(0.5, 0.3, 0.8, 100)
    assert z_hi > z
    # vectorised over genes
    zs, ps = steiger_test(np.array([0.5, 0.3]), np.array([0.3, 0.5]), np.array([0.2, 0.2]), 100)
    assert zs[0] == pytest.approx(-zs[1]) and ps[0] < 0.05 < ps[1]


def test_empirical_p_and_corrections():
    null = np.arange(99) / 100.0  # 0.00 .. 0.98
    p = empirical_p(np.array([0.985, 0.5, -1.0, np.nan]), null)
    np.testing.assert_allclose(p[:3], [1 / 100, (1 + 49) / 100, 1.0])
    assert np.isnan(p[3])
    raw = np.array([0.001, 0.01, 0.02, 0.3, np.nan, 0.04])
    ok = np.isfinite(raw)
    for method in ("holm-sidak", "fdr_bh"):
        got = adjust_p(raw, method)
        np.testing.assert_allclose(got[ok], multipletests(raw[ok], method=method)[1])
        assert np.isnan(got[4])


def test_gene_set_test_against_random_sets():
    rng = np.random.default_rng(2)
    r = pd.Series(rng.normal(0, 0.1, 300), index=[f"G{i}" for i in range(300)])
    r.iloc[:5] = [0.8, 0.7, 0.75, 0.6, 0.9]  # a well-predicted pathway
    sig = r > 0.5
    good = gene_set_test(r, ["G0", "G1", "G2", "G3", "G4", "UNKNOWN"], n_random=2000, significant=sig)
    assert good["size"] == 5 and good["mean_r"] == pytest.approx(0.75)
    assert good["p_mean_r"] < 0.001 and good["p_frac_significant"] < 0.001
    plain = gene_set_test(r, [f"G{i}" for i in range(100, 120)], n_random=2000)
    assert plain["p_mean_r"] > 0.05
    assert abs(plain["random_mean_r"] - r.mean()) < 0.01


def _eval_inputs(seed=3):
    rng = np.random.default_rng(seed)
    n, genes = 90, [f"G{i}" for i in range(20)]
    types = np.array(["A", "B", "C"] * 30)
    folds = (np.arange(n) // 3) % 3
    truth = rng.normal(size=(n, 20))
    pred = rng.normal(size=(n, 20))
    pred[:, :4] = truth[:, :4] + 0.3 * rng.normal(size=(n, 4))  # 4 well-predicted genes
    null = rng.normal(size=(30, n, 20))
    idx = [f"s{i}" for i in range(n)]
    return (
        pd.DataFrame(truth, index=idx, columns=genes),
        pd.DataFrame(pred, index=idx, columns=genes),
        types,
        folds,
        null,
    )


def test_evaluate_and_report(tmp_path):
    truth, pred, types, folds, null = _eval_inputs()
    ev = evaluate(
        truth, pred, types, folds, null, top_n=5, gene_sets={"good": ["G0", "G1", "G2"]}, n_random_sets=500
    )
    assert set(ev.summary["cancer_type"]) == {"A", "B", "C"}
    assert (ev.summary["n_significant_holm_sidak"] == 4).all()
    assert (ev.summary["n_significant_bh"] >= 4).all()
    sig = ev.per_gene[ev.per_gene["significant"]]
    assert set(sig["gene"]) == {"G0", "G1", "G2", "G3"}
    # R is the mean over folds of the within-fold, within-type R
    row = ev.per_gene[(ev.per_gene.cancer_type == "B") & (ev.per_gene.gene == "G7")].iloc[0]
    per_fold = [
        stats.pearsonr(truth.G7[(types == "B") & (folds == f)], pred.G7[(types == "B") & (folds == f)])[0]
        for f in range(3)
    ]
    assert row["r"] == pytest.approx(np.mean(per_fold))
    pf = ev.per_fold[(ev.per_fold.cancer_type == "B") & (ev.per_fold.gene == "G7")].sort_values("fold")
    np.testing.assert_allclose(pf["r"], per_fold)
    # the significance threshold is the smallest significant R
    a = ev.summary.set_index("cancer_type").loc["A"]
    assert a["r_threshold_holm_sidak"] == pytest.approx(sig[sig.cancer_type == "A"]["r"].min())
    assert a["mean_r_top5"] == pytest.approx(
        ev.per_gene[ev.per_gene.cancer_type == "A"]["r"].nlargest(5).mean()
    )
    assert (ev.per_gene.loc[ev.per_gene.gene.isin(["G0", "G1"]), "steiger_p"] < 1e-3).all()
    assert (ev.gene_sets["p_mean_r"] < 0.05).all()

    report = write_report(ev, tmp_path / "report")
    for name in (
        "per_gene.csv",
        "summary.csv",
        "per_fold.csv",
        "gene_sets.csv",
        "r_by_cancer_type.png",
        "null_vs_trained.png",
        "report.md",
    ):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    text = report.read_text()
    assert "Holm" in text and "| A |" in text and "r_by_cancer_type.png" in text
    back = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(back["n_significant_holm_sidak"]) == [4, 4, 4]


def test_evaluate_without_null_reports_correlations_only(tmp_path):
    truth, pred, types, folds, _ = _eval_inputs(4)
    ev = evaluate(truth, pred, types, None, None)
    assert "significant" not in ev.per_gene and "n_significant_holm_sidak" not in ev.summary
    assert len(ev.per_gene) == 3 * 20
    assert write_report(ev, tmp_path).is_file()


def test_read_gmt(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("T_CELLS\tdesc\tCD3D\tCD3E\tCD3G\tCD247\nB_CELLS\thttp://x\tCD19\tMS4A1\n")
    assert read_gmt(gmt) == {"T_CELLS": ["CD3D", "CD3E", "CD3G", "CD247"], "B_CELLS": ["CD19", "MS4A1"]}
    assert math.isclose(len(read_gmt(gmt)["T_CELLS"]), 4)


def test_summary_has_the_literature_figures_pooled_r_and_a_small_fold_warning(tmp_path):
    from napari_he2rna.model.evaluation import comparison_table, small_fold_warning, write_report

    rng = np.random.default_rng(3)
    n, g = 48, 6
    truth = pd.DataFrame(rng.normal(size=(n, g)), columns=[f"G{i}" for i in range(g)])
    pred = truth + rng.normal(0, 0.5, size=(n, g))
    pred["G5"] = rng.normal(size=n)  # one gene not predicted
    types = np.array(["A"] * 24 + ["B"] * 24)
    folds = np.tile(np.arange(8), 6)  # 3 samples of a type per fold: fold R is noise
    null = rng.normal(0, 0.3, size=(20, n, g))
    ev = evaluate(truth, pred, types, folds, null)
    s = ev.summary.set_index("cancer_type")
    for col in ("mean_r_pooled", "n_r_above_0.4", "n_significant_bh_pooled", "min_fold_n", "r_threshold_bh"):
        assert col in s.columns
    assert s.loc["A", "min_fold_n"] == 3
    assert s.loc["A", "n_r_pooled_above_0.4"] == 5  # G5 is not (pooled R is not fold noise)
    pooled = ev.per_gene.set_index(["cancer_type", "gene"])
    assert pooled.loc[("A", "G0"), "r_pooled_folds"] > 0.6
    assert pooled.loc[("A", "G0"), "significant_bh_pooled"]
    assert not pooled.loc[("A", "G5"), "significant_bh_pooled"]
    warning = small_fold_warning(ev)
    assert "fewer than 5 samples" in warning and "A (3)" in warning
    table = comparison_table({"HE2RNA": ev, "ridge baseline": ev})
    assert list(table["model"].unique()) == ["HE2RNA", "ridge baseline"]
    report = write_report(ev, tmp_path, baseline=ev)
    text = report.read_text()
    assert "**Warning:**" in text and "HE2RNA and the ridge baseline" in text
    assert (tmp_path / "comparison.csv").is_file()
