"""How well a model predicts expression: per gene, per cancer type, against an untrained null.

Following the paper's Methods: Pearson R is computed per gene and *separately per cancer type* (pooling
organs would reward recognising the organ); R per fold is averaged over the folds. A gene is significantly
predicted in a cancer type when its R beats the distribution of R given by the same architecture untrained
(empirical one-sided p, pooled over the genes of that type and several random inits), corrected per cancer
type with Holm–Šidák (and Benjamini–Hochberg) through statsmodels. As in SEQUOIA, a Steiger test for
dependent correlations also compares R(truth, trained) with R(truth, untrained) on the same samples. Gene
sets are compared with 10,000 random sets of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..safe_output import staged_folder

# ------------------------------------------------------------------------------------------ correlation


def pearson_columns(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson R of each column of ``truth`` with the same column of ``pred``.

    Parameters
    ----------
    truth, pred
        ``(n_samples, n_genes)``.

    Returns
    -------
    np.ndarray
        ``(n_genes,)`` float64; NaN where fewer than 3 samples or a column is constant.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and predictions {p.shape} differ in shape")
    if t.ndim == 1:
        t, p = t[:, None], p[:, None]
    if t.shape[0] < 3:
        return np.full(t.shape[1], np.nan)
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    den = np.sqrt((tc**2).sum(axis=0) * (pc**2).sum(axis=0))
    # Relative tolerance: a column constant up to rounding has no defined correlation.
    tiny = den <= 1e-12 * (np.abs(t).max(axis=0) * np.abs(p).max(axis=0) * t.shape[0] + 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (tc * pc).sum(axis=0) / den
    r[tiny] = np.nan
    return np.clip(r, -1.0, 1.0)


def pearson_by_type(
    truth: np.ndarray,
    pred: np.ndarray,
    cancer_types: Sequence[str] | np.ndarray,
    genes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Pearson R per cancer type (rows, sorted) and gene (columns); never pooled across types."""
    types = np.asarray(cancer_types).astype(str)
    truth, pred = np.asarray(truth), np.asarray(pred)
    names = list(genes) if genes is not None else list(range(truth.shape[1]))
    rows = {}
    for t in sorted(set(types)):
        sel = types == t
        rows[t] = pearson_columns(truth[sel], pred[sel])
    return pd.DataFrame.from_dict(rows, orient="index", columns=names)


def mean_r_by_type(truth: np.ndarray, pred: np.ndarray, cancer_types: Sequence[str] | np.ndarray) -> float:
    """The early-stopping criterion: mean over cancer types and genes of the per-type Pearson R.

    Types with fewer than 3 samples are skipped (R is undefined); undefined R (constant prediction) counts
    as 0, so a model cannot improve by collapsing outputs. NaN when no type has 3 samples.
    """
    r = pearson_by_type(truth, pred, cancer_types)
    types = pd.Series(np.asarray(cancer_types).astype(str)).value_counts()
    r = r.loc[[t for t in r.index if types.get(t, 0) >= 3]]
    if r.empty:
        return float("nan")
    return float(np.nan_to_num(r.to_numpy(), nan=0.0).mean())


def r_per_fold(
    truth: np.ndarray, pred: np.ndarray, cancer_types: np.ndarray, folds: np.ndarray, genes: Sequence[str]
) -> pd.DataFrame:
    """Long table: fold, cancer_type, gene, r, n (samples of that type in that fold)."""
    types = np.asarray(cancer_types).astype(str)
    frames = []
    for f in sorted(set(np.asarray(folds).tolist())):
        sel = folds == f
        r = pearson_by_type(truth[sel], pred[sel], types[sel], genes)
        counts = pd.Series(types[sel]).value_counts()
        long = (
            r.rename_axis("cancer_type")
            .reset_index()
            .melt(id_vars="cancer_type", var_name="gene", value_name="r")
        )
        long.insert(0, "fold", int(f))
        long["n"] = long["cancer_type"].map(counts).astype(int)
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


