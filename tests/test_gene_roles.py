"""Which genes are planted and which are controls: ``make-sample`` writes ``genes.tsv``, and ``evaluate
--gene-roles`` (alias ``--truth``) splits its result over them, as the README's walkthrough table shows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.errors import DataError
from napari_he2rna.model.evaluation import Evaluation
from napari_he2rna.model.planted_truth import read_gene_roles, split_display, truth_split, truth_split_table
from napari_he2rna.synthetic import GENE_PANEL, HOUSEKEEPING

DRIVERS = {"CD3D": "T cells", "MS4A1": "B cells", "KRT8": "epithelium", "MKI67": "proliferation"}
DRIVERS |= {"COL1A1": "stroma", "ADIPOQ": "fat"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cli_in_process):
    """8 small slides (as tests/test_train_cli.py), 22 controls (20 housekeeping genes + CTRL0001/2)."""
    root = tmp_path_factory.mktemp("roles")
    args = ("--n-slides", "8", "--size", "672", "672", "--seed", "5", "--n-controls", "22", "--quiet")
    proc = cli_in_process("make-sample", root / "cohort", *args, "--cancer-types", "SYN-BRCA", "SYN-COAD")
    assert proc.returncode == 0, proc.stderr
    return root, proc.stdout


def test_make_sample_writes_the_role_of_every_gene(tiny):
    root, stdout = tiny
    table = pd.read_csv(root / "cohort" / "genes.tsv", sep="\t", keep_default_na=False)
    expression = pd.read_csv(root / "cohort" / "expression.tsv", sep="\t", index_col=0)
    assert list(table.columns) == ["gene", "role", "driver", "visible"]
    assert table["gene"].tolist() == list(expression.columns)  # every gene, in the expression's order
    roles = table.set_index("gene")
    assert roles.loc[list(GENE_PANEL), "role"].eq("planted").all()
    controls = [*HOUSEKEEPING, "CTRL0001", "CTRL0002"]
    assert roles.loc[controls, "role"].eq("control").all() and roles.loc[controls, "driver"].eq("noise").all()
    for gene, driver in DRIVERS.items():
        assert roles.loc[gene, "driver"] == driver, gene
    # fat is not tissue: ADIPOQ is planted but no tile shows its driver
    assert roles.loc[[g for g in GENE_PANEL if g != "ADIPOQ"], "visible"].eq("yes").all()
    assert roles.loc["ADIPOQ", "visible"] == "no"
    parsed = read_gene_roles(root / "cohort" / "genes.tsv")
    assert len(parsed.planted) == 16 and parsed.not_visible == ("ADIPOQ",) and len(parsed.controls) == 22
    assert (
        "genes.tsv: 16 visible planted genes, 22 noise-only controls" in stdout and "ADIPOQ (fat)" in stdout
    )


def _evaluation(per_gene: pd.DataFrame) -> Evaluation:
    return Evaluation(per_gene, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())


def test_the_split_counts_visible_planted_genes_and_controls_apart(tmp_path):
    path = tmp_path / "genes.tsv"
    path.write_text(
        "gene\trole\tdriver\tvisible\nA\tplanted\tT cells\tyes\nB\tplanted\tT cells\tyes\n"
        "C\tplanted\tB cells\tyes\nF\tplanted\tfat\tno\nX\tcontrol\tnoise\tno\nY\tcontrol\tnoise\tno\n"
    )
    roles = read_gene_roles(path)
    rows = []
    for t, sig in (("T1", [1, 1, 0, 1, 1, 0, 0]), ("T2", [0, 0, 0, 1, 0, 0, 1])):
        for gene, s, r in zip("ABCFXYZ", sig, [0.9, 0.5, 0.1, 0.95, 0.7, 0.0, 0.8], strict=True):
            rows.append(
                {
                    "cancer_type": t,
                    "gene": gene,
                    "r": r,
                    "r_pooled_folds": r - 0.05,
                    "significant": bool(s),
                    "significant_bh": bool(s),
                    "significant_bh_pooled": bool(s) and gene != "A",
                }
            )
    split = truth_split(_evaluation(pd.DataFrame(rows)), roles).set_index("cancer_type")
    # F (planted, not visible) and Z (no role) are not counted; the median is over the same 3 planted genes
    assert split.loc["T1", "n_planted"] == 3 and split.loc["T1", "n_controls"] == 2
    assert (
        split.loc["T1", "planted_significant_bh"] == 2
        and split.loc["T1", "planted_significant_bh_pooled"] == 1
    )
    assert split.loc["T1", "controls_significant_bh"] == 1 and split.loc["T1", "controls_significant"] == "X"
    assert split.loc["T1", "median_r_planted"] == pytest.approx(0.5)
    assert split.loc["T1", "median_r_planted_pooled"] == pytest.approx(0.45)
    assert split.loc["T1", "planted_not_significant_bh"] == "C"
    assert split.loc["T2", "planted_significant_bh"] == 0 and split.loc["T2", "controls_significant"] == ""
    # without an untrained null there is no test: the counts are empty, the medians are still there
    untested = pd.DataFrame(rows).drop(columns=["significant", "significant_bh", "significant_bh_pooled"])
    shown = split_display(truth_split_table({"M": _evaluation(untested)}, roles))
    assert shown["planted significant (BH)"].tolist() == ["–", "–"]
    assert shown["median R of planted (pooled)"].tolist() == [0.45, 0.45]
    two = truth_split_table(
        {"M": _evaluation(pd.DataFrame(rows)), "ridge": _evaluation(pd.DataFrame(rows))}, roles
    )
    assert two[["cancer_type", "model"]].values.tolist() == [
        ["T1", "M"],
        ["T1", "ridge"],
        ["T2", "M"],
        ["T2", "ridge"],
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("gene_id\tsymbol\tgene_type\nENSG1\tCD3D\tprotein_coding\n", "no `gene` and no `role` column"),
        ("gene\trole\nA\tplanted\nB\thousekeeping\n", "unknown role(s) 'housekeeping'"),
        ("gene\trole\tvisible\nA\tplanted\tmaybe\n", "use yes or no"),
        ("gene\trole\nA\tplanted\nA\tcontrol\n", "lists gene(s) twice: A"),
    ],
)
def test_a_malformed_roles_file_is_one_sentence(tmp_path, text, words):
    path = tmp_path / "genes.tsv"
    path.write_text(text)
    with pytest.raises(DataError, match=None) as err:
        read_gene_roles(path)
    assert words in str(err.value)


@pytest.mark.slow
def test_evaluate_prints_the_planted_control_split_and_writes_it(tiny, cli_in_process):
    root, _ = tiny
    cohort, model, report = root / "cohort", root / "model.safetensors", root / "report"
    common = ("--samples", cohort / "samples.tsv", "--expression", cohort / "expression.tsv")
    common += ("--cache-dir", root / "features")
    proc = cli_in_process(
        "train", *common, "--backbone", "hed-stats", "--supertiles", "--hidden", "8", "--epochs", "2",
        "--folds", "2", "--out", model,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli_in_process(
        "evaluate",
        "--model",
        model,
        *common,
        "--out",
        report,
        "--null-inits",
        "3",
        "--truth",
        cohort / "genes.tsv",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "16 visible planted genes, 22 noise-only controls" in proc.stdout
    split = pd.read_csv(report / "planted_truth.csv", keep_default_na=False)
    models = ["ensemble (HE2RNA + linear)", "ridge baseline"]  # the default model, evaluated beside ridge
    assert split[["cancer_type", "model"]].values.tolist() == [
        [t, m] for t in ("SYN-BRCA", "SYN-COAD") for m in models
    ]
    # the counts are those of per_gene.csv over the 16 visible planted genes and the 22 controls
    planted = [g for g in GENE_PANEL if g != "ADIPOQ"]
    controls = [*HOUSEKEEPING, "CTRL0001", "CTRL0002"]
    block = proc.stdout.split("planted truth (")[1].splitlines()  # what --truth adds to the output
    for model_name, file in ((models[0], "per_gene.csv"), ("ridge baseline", "baseline_per_gene.csv")):
        per_gene = pd.read_csv(report / file)
        for t, sub in per_gene.groupby("cancer_type"):
            sub = sub.set_index("gene")
            row = split[(split["cancer_type"] == t) & (split["model"] == model_name)].iloc[0]
            assert (row["n_planted"], row["n_controls"]) == (16, 22)
            assert row["planted_significant_bh"] == sub.loc[planted, "significant_bh"].sum()
            assert row["planted_significant_bh_pooled"] == sub.loc[planted, "significant_bh_pooled"].sum()
            assert row["controls_significant_bh"] == sub.loc[controls, "significant_bh"].sum()
            assert row["median_r_planted_pooled"] == pytest.approx(
                np.median(sub.loc[planted, "r_pooled_folds"])
            )
            line = next(ln for ln in block if ln.split()[:2] == [t, model_name.split()[0]])
            assert f"{int(row['planted_significant_bh'])} / 16" in line
            assert f"{int(row['controls_significant_bh'])} / 22" in line
    text = (report / "report.md").read_text()
    assert "## Planted genes and controls" in text and "planted_truth.csv" in text
    assert "ADIPOQ (fat)" in text
