"""``he2rna train`` on cohorts that cannot be trained on: one sentence, a non-zero exit, no bundle written."""

from __future__ import annotations

import pandas as pd
import pytest

from napari_he2rna.synthetic import make_cohort


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_cohort(
        root / "cohort", n_slides=8, seed=5, size_px=(672, 672), cancer_types=["SYN-BRCA", "SYN-COAD"]
    )
    return root


@pytest.fixture(scope="session")
def train(cli_in_process):
    """``he2rna train`` on the tiny cohort with ``extra`` arguments (in this process: see conftest)."""

    def run(root, *extra: str, samples: str = "samples.tsv", expression: str = "expression.tsv"):
        cohort = root / "cohort"
        out = root / "model.safetensors"
        proc = cli_in_process(
            "train",
            "--samples",
            cohort / samples,
            "--expression",
            cohort / expression,
            "--cache-dir",
            root / "features",
            "--backbone",
            "hed-stats",
            "--hidden",
            "8",
            "--epochs",
            "2",
            "--out",
            out,
            *extra,
        )
        return proc, out

    return run


def one_sentence_error(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("he2rna: error")]
    assert len(line) == 1, proc.stderr
    return line[0]


def test_too_few_patients_for_the_folds(small_cohort, train):
    proc, out = train(small_cohort, "--folds", "10")
    msg = one_sentence_error(proc)
    assert "patients, too few for 10 folds" in msg and "--folds" in msg
    assert not out.exists()


def test_a_cancer_type_with_one_sample(small_cohort, train):
    sheet = pd.read_csv(small_cohort / "cohort" / "samples.tsv", sep="\t")
    sheet.loc[0, "cancer_type"] = "SYN-RARE"
    sheet.to_csv(small_cohort / "cohort" / "samples_rare.tsv", sep="\t", index=False)
    proc, out = train(small_cohort, "--folds", "2", samples="samples_rare.tsv")
    msg = one_sentence_error(proc)
    assert "SYN-RARE (1 sample)" in msg
    assert not out.exists()


def test_a_gene_constant_in_a_fold(small_cohort, train):
    expr = pd.read_csv(small_cohort / "cohort" / "expression.tsv", sep="\t", index_col=0)
    expr["CD3D"] = 1.5
    expr.to_csv(small_cohort / "cohort" / "expression_const.tsv", sep="\t")
    proc, out = train(small_cohort, "--folds", "2", expression="expression_const.tsv")
    msg = one_sentence_error(proc)
    assert "CD3D" in msg and "constant" in msg
    assert not out.exists()


def test_a_validation_fraction_out_of_range(small_cohort, train):
    proc, out = train(small_cohort, "--folds", "2", "--val-fraction", "1.5")
    assert "validation fraction" in one_sentence_error(proc)
    assert not out.exists()


def test_an_ensemble_bundle_is_fine_tuned_through_its_he2rna_part(small_cohort, train):
    """The default bundle (HE2RNA and ridge averaged) starts a fine-tuning run (e.g. supertiles -> all tiles):
    each fold's HE2RNA starts from the bundle's, the linear baseline is fitted again."""
    from napari_he2rna.model.bundle import load_bundle

    proc, first = train(small_cohort, "--folds", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model-type ridge" in proc.stdout  # the per-gene comparison line
    # by default the ensemble's HE2RNA is trained with --anchor 1 (HE2RNA alone: the paper's, no anchor)
    assert load_bundle(first).metadata["training"]["anchor"] == 1.0
    assert "HE2RNA alone (anchored, 1)" in proc.stdout
    assert (
        "the linear baseline (ridge per gene) first, on the same folds (HE2RNA is held near its map)"
        in proc.stdout
    )
    tuned = small_cohort / "tuned.safetensors"
    proc, _ = train(small_cohort, "--init-model", first, "--tiles", "--epochs", "1", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first.rename(tuned)
    bundle = load_bundle(tuned)
    assert bundle.metadata["fine_tuned_from"] == str(first)
    assert bundle.linear_weight == 0.5 and bundle.metadata["training"]["mode"] == "tiles"


@pytest.mark.parametrize("weight", ["0", "1", "1.5"])
def test_a_linear_weight_outside_zero_one(small_cohort, train, weight):
    proc, out = train(small_cohort, "--folds", "2", "--linear-weight", weight)
    assert "--linear-weight must lie between 0 and 1" in one_sentence_error(proc)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [(("--anchor", "-1"), "0 or more"), (("--anchor", "1", "--model-type", "ridge"), "no anchor")],
)
def test_an_anchor_below_zero_or_on_the_ridge_baseline(small_cohort, train, extra, says):
    proc, out = train(small_cohort, "--folds", "2", *extra)
    assert says in one_sentence_error(proc)
    assert not out.exists()


def test_an_anchored_he2rna_bundle_says_so(small_cohort, train):
    from napari_he2rna.model.bundle import load_bundle

    proc, out = train(small_cohort, "--folds", "2", "--model-type", "he2rna", "--anchor", "1", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = load_bundle(out)
    assert bundle.metadata["training"]["anchor"] == 1.0 and not bundle.linear_genes
    assert "anchor 1" in bundle.describe()
    proc, out = train(small_cohort, "--folds", "2", "--model-type", "he2rna", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "anchor" not in load_bundle(out).metadata["training"]  # the paper's HE2RNA