def _fold_mean_r(truth, pred, types, folds, type_names) -> np.ndarray:
    """``(n_types, n_genes)``: per type, R within each fold, averaged over folds (NaN folds skipped)."""
    out = np.full((len(type_names), truth.shape[1]), np.nan)
    for ti, t in enumerate(type_names):
        per = []
        for f in np.unique(folds):
            sel = (types == t) & (folds == f)
            if sel.sum() >= 3:
                per.append(pearson_columns(truth[sel], pred[sel]))
        if per:
            with np.errstate(all="ignore"), _quiet():
                out[ti] = np.nanmean(np.vstack(per), axis=0)
        elif (types == t).sum() >= 3:  # no fold holds 3 samples of this type: R over all its samples
            out[ti] = pearson_columns(truth[types == t], pred[types == t])
    return out


def pooled_null_r(
    truth: np.ndarray, null_predictions: np.ndarray, types: np.ndarray, cancer_type: str
) -> np.ndarray:
    """R of every untrained init and gene over all samples of one cancer type (folds pooled), flattened."""
    sel = np.asarray(types).astype(str) == cancer_type
    out = [pearson_columns(truth[sel], np.asarray(p)[sel]) for p in null_predictions]
    r = np.concatenate(out) if out else np.zeros(0)
    return r[np.isfinite(r)]


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# ------------------------------------------------------------------------------------------ tests


def empirical_p(r_obs: np.ndarray, null_r: np.ndarray) -> np.ndarray:
    """One-sided empirical p: ``(1 + #{null >= r}) / (1 + n_null)`` for each observed R (NaN stays NaN).

    The +1 keeps p away from 0 (the observed value counts as one draw of the null), so the smallest p is
    ``1 / (n_null + 1)``.
    """
    null = np.sort(np.asarray(null_r, dtype=np.float64).ravel())
    null = null[np.isfinite(null)]
    r = np.asarray(r_obs, dtype=np.float64)
    if null.size == 0:
        return np.full(r.shape, np.nan)
    n_ge = null.size - np.searchsorted(null, r, side="left")
    p = (1.0 + n_ge) / (1.0 + null.size)
    return np.where(np.isfinite(r), p, np.nan)


def steiger_test(r_jk, r_jh, r_kh, n) -> tuple[np.ndarray, np.ndarray]:
    """Steiger's test that R(j, k) > R(j, h) for dependent correlations sharing variable j.

    Steiger, J. H. (1980). Tests for comparing elements of a correlation matrix. *Psychological Bulletin*,
    87(2), 245-251, equations (14)-(15): with Fisher's z and the pooled mean correlation
    ``rbar = (r_jk + r_jh) / 2``,

        psi = r_kh (1 - 2 rbar^2) - rbar^2 (1 - 2 rbar^2 - r_kh^2) / 2
        c   = psi / (1 - rbar^2)^2
        Z   = (atanh(r_jk) - atanh(r_jh)) * sqrt(n - 3) / sqrt(2 - 2 c)

    Here j = the measured expression, k = the trained prediction, h = the untrained prediction. No
    maintained Python library implements this test, hence the formula written out.

    Returns
    -------
    (z, p)
        Z statistics and one-sided p-values ``P(Z >= z)`` (same shape as the inputs).
    """
    r_jk, r_jh, r_kh = (
        np.clip(np.asarray(v, dtype=np.float64), -0.999999, 0.999999) for v in (r_jk, r_jh, r_kh)
    )
    n = np.asarray(n, dtype=np.float64)
    rbar = (r_jk + r_jh) / 2.0
    rbar2 = rbar**2
    psi = r_kh * (1.0 - 2.0 * rbar2) - 0.5 * rbar2 * (1.0 - 2.0 * rbar2 - r_kh**2)
    c = psi / (1.0 - rbar2) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.arctanh(r_jk) - np.arctanh(r_jh)) * np.sqrt(np.maximum(n - 3.0, 0.0)) / np.sqrt(2.0 - 2.0 * c)
    z = np.where(n > 3, z, np.nan)
    return z, stats.norm.sf(z)


