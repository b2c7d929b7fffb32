"""HE2RNA, its linear baseline and their ensemble, gene by gene: what ``he2rna train`` says after training.

The default model (``--model-type ensemble``, :mod:`.blend`) averages HE2RNA and the ridge baseline trained on
the same folds. A user should still know when the linear baseline alone predicts a gene better than HE2RNA
(on 40–60 slides it often does: ``docs/training.md``): :class:`GeneComparison` holds every gene's
out-of-fold R for the three models and says it in one sentence, with the option that keeps the linear model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

HE2RNA_NAME = "HE2RNA"
LINEAR_NAME = "linear baseline"
ENSEMBLE_NAME = "ensemble"


def per_type_r(y: np.ndarray, pred: np.ndarray, types: np.ndarray) -> np.ndarray:
    """``(n_genes,)`` mean over cancer types of each gene's Pearson R between ``y`` and ``pred`` (types with
    fewer than 3 samples or a constant column are left out; NaN when no type is left)."""
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    types = np.asarray(types).astype(str)
    out = np.full((len(np.unique(types)), y.shape[1]), np.nan)
    for i, t in enumerate(np.unique(types)):
        sel = types == t
        if sel.sum() < 3:
            continue
        a = y[sel] - y[sel].mean(axis=0)
        b = pred[sel] - pred[sel].mean(axis=0)
        den = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = np.where(den > 0, (a * b).sum(axis=0) / den, np.nan)
    with warnings.catch_warnings():  # an all-NaN gene (no type with a usable R) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(out, axis=0)


def _median(values: np.ndarray) -> float:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


@dataclass
class GeneComparison:
    """Every gene's out-of-fold R (mean over cancer types of the per-type R) for the three models, trained and
    evaluated on the same folds."""

    genes: list[str]
    r_he2rna: np.ndarray
    r_linear: np.ndarray
    r_ensemble: np.ndarray
    oof_he2rna: pd.DataFrame | None = None  # each model's own out-of-fold predictions
    oof_linear: pd.DataFrame | None = None
    anchor: float = 0.0  # HE2RNA's tile scores were held near the linear map in training (--anchor)

    @property
    def linear_better(self) -> np.ndarray:
        """Bool ``(G,)``: the linear baseline alone has the higher R than HE2RNA (a NaN R loses)."""
        a = np.where(np.isfinite(self.r_he2rna), self.r_he2rna, -np.inf)
        b = np.where(np.isfinite(self.r_linear), self.r_linear, -np.inf)
        return b > a

    def table(self) -> pd.DataFrame:
        """One row per gene: the three R and the best of them."""
        r = np.stack([self.r_he2rna, self.r_linear, self.r_ensemble], axis=1)
        names = np.array([HE2RNA_NAME, LINEAR_NAME, ENSEMBLE_NAME])
        best = names[np.argmax(np.where(np.isfinite(r), r, -np.inf), axis=1)]
        return pd.DataFrame(
            {
                "gene": self.genes,
                "r_he2rna": np.round(self.r_he2rna, 4),
                "r_linear": np.round(self.r_linear, 4),
                "r_ensemble": np.round(self.r_ensemble, 4),
                "best": best,
            }
        )

    def headline(self) -> str:
        """One sentence for the CLI and the report."""
        lin, n = self.linear_better, len(self.genes)
        alone = f"HE2RNA alone (anchored, {self.anchor:g})" if self.anchor else "HE2RNA alone"
        ens = (
            f"the ensemble of both (this bundle) {_median(self.r_ensemble):.2f}, {alone} "
            f"{_median(self.r_he2rna):.2f}, the linear baseline alone {_median(self.r_linear):.2f}"
        )
        he2rna_option = (
            f"--model-type he2rna --anchor {self.anchor:g}" if self.anchor else "--model-type he2rna"
        )
        if not lin.any():
            return (
                f"HE2RNA is at least as good as the linear baseline on all {n} genes (median out-of-fold R: "
                f"{ens})."
            )
        return (
            f"The linear baseline alone is better than HE2RNA on this cohort for {int(lin.sum())} of {n} "
            f"genes (median out-of-fold R on them {_median(self.r_linear[lin]):.2f} vs "
            f"{_median(self.r_he2rna[lin]):.2f}, the ensemble {_median(self.r_ensemble[lin]):.2f}); over "
            f"all genes: {ens}. Use --model-type ridge to keep the linear baseline alone, {he2rna_option} "
            "for HE2RNA alone."
        )


def compare_genes(
    y: pd.DataFrame,
    oof_he2rna: pd.DataFrame,
    oof_linear: pd.DataFrame,
    oof_ensemble: pd.DataFrame,
    types: np.ndarray,
    anchor: float = 0.0,
) -> GeneComparison:
    """:class:`GeneComparison` of three models' out-of-fold predictions on the same samples and genes
    (``anchor``: HE2RNA's, see :attr:`GeneComparison.anchor`)."""
    genes = list(y.columns)
    yv = y.to_numpy(np.float64)

    def r(pred: pd.DataFrame) -> np.ndarray:
        return per_type_r(yv, pred.loc[y.index, genes].to_numpy(np.float64), types)

    return GeneComparison(
        genes, r(oof_he2rna), r(oof_linear), r(oof_ensemble), oof_he2rna, oof_linear, float(anchor)
    )


def comparison_markdown(comparison: GeneComparison, max_rows: int = 60) -> str:
    """The report's section on the three models, gene by gene."""
    table = comparison.table()
    lines = [
        "## HE2RNA, the linear baseline and their ensemble, gene by gene",
        "",
        comparison.headline(),
        "",
        "R is the out-of-fold Pearson R, mean over cancer types, of each model trained on the same folds; "
        "the ensemble (the default, `--model-type ensemble`) scores each tile with the mean of both models "
        "and aggregates like HE2RNA. All genes are in `gene_models.csv`.",
        "",
        *(
            [
                f"HE2RNA here is the ensemble's own, trained with its tile scores held near the linear "
                f"baseline's map (`--anchor {comparison.anchor:g}`), not the paper's model alone.",
                "",
            ]
            if comparison.anchor
            else []
        ),
        "| gene | R HE2RNA | R linear baseline | R ensemble | best |",
        "|---|---|---|---|---|",
    ]
    for row in table.head(max_rows).itertuples():
        lines.append(
            f"| {row.gene} | {row.r_he2rna:.3f} | {row.r_linear:.3f} | {row.r_ensemble:.3f} | {row.best} |"
        )
    if len(table) > max_rows:
        lines.append(f"| ... {len(table) - max_rows} more genes in gene_models.csv | | | | |")
    return "\n".join(lines) + "\n"


def null_strength_notes(summary: pd.DataFrame, strong: float = 0.5) -> list[str]:
    """One sentence per cancer type whose untrained null is strong (its 99th percentile R >= ``strong``):
    there, a gene needs about that R to be called, whatever the model (``summary``: an evaluation's
    per-type table with ``cancer_type`` and ``null_r_q99``)."""
    notes = []
    if "null_r_q99" not in summary:
        return notes
    for row in summary.itertuples():
        q = float(row.null_r_q99)
        if np.isfinite(q) and q >= strong:
            notes.append(
                f"{row.cancer_type}: the untrained network already reaches R {q:.2f} at its 99th "
                f"percentile on these features, so a gene needs R of about {q:.2f} or more to be called "
                "significant, by any model; more slides of this type, not a looser test, is what helps."
            )
    return notes
