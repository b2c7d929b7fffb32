"""Tile-level metrics (against scipy / scikit-learn), the spatial null, and ``he2rna compare`` end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from napari_he2rna.cli import main
from napari_he2rna.slides.tiling import TileGrid
from napari_he2rna.validation import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tile_metrics_agree_with_scipy_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    scores = rng.normal(size=n)
    counts = rng.poisson(np.exp(0.8 * scores)).astype(float)
    scores[:5] = np.nan  # tiles without a score are left out
    counts[5:9] = np.nan
    m = metrics.tile_metrics(scores, counts, thresholds=(2,), top_n=50)
    ok = np.isfinite(scores) & np.isfinite(counts)
    s, t = scores[ok], counts[ok]
    assert m.n_tiles == ok.sum() == n - 9
    r = stats.pearsonr(s, t)
    rho = stats.spearmanr(s, t)
    assert m.pearson_r == pytest.approx(r.statistic, rel=1e-12)
    assert m.pearson_p == pytest.approx(r.pvalue, rel=1e-9)
    assert m.spearman_rho == pytest.approx(rho.statistic, rel=1e-12)
    for p in (75, 90, 95, 99):
        positive = t > np.percentile(t, p)
        assert m.auc[f"p{p}"] == pytest.approx(roc_auc_score(positive, s), abs=1e-12)
        assert m.auc_n_positive[f"p{p}"] == positive.sum()
        fpr, tpr = m.roc[f"p{p}"]
        assert fpr[0] == 0 and tpr[-1] == 1
    assert m.auc[">2"] == pytest.approx(roc_auc_score(t > 2, s), abs=1e-12)
    top = np.argsort(-s, kind="stable")[:50]
    assert m.median_truth_top_n == np.median(t[top])
    assert m.median_truth_all == np.median(t)
    assert m.median_truth_top_n > m.median_truth_all
    table = m.table()
    assert set(table["metric"]) >= {"pearson_r", "pearson_p", "roc_auc", "median_truth_top_n"}
    assert "optimistic" in table.loc[table["metric"] == "pearson_p", "note"].iloc[0]
    row = m.as_dict()
    assert row["auc_p90"] == m.auc["p90"] and row["note"] == ""


def test_single_class_and_constant_scores_give_nan_with_reason():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=500)
    zeros = np.zeros(500)
    m = metrics.tile_metrics(scores, zeros)
    assert math.isnan(m.pearson_r) and "truth is constant" in m.correlation_note
    assert all(math.isnan(v) for v in m.auc.values())
    assert "no tile has a truth above 0" in m.auc_note["p75"]
    counts = rng.poisson(2, size=500).astype(float)
    flat = metrics.tile_metrics(np.full(500, 0.7), counts)
    assert math.isnan(flat.pearson_r) and "scores are constant" in flat.correlation_note
    assert math.isnan(flat.auc["p75"]) and "constant" in flat.auc_note["p75"]
    assert math.isnan(flat.median_truth_top_n)
    assert "constant" in flat.as_dict()["note"]
    few = metrics.tile_metrics([1.0, 2.0], [3.0, 1.0])
    assert math.isnan(few.pearson_r) and "only 2 tiles" in few.correlation_note
    auc, note, roc = metrics.binary_auc(scores, np.ones(500, bool))
    assert math.isnan(auc) and "no negative tile" in note and roc is None


def test_annotation_metrics_agree_with_sklearn():
    rng = np.random.default_rng(4)
    labels = (rng.random(3000) < 0.3).astype(float)
    scores = labels + rng.normal(scale=1.0, size=3000)
    labels[:100] = np.nan  # tiles in no annotation are left out
    m = metrics.annotation_metrics(scores, labels, top_n=200)
    ok = np.isfinite(labels)
    assert m.n_tiles == ok.sum()
    assert m.auc == pytest.approx(roc_auc_score(labels[ok] > 0.5, scores[ok]), abs=1e-12)
    top = np.argsort(-scores[ok])[:200]
    assert m.top_n_share_positive == pytest.approx((labels[ok][top] > 0.5).mean())
    assert m.top_n_share_positive > m.positive_rate
    one = metrics.annotation_metrics(scores, np.ones(3000))
    assert math.isnan(one.auc) and "no negative" in one.auc_note


def test_spatial_null_matches_brute_force_shifts():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(18, 23))
    b = 0.6 * a + rng.normal(size=a.shape)
    a[:3, :4] = np.nan  # off tissue
    b[5:7, :] = np.nan
    res = metrics.spatial_null_p(a, b, n=None, min_shift=1, min_overlap=0.0)
    ok = np.isfinite(a) & np.isfinite(b)
    assert res["r"] == pytest.approx(stats.pearsonr(a[ok], b[ok]).statistic, abs=1e-9)
    for shift in [(3, 5), (17, 1), (9, 22)]:
        rolled = np.roll(a, shift, axis=(0, 1))
        ok = np.isfinite(rolled) & np.isfinite(b)
        r = stats.pearsonr(rolled[ok], b[ok]).statistic
        assert np.isclose(res["null"], r, atol=1e-9).any()
    assert res["n_shifts"] == a.size - 1
    assert res["p"] < 0.01  # strongly linked maps


def test_spatial_null_is_not_fooled_by_smooth_independent_maps():
    """Two smooth but unrelated maps: the tile-level p is tiny, the shift null is not."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(6)
    hits = 0
    for _ in range(5):
        a = gaussian_filter(rng.normal(size=(60, 60)), 6, mode="wrap")
        b = gaussian_filter(rng.normal(size=(60, 60)), 6, mode="wrap")
        naive = metrics.tile_metrics(a.ravel(), b.ravel()).pearson_p
        null = metrics.spatial_null_p(a, b, n=999)
        hits += (naive < 0.05) and (null["p"] >= 0.05)
        assert 0 < null["p"] <= 1 and null["n_shifts"] == 999
    assert hits >= 1