def adjust_p(p: np.ndarray, method: str = "holm-sidak") -> np.ndarray:
    """Multiple-testing correction (statsmodels ``multipletests``), NaN p-values left out and kept NaN.

    ``method``: ``"holm-sidak"`` or ``"fdr_bh"`` (any statsmodels method name).
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        # statsmodels' Holm-Sidak takes log1p(-p): a p of exactly 1 (a gene below every null R) is a
        # harmless -inf there but a RuntimeWarning; with errstate the result is the same (corrected p = 1).
        with np.errstate(divide="ignore"):
            out[ok] = multipletests(p[ok], method=method)[1]
    return out


def gene_set_test(
    r: pd.Series,
    gene_set: Sequence[str],
    n_random: int = 10_000,
    seed: int = 0,
    significant: pd.Series | None = None,
) -> dict[str, float]:
    """Compare a gene set's mean R with ``n_random`` random gene sets of the same size.

    Parameters
    ----------
    r
        R per gene (index = genes) for one cancer type; NaN genes are left out.
    gene_set
        Gene names (those absent from ``r`` are ignored).
    significant
        Optional bool per gene: also compares the fraction of significant genes.

    Returns
    -------
    dict
        ``size``, ``mean_r``, ``random_mean_r``, ``p_mean_r`` (one-sided empirical), and when
        ``significant`` is given ``frac_significant``, ``random_frac_significant``, ``p_frac_significant``.
    """
    r = r[np.isfinite(r.to_numpy(dtype=np.float64))]
    members = [g for g in dict.fromkeys(gene_set) if g in r.index]
    size = len(members)
    out: dict[str, float] = {"size": size}
    if size == 0 or size >= len(r):
        return {**out, "mean_r": np.nan, "random_mean_r": np.nan, "p_mean_r": np.nan}
    rng = np.random.default_rng(seed)
    values = r.to_numpy(dtype=np.float64)
    # Random sets without replacement inside a set: the first `size` entries of a random permutation.
    if n_random * len(values) <= 5_000_000:
        idx = np.argsort(rng.random((n_random, len(values))), axis=1)[:, :size]
    else:  # bounded memory for 30,000 genes
        idx = np.stack([rng.choice(len(values), size, replace=False) for _ in range(n_random)])
    obs = float(r.loc[members].mean())
    rand = values[idx].mean(axis=1)
    out.update(
        mean_r=obs,
        random_mean_r=float(rand.mean()),
        p_mean_r=float((1 + (rand >= obs).sum()) / (1 + n_random)),
    )
    if significant is not None:
        sig = significant.reindex(r.index).fillna(False).to_numpy(dtype=bool)
        obs_f = float(sig[[r.index.get_loc(g) for g in members]].mean())
        rand_f = sig[idx].mean(axis=1)
        out.update(
            frac_significant=obs_f,
            random_frac_significant=float(rand_f.mean()),
            p_frac_significant=float((1 + (rand_f >= obs_f).sum()) / (1 + n_random)),
        )
    return out


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Gene sets from a GMT file (name, description, genes..., tab-separated) or a TSV of set, gene."""
    sets: dict[str, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in line.split("\t") if p.strip()]
        if len(parts) >= 3:
            sets[parts[0]] = parts[2:]
        elif len(parts) == 2:  # long format: set<TAB>gene
            sets.setdefault(parts[0], []).append(parts[1])
    return sets


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    """Tables of an evaluation (see :func:`evaluate`)."""

    per_gene: pd.DataFrame  # one row per (cancer_type, gene)
    summary: pd.DataFrame  # one row per cancer type
    per_fold: pd.DataFrame  # fold, cancer_type, gene, r, n
    gene_sets: pd.DataFrame  # one row per (cancer_type, gene set)
    null_r: dict[str, np.ndarray] = field(default_factory=dict)  # pooled untrained R per cancer type
    alpha: float = 0.05
    top_n: int = 100


