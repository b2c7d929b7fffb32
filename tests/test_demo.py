"""The bundled demo model: what it is, that it recovers the planted truth, and that it can be rebuilt.

(a) the committed bundle loads and says what it is; (b) on the committed sample slide, its per-tile scores
put the T-cell genes where the T cells are, the B-cell genes on the follicles and the epithelial genes on
the tumour nests (the truth is the slide's ``_tiles.csv``); (c) the committed evaluation report shows the
planted genes significant on held-out slides and the housekeeping controls not; (d) a small
``build_demo_model`` run writes a loadable bundle (wiring only; accuracy is (b) and (c)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.model.bundle import load_bundle
from napari_he2rna.model.demo import build_demo_model, planted_gene_sets, significance_counts
from napari_he2rna.synthetic import GENE_PANEL, HOUSEKEEPING

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
MODEL = SAMPLE / "demo_model.safetensors"
REPORT = SAMPLE / "demo_model_report"

T_GENES = planted_gene_sets()["t_density"]
B_GENES = planted_gene_sets()["b_density"]
EPI_GENES = planted_gene_sets()["epithelium"]


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(MODEL)


@pytest.fixture(scope="module")
def sample_tiles(tmp_path_factory):
    """hed-stats features of the sample slide's tiles and the truth of those tiles, row-aligned."""
    from napari_he2rna.features.cache import load_or_extract
    from napari_he2rna.slides.slide import open_slide

    cache = tmp_path_factory.mktemp("demo-features")
    with open_slide(SAMPLE / "sample_slide.tiff") as slide:
        grid, feats = load_or_extract(slide, "hed-stats", cache_dir=cache, device="cpu")
    truth = pd.read_csv(SAMPLE / "sample_slide_tiles.csv")
    truth = grid.table[["row", "col"]].merge(truth, on=["row", "col"], how="left", validate="one_to_one")
    assert len(truth) == len(feats) and truth["t_cells"].notna().all()
    return feats, truth


def _r(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def test_bundle_is_the_flagged_demo_model(bundle):
    assert bundle.demo is True
    assert bundle.backbone == "hed-stats"
    assert bundle.tile_um == pytest.approx(112.0)
    assert set(GENE_PANEL) | set(HOUSEKEEPING) <= set(bundle.genes)
    assert bundle.n_folds == 5
    assert "synthetic" in bundle.metadata["trained_on"]
    assert "DEMO" in bundle.describe()


def test_set_scores_follow_the_planted_cells_on_the_sample_slide(bundle, sample_tiles):
    feats, truth = sample_tiles
    scores = bundle.tile_scores(feats, T_GENES + B_GENES + EPI_GENES)
    t_set = scores[:, : len(T_GENES)].mean(1)
    b_set = scores[:, len(T_GENES) : len(T_GENES) + len(B_GENES)].mean(1)
    epi_set = scores[:, len(T_GENES) + len(B_GENES) :].mean(1)
    r_t_t, r_b_t = _r(t_set, truth["t_cells"]), _r(b_set, truth["t_cells"])
    r_b_b, r_t_b = _r(b_set, truth["b_cells"]), _r(t_set, truth["b_cells"])
    r_epi = _r(epi_set, truth["epithelium_fraction"])
    # Measured with the committed model: see sample_data/README.md ("Demo model").
    assert r_t_t > 0.4 and r_t_t > r_b_t + 0.2
    assert r_b_b > 0.4 and r_b_b > r_t_b + 0.2
    assert r_epi > 0.4


def test_committed_report_shows_planted_genes_significant_and_controls_not(bundle):
    per_gene = pd.read_csv(REPORT / "per_gene.csv")
    assert (REPORT / "report.md").is_file()
    holm = significance_counts(per_gene, "significant")
    bh = significance_counts(per_gene, "significant_bh")
    assert set(holm) == set(bh) == {"SYN-BRCA", "SYN-COAD", "SYN-LUAD"}
    for ctype in holm:
        # No housekeeping control is called, by either correction.
        assert holm[ctype]["controls_significant"] == 0 and bh[ctype]["controls_significant"] == 0
        # Benjamini-Hochberg on the pooled out-of-fold R: every planted gene but ADIPOQ (fat: the Otsu tissue
        # mask drops fat tiles, so the model never sees its driver; see README "Demo model").
        pooled = significance_counts(per_gene, "significant_bh_pooled")[ctype]
        assert pooled["planted_significant"] == pooled["planted"] - 1 and pooled["controls_significant"] == 0
        # On the fold-averaged R, measured with the committed model: 16/16/14 (BH), 16/16/13 (Holm-Sidak);
        # SYN-LUAD's proliferation genes (MKI67, TOP2A) fall just short.
        assert bh[ctype]["planted_significant"] >= 14
        assert holm[ctype]["planted_significant"] >= 13
    sig = per_gene.query("gene == 'ADIPOQ'")["significant_bh"]
    assert not sig.any()
    b_genes = per_gene[per_gene["gene"].isin(B_GENES)]
    assert b_genes["significant"].all()
    # The bundle carries the same numbers as the report it was written with.
    assert bundle.metadata["evaluation"]["significance_counts_holm_sidak"] == holm
    assert bundle.metadata["evaluation"]["significance_counts_bh"] == bh
    assert bundle.metadata["per_gene_r"]["CD3D"]["SYN-BRCA"] == pytest.approx(
        per_gene.query("gene == 'CD3D' and cancer_type == 'SYN-BRCA'")["r"].item(), abs=1e-4
    )


def test_small_build_writes_a_loadable_demo_bundle(tmp_path):
    calls = []
    out, ev = build_demo_model(
        tmp_path / "tiny.safetensors",
        tmp_path / "work",
        n_slides=9,
        seed=3,
        size_px=(896, 896),
        hidden=(16,),
        epochs=2,
        patience=2,
        n_folds=3,
        null_inits=3,
        progress=lambda d, t, m: calls.append((d, t, m)),
    )
    b = load_bundle(out)
    assert b.demo and b.backbone == "hed-stats" and b.n_folds == 3
    assert b.genes == list(GENE_PANEL) + list(HOUSEKEEPING)
    assert "seed 3, 9 slides" in b.metadata["trained_on"]
    assert set(b.metadata["folds"]) == {f"SYN-{i:04d}" for i in range(9)}
    assert (tmp_path / "tiny_report" / "report.md").is_file()
    assert set(ev.per_gene["gene"]) == set(b.genes)
    assert calls[-1][0] == calls[-1][1]  # the progress bar ends full