def test_compare_models_and_tables():
    rng = np.random.default_rng(7)
    truth = rng.poisson(3, 400).astype(float)
    tiles = pd.DataFrame({"tile_id": np.arange(400), "row": np.arange(400) // 20, "col": np.arange(400) % 20})
    scores = pd.DataFrame({"T cells": truth + rng.normal(size=400), "B cells": rng.normal(size=400)})
    res = metrics.compare_models(scores, ["T cells", "B cells"], truth)
    assert res["T cells"].pearson_r > 0.5 > res["B cells"].pearson_r
    assert res["T cells"].auc["p90"] > res["B cells"].auc["p90"]
    long = metrics.metrics_table(res, truth_name="CD3 count")
    assert set(long["score"]) == {"T cells", "B cells"} and (long["truth"] == "CD3 count").all()
    per_tile = metrics.compare_table(tiles, scores, {"CD3 count": truth})
    assert list(per_tile.columns) == ["tile_id", "row", "col", "T cells", "B cells", "CD3 count"]
    with pytest.raises(Exception, match="no score column 'CD8'"):
        metrics.compare_models(scores, ["CD8"], truth)
    per_slide = pd.DataFrame(
        {"slide": ["a", "b", "c"], "score": "T cells", "truth": "CD3", "pearson_r": [0.2, 0.4, 0.9]}
    )
    summary = metrics.summarize_slides(per_slide)
    assert list(summary["slide"]) == ["mean", "median", "sd"]
    assert summary["pearson_r"].iloc[0] == pytest.approx(0.5)
    assert summary["pearson_r"].iloc[1] == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------------
# he2rna compare on a synthetic slide


@pytest.fixture(scope="module")
def scored_slide(tmp_path_factory):
    """A synthetic slide, its truth files and a tile-scores CSV where "T cells" tracks the CD3 truth."""
    from napari_he2rna import synthetic
    from napari_he2rna.maps import exports

    out = tmp_path_factory.mktemp("scored")
    t = synthetic.make_slide(out / "s1.tiff", seed=11, size_px=(1120, 896))
    tiles = pd.read_csv(out / "s1_tiles.csv")
    n_rows, n_cols = int(tiles["row"].max()) + 1, int(tiles["col"].max()) + 1
    table = tiles[["row", "col", "x", "y", "size", "tissue_fraction"]].copy()
    table.insert(0, "tile_id", table["row"] * n_cols + table["col"])
    grid = TileGrid(table, t.tile_px, t.tile_px * t.mpp, t.mpp, n_rows, n_cols, t.dimensions)
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        {
            "T cells": np.log1p(tiles["t_cells"].to_numpy()) + rng.normal(scale=0.3, size=len(tiles)),
            "B cells": rng.normal(size=len(tiles)),
        }
    )
    csv, _ = exports.write_tile_scores_csv(
        out / "s1_tile_scores.csv", grid, scores, {"slide": "s1.tiff", "mpp": t.mpp}
    )
    return {"dir": out, "csv": csv, "slide": out / "s1.tiff", "tiles": tiles, "grid": grid, "scores": scores}


def test_read_tile_scores_round_trip(scored_slide):
    s = scored_slide
    grid, scores = metrics.read_tile_scores(s["csv"], slide_dimensions=s["grid"].slide_dimensions)
    assert list(scores.columns) == ["T cells", "B cells"]
    np.testing.assert_allclose(scores.to_numpy(), s["scores"].to_numpy(), rtol=1e-5)
    assert grid.tile_px == s["grid"].tile_px and grid.mpp == pytest.approx(s["grid"].mpp)
    assert (grid.n_rows, grid.n_cols) == (s["grid"].n_rows, s["grid"].n_cols)
    np.testing.assert_array_equal(grid.table["x"], s["grid"].table["x"])


def test_read_tile_scores_reads_the_old_commented_header_form(scored_slide, tmp_path):
    s = scored_slide
    table = pd.read_csv(s["csv"])
    old = tmp_path / "old_tile_scores.csv"  # no sidecar: the facts are only in the first line
    w, h = s["grid"].slide_dimensions
    header = f"# napari-he2rna tile scores (x); slide=s1.tiff; mpp=0.25; slide_width={w}; slide_height={h}\n"
    old.write_text(header + table.to_csv(index=False))
    grid, scores = metrics.read_tile_scores(old)
    assert list(scores.columns) == ["T cells", "B cells"]
    assert grid.mpp == pytest.approx(0.25) and grid.slide_dimensions == (w, h)


def test_read_tile_scores_takes_facts_from_the_sidecar(scored_slide):
    s = scored_slide
    assert not s["csv"].read_text().startswith("#")
    grid, _ = metrics.read_tile_scores(s["csv"])  # no slide given: its size comes from the sidecar
    assert grid.slide_dimensions == tuple(s["grid"].slide_dimensions)
    assert grid.mpp == pytest.approx(s["grid"].mpp)


def test_cli_compare_one_slide(scored_slide, tmp_path, capsys):
    s = scored_slide
    out = tmp_path / "out"
    code = main(
        [
            "compare", "--scores", str(s["csv"]), "--slide", str(s["slide"]),
            "--cells", str(s["dir"] / "s1_CD3.tsv"), "--class", "Positive",
            "--mask", str(s["dir"] / "s1_epithelium_mask.png"),
            "--annotations", str(s["dir"] / "s1_tumor.geojson"), "--annotation-class", "Tumor",
            "--out", str(out), "--top-n", "5",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tiles = pd.read_csv(out / "tiles.csv")
    np.testing.assert_array_equal(tiles["cell count (Positive)"], s["tiles"]["t_cells"])
    np.testing.assert_allclose(tiles["mask fraction"], s["tiles"]["epithelium_fraction"], atol=1e-4)
    metrics = pd.read_csv(out / "metrics.csv")
    r = metrics.query("score == 'T cells' and truth == 'cell count (Positive)' and metric == 'pearson_r'")
    r_b = metrics.query("score == 'B cells' and truth == 'cell count (Positive)' and metric == 'pearson_r'")
    assert r["value"].iloc[0] > 0.8 > abs(r_b["value"].iloc[0])
    assert {"annotation_auc", "top_n_share_inside", "roc_auc"} <= set(metrics["metric"])
    assert "pearson_r" in capsys.readouterr().out
    # no overwrite without --overwrite; a wrong column is explained
    assert main(["compare", "--scores", str(s["csv"]), "--slide", str(s["slide"]), "--cells",
                 str(s["dir"] / "s1_CD3.tsv"), "--out", str(out)]) == 2  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err
    cd3 = str(s["dir"] / "s1_CD3.tsv")
    args = [
        "compare",
        "--scores",
        str(s["csv"]),
        "--slide",
        str(s["slide"]),
        "--cells",
        cd3,
        "--column",
        "CD8",
    ]
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2
    assert "no column 'CD8'" in capsys.readouterr().err


def test_cli_compare_manifest(scored_slide, tmp_path, capsys):
    s = scored_slide
    d = s["dir"]
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame(
        {
            "slide": [str(s["slide"]), str(s["slide"]), "missing.tiff"],
            "scores": [str(s["csv"]), str(s["csv"]), str(s["csv"])],
            "cells": [str(d / "s1_CD3.tsv"), str(d / "s1_CD3.tsv"), str(d / "s1_CD3.tsv")],
            "class": ["Positive", "CD8+", "Positive"],
            "annotations": [str(d / "s1_tumor.geojson"), "", ""],
            "width": ["", "", "1120"],
            "height": ["", "", "896"],
        }
    ).to_csv(manifest, index=False)
    out = tmp_path / "cohort"
    code = main(["compare", "--manifest", str(manifest), "--column", "T cells", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2  # one slide failed (an empty class), and says so
    assert "CD8+" in captured.err and "classes present" in captured.err
    per_slide = pd.read_csv(out / "per_slide.csv")
    ok = per_slide[per_slide["score"].notna() & ~per_slide["slide"].isin(["mean", "median", "sd"])]
    assert len(ok) == 3  # slide 1: cells + annotation; slide 3 (size from the manifest): cells
    assert set(per_slide["slide"]) >= {"mean", "median", "sd"}
    mean_r = per_slide.query("slide == 'mean' and truth == 'cell count (Positive)'")["pearson_r"].iloc[0]
    assert mean_r == pytest.approx(ok.query("truth == 'cell count (Positive)'")["pearson_r"].mean())
    assert (out / "s1_tiles.csv").is_file() and (out / "metrics.csv").is_file()


def test_read_tile_scores_reads_the_earlier_predict_form(scored_slide, tmp_path):
    """Earlier ``he2rna predict``: ``tile_id, row, col, x, y`` then genes, no size, no sidecar."""
    s = scored_slide
    table = pd.read_csv(s["csv"]).rename(columns={"x_px": "x", "y_px": "y"})
    old = tmp_path / "old_predict_tile_scores.csv"
    table[["tile_id", "row", "col", "x", "y", "T cells", "B cells"]].to_csv(old, index=False)
    dims, mpp = s["grid"].slide_dimensions, s["grid"].mpp
    grid, scores = metrics.read_tile_scores(old, slide_dimensions=dims, mpp=mpp)
    assert list(scores.columns) == ["T cells", "B cells"]
    assert grid.tile_px == s["grid"].tile_px and grid.tile_side_um == pytest.approx(s["grid"].tile_side_um)
    assert (grid.n_rows, grid.n_cols) == (s["grid"].n_rows, s["grid"].n_cols)