def evaluate(
    truth: pd.DataFrame,
    pred: pd.DataFrame,
    cancer_types: Sequence[str] | np.ndarray,
    folds: np.ndarray | None = None,
    null_predictions: np.ndarray | None = None,
    alpha: float = 0.05,
    top_n: int = 100,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    n_random_sets: int = 10_000,
    seed: int = 0,
) -> Evaluation:
    """Evaluate out-of-fold predictions per gene and per cancer type.

    Parameters
    ----------
    truth, pred
        ``(n_samples, n_genes)`` measured and predicted log expression, same index and columns.
    cancer_types
        ``(n_samples,)`` cancer type of each sample.
    folds
        ``(n_samples,)`` fold of each sample: R is computed in each fold and averaged (the paper's report);
        None treats all samples as one fold.
    null_predictions
        ``(n_inits, n_samples, n_genes)`` predictions of the untrained architecture (see
        :func:`napari_he2rna.model.training.untrained_predictions`). Without it there is no significance test.
    alpha
        Significance level after correction.
    top_n
        The summary reports the mean R of the ``top_n`` best genes (and the median R of the top 1,000).
    gene_sets
        ``{name: genes}`` tested against ``n_random_sets`` random sets of the same size.

    Returns
    -------
    Evaluation
    """
    pred = pred.loc[truth.index, truth.columns]
    genes = list(truth.columns)
    t = truth.to_numpy(np.float64)
    p = pred.to_numpy(np.float64)
    types = np.asarray(cancer_types).astype(str)
    folds = np.zeros(len(t), dtype=np.int64) if folds is None else np.asarray(folds)
    type_names = sorted(set(types))
    r_mean = _fold_mean_r(t, p, types, folds, type_names)  # (T, G)
    r_all = pearson_by_type(t, p, types, genes).loc[type_names].to_numpy()  # pooled over folds, per type

    per_gene_frames, summary_rows, null_by_type = [], [], {}
    null_r = None
    if null_predictions is not None:
        null_predictions = np.asarray(null_predictions)
        null_r = np.stack(
            [
                _fold_mean_r(t, null_predictions[i], types, folds, type_names)
                for i in range(len(null_predictions))
            ]
        )
    for ti, tname in enumerate(type_names):
        sel = types == tname
        df = pd.DataFrame({"cancer_type": tname, "gene": genes, "r": r_mean[ti], "r_pooled_folds": r_all[ti]})
        df["n_samples"] = int(sel.sum())
        if null_r is not None:
            pooled = null_r[:, ti, :].ravel()
            null_by_type[tname] = pooled[np.isfinite(pooled)]
            df["p_empirical"] = empirical_p(r_mean[ti], pooled)
            df["p_holm_sidak"] = adjust_p(df["p_empirical"].to_numpy(), "holm-sidak")
            df["p_bh"] = adjust_p(df["p_empirical"].to_numpy(), "fdr_bh")
            # Steiger: trained vs the first untrained init, on every sample of this type (shared truth).
            r_jh = pearson_columns(t[sel], null_predictions[0][sel])
            r_kh = pearson_columns(p[sel], null_predictions[0][sel])
            z, sp = steiger_test(r_all[ti], np.nan_to_num(r_jh), np.nan_to_num(r_kh), sel.sum())
            df["r_untrained"] = r_jh
            df["steiger_z"] = z
            df["steiger_p"] = sp
            df["steiger_p_holm_sidak"] = adjust_p(sp, "holm-sidak")
            df["significant"] = df["p_holm_sidak"] < alpha
            df["significant_bh"] = df["p_bh"] < alpha
            # The same test on the R pooled over the folds (stable when a fold holds few samples of a type).
            df["p_empirical_pooled"] = empirical_p(
                r_all[ti], pooled_null_r(t, null_predictions, types, tname)
            )
            df["significant_bh_pooled"] = adjust_p(df["p_empirical_pooled"].to_numpy(), "fdr_bh") < alpha
        per_gene_frames.append(df)
        rs = np.sort(df["r"].dropna().to_numpy())[::-1]
        pooled = df["r_pooled_folds"].dropna().to_numpy()
        fold_n = pd.Series(folds[sel]).value_counts()
        row = {
            "cancer_type": tname,
            "n_samples": int(sel.sum()),
            "n_genes": len(genes),
            "mean_r": float(np.mean(rs)) if rs.size else np.nan,
            "mean_r_pooled": float(np.mean(pooled)) if pooled.size else np.nan,
            f"mean_r_top{top_n}": float(np.mean(rs[:top_n])) if rs.size else np.nan,
            "median_r_top1000": float(np.median(rs[:1000])) if rs.size else np.nan,
            "n_r_above_0.4": int((rs > 0.4).sum()),
            "n_r_pooled_above_0.4": int((pooled > 0.4).sum()),
            # fewest test samples of this type in a fold (folds without the type count as 0)
            "min_fold_n": int(min(fold_n.reindex(np.unique(folds), fill_value=0))) if sel.any() else 0,
        }
        if null_r is not None:
            sig, sig_bh = df["significant"].to_numpy(), df["significant_bh"].to_numpy()
            row.update(
                n_significant_holm_sidak=int(sig.sum()),
                n_significant_bh=int(sig_bh.sum()),
                n_significant_steiger=int((df["steiger_p_holm_sidak"] < alpha).sum()),
                r_threshold_holm_sidak=float(df.loc[sig, "r"].min()) if sig.any() else np.nan,
                r_threshold_bh=float(df.loc[sig_bh, "r"].min()) if sig_bh.any() else np.nan,
                n_significant_bh_pooled=int(df["significant_bh_pooled"].sum()),
                null_r_mean=float(np.mean(null_by_type[tname])) if null_by_type[tname].size else np.nan,
                null_r_q99=float(np.quantile(null_by_type[tname], 0.99))
                if null_by_type[tname].size
                else np.nan,
            )
        summary_rows.append(row)
    per_gene = pd.concat(per_gene_frames, ignore_index=True)
    per_gene = per_gene.sort_values(["cancer_type", "r"], ascending=[True, False], ignore_index=True)

    set_rows = []
    for tname in type_names:
        sub = per_gene[per_gene["cancer_type"] == tname].set_index("gene")
        for si, (name, members) in enumerate((gene_sets or {}).items()):
            res = gene_set_test(
                sub["r"],
                members,
                n_random_sets,
                seed=seed + si,
                significant=sub["significant"] if "significant" in sub else None,
            )
            set_rows.append({"cancer_type": tname, "gene_set": name, **res})
    return Evaluation(
        per_gene=per_gene,
        summary=pd.DataFrame(summary_rows),
        per_fold=r_per_fold(t, p, types, folds, genes),
        gene_sets=pd.DataFrame(set_rows),
        null_r=null_by_type,
        alpha=alpha,
        top_n=top_n,
    )


# ------------------------------------------------------------------------------------------ report


def md_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A Markdown table without the optional ``tabulate`` dependency of ``DataFrame.to_markdown``."""

    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                return ""
            return format(v, floatfmt) if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _plot_r_distribution(ev: Evaluation, path: Path) -> None:
    # Figure + Agg canvas, not pyplot: no global backend switch inside a napari session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = list(ev.summary["cancer_type"])
    data = [ev.per_gene.loc[ev.per_gene["cancer_type"] == t, "r"].dropna().to_numpy() for t in types]
    fig = Figure(figsize=(max(4.0, 1.2 * len(types) + 2), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(1, len(types) + 1)
    nonempty = [i for i, d in enumerate(data) if d.size > 1]
    if nonempty:
        ax.violinplot([data[i] for i in nonempty], positions=pos[nonempty], showmedians=True)
    for i, d in enumerate(data):
        if d.size <= 1:
            ax.scatter(np.full(d.size, pos[i]), d, color="C0")
    if "r_threshold_holm_sidak" in ev.summary:
        thr = ev.summary["r_threshold_holm_sidak"].to_numpy(dtype=float)
        ok = np.isfinite(thr)
        ax.scatter(
            pos[ok], thr[ok], marker="v", color="black", zorder=3, label="min R significant (Holm–Šidák)"
        )
        for i, t in enumerate(types):
            d = ev.null_r.get(t)
            if d is not None and d.size:
                ax.hlines(np.quantile(d, 0.99), pos[i] - 0.4, pos[i] + 0.4, colors="grey", linestyles="--")
        ax.plot([], [], "--", color="grey", label="untrained null, 99th percentile")
        ax.legend(loc="lower right", fontsize=8)
    ax.axhline(0, color="lightgrey", lw=0.8)
    ax.set_xticks(pos)
    ax.set_xticklabels(types, rotation=30, ha="right")
    ax.set_ylabel("Pearson R per gene (mean over folds)")
    ax.set_title("Predicted vs measured expression, per cancer type")
    fig.tight_layout()
    fig.savefig(path)


def _plot_null(ev: Evaluation, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = list(ev.null_r)[:12]
    ncol = min(3, len(types))
    nrow = math.ceil(len(types) / ncol)
    fig = Figure(figsize=(4 * ncol, 3 * nrow), dpi=110)
    FigureCanvasAgg(fig)
    for i, t in enumerate(types):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        trained = ev.per_gene.loc[ev.per_gene["cancer_type"] == t, "r"].dropna().to_numpy()
        bins = np.linspace(-1, 1, 41)
        if ev.null_r[t].size:  # density of an empty histogram divides by zero
            ax.hist(ev.null_r[t], bins=bins, density=True, alpha=0.5, color="grey", label="untrained")
        if trained.size:
            ax.hist(trained, bins=bins, density=True, alpha=0.6, color="C0", label="trained")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("R")
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


#: The per-cancer-type figures printed by the CLI and stored in the demo bundle.
SUMMARY_COLUMNS = (
    "cancer_type",
    "n_samples",
    "mean_r",
    "mean_r_pooled",
    "n_significant_holm_sidak",
    "n_significant_bh",
    "n_significant_bh_pooled",
    "null_r_q99",
)

#: The per-cancer-type figures compared side by side between a model and its baseline (in this order).
COMPARISON_COLUMNS = (
    "n_significant_holm_sidak",
    "n_significant_bh",
    "n_significant_bh_pooled",
    "r_threshold_bh",
    "mean_r",
    "mean_r_pooled",
    "median_r_top1000",
    "n_r_above_0.4",
)


def comparison_table(evaluations: Mapping[str, Evaluation]) -> pd.DataFrame:
    """Per cancer type, the summary figures of several evaluations side by side (one row per type and model).

    Parameters
    ----------
    evaluations
        ``{model name: Evaluation}`` on the same samples and folds (e.g. HE2RNA and the ridge baseline).
    """
    frames = []
    for name, ev in evaluations.items():
        cols = ["cancer_type", "n_samples", *[c for c in COMPARISON_COLUMNS if c in ev.summary]]
        df = ev.summary[cols].copy()
        df.insert(1, "model", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).sort_values(["cancer_type", "model"], ignore_index=True)


def small_fold_warning(ev: Evaluation, minimum: int = 5) -> str:
    """A warning (one sentence, no prefix) when some fold holds fewer than ``minimum`` samples of a cancer
    type (else "")."""
    if "min_fold_n" not in ev.summary:
        return ""
    small = ev.summary[ev.summary["min_fold_n"] < minimum]
    if small.empty:
        return ""
    which = ", ".join(f"{r.cancer_type} ({int(r.min_fold_n)})" for r in small.itertuples())
    return (
        f"some folds hold fewer than {minimum} samples of a cancer type (fewest per fold: {which}); "
        "R computed inside such a fold is mostly noise, so read the pooled out-of-fold R (`mean_r_pooled`, "
        "`r_pooled_folds`, `n_significant_bh_pooled`) beside the fold-averaged one."
    )


def write_report(
    ev: Evaluation,
    out_dir: str | Path,
    title: str = "HE2RNA evaluation",
    top_genes: int = 10,
    baseline: Evaluation | None = None,
    names: tuple[str, str] = ("HE2RNA", "ridge baseline"),
) -> Path:
    """Write the tables (CSV), plots (PNG) and a short Markdown report into ``out_dir``.

    Files: ``per_gene.csv``, ``summary.csv``, ``per_fold.csv``, ``gene_sets.csv`` (when sets were tested),
    ``r_by_cancer_type.png``, ``null_vs_trained.png`` (with a null), ``report.md``; with a ``baseline``
    (evaluated on the same samples and folds) also ``baseline_per_gene.csv``, ``baseline_summary.csv`` and
    ``comparison.csv``, and a side-by-side table in the report.

    Returns
    -------
    Path
        The Markdown report.
    """
    out = Path(out_dir)
    with staged_folder(out, overwrite=True) as stage:  # every file is moved into out_dir together at the end
        _write_report_files(ev, stage, title, top_genes, baseline, names)
    return out / "report.md"


def _write_report_files(
    ev: Evaluation,
    out: Path,
    title: str,
    top_genes: int,
    baseline: Evaluation | None,
    names: tuple[str, str],
) -> None:
    """The files of :func:`write_report`, written into ``out`` (its staging folder)."""
    ev.per_gene.to_csv(out / "per_gene.csv", index=False)
    ev.summary.to_csv(out / "summary.csv", index=False)
    ev.per_fold.to_csv(out / "per_fold.csv", index=False)
    if not ev.gene_sets.empty:
        ev.gene_sets.to_csv(out / "gene_sets.csv", index=False)
    _plot_r_distribution(ev, out / "r_by_cancer_type.png")
    has_null = bool(ev.null_r)
    if has_null:
        _plot_null(ev, out / "null_vs_trained.png")

    lines = [f"# {title}", ""]
    lines.append(
        "Pearson R between out-of-fold predictions and measured log10(1 + FPKM-UQ), per gene and per cancer "
        "type (never pooled across types), computed in each fold and averaged over folds."
    )
    if has_null:
        lines.append(
            f"Significance: one-sided empirical p against the R of the same architecture untrained (pooled "
            f"over genes and random inits of each type), Holm–Šidák corrected per cancer type, "
            f"alpha = {ev.alpha}; "
            "Benjamini–Hochberg and a Steiger test (trained vs untrained, Steiger 1980) are in per_gene.csv."
        )
    lines.append(
        "`mean_r_pooled` and `r_pooled_folds` are the same R computed once over all out-of-fold "
        "predictions of a type (folds pooled); `n_significant_bh_pooled` tests that pooled R against the "
        "untrained null pooled "
        "the same way (Benjamini–Hochberg)."
    )
    warning = small_fold_warning(ev)
    if warning:
        lines += ["", f"> **Warning:** {warning}"]
    lines += [
        "",
        "## Summary per cancer type",
        "",
        md_table(ev.summary),
        "",
        "![R per cancer type](r_by_cancer_type.png)",
        "",
    ]
    if baseline is not None:
        table = comparison_table({names[0]: ev, names[1]: baseline})
        table.to_csv(out / "comparison.csv", index=False)
        baseline.per_gene.to_csv(out / "baseline_per_gene.csv", index=False)
        baseline.summary.to_csv(out / "baseline_summary.csv", index=False)
        lines += [
            f"## {names[0]} and the {names[1]}, same folds, same null",
            "",
            f"The {names[1]} is a ridge regression per gene on each slide's mean tile feature "
            "(standardised on the fold's training samples, penalty chosen per gene by an inner "
            "patient-grouped CV), trained on "
            "the same folds and tested against the same untrained null.",
            "",
            md_table(table),
            "",
        ]
    if has_null:
        lines += ["![Trained vs untrained R](null_vs_trained.png)", ""]
    lines += [f"## Best predicted genes (top {top_genes} per cancer type)", ""]
    cols = [
        c
        for c in ("cancer_type", "gene", "r", "p_empirical", "p_holm_sidak", "steiger_p", "significant")
        if c in ev.per_gene
    ]
    top = ev.per_gene.groupby("cancer_type", sort=True).head(top_genes)[cols]
    lines += [md_table(top), ""]
    if not ev.gene_sets.empty:
        lines += ["## Gene sets vs random sets of the same size", "", md_table(ev.gene_sets), ""]
    lines += [
        "Files: per_gene.csv, summary.csv, per_fold.csv"
        + (", gene_sets.csv" if not ev.gene_sets.empty else "")
        + ".",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
