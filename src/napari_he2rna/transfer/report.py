"""The transfer experiment's outputs: the figure (paper Fig. 6d/e), the Markdown summary, the result
folder (written and read back)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, unreadable_as
from ..safe_output import atomic_write, atomic_write_text, prepare_folder, staged_folder
from .experiment import AUC_COLUMNS, METHODS, TransferConfig, TransferResult

# -------------------------------------------------------------------------------------------- outputs

_COLORS = {"representation": "tab:blue", "direct": "tab:red", "autoencoder_A": "tab:green"}
_COLORS["autoencoder_B"] = "tab:purple"


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "****" if p < 1e-4 else "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "ns"


def _nearest_ratio(aucs: pd.DataFrame, focus_ratio: float) -> float:
    ratios = np.array(sorted(aucs["ratio"].unique()), dtype=float)
    return float(ratios[np.argmin(np.abs(ratios - focus_ratio))]) if len(ratios) else float(focus_ratio)


def plot_transfer(result: TransferResult, path: str | Path, focus_ratio: float = 3 / 4) -> Path:
    """A figure like the paper's 6d/e: AUC vs fraction of patients in B (mean ± s.d.), and boxplots of the
    AUCs of every method at ``focus_ratio`` (nearest ratio run) with Wilcoxon stars vs the representation.

    Uses matplotlib's object API (no pyplot), so it never changes the backend of a running napari.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    summ = result.summary()
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_d, ax_e = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    for m, sub in summ.groupby("method", sort=False):
        sub = sub.sort_values("fraction_B")
        fb, mu, sd = sub["fraction_B"].to_numpy(), sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        ax_d.plot(fb, mu, "-^", color=_COLORS.get(m), label=m, ms=4)
        ax_d.fill_between(fb, mu - sd, mu + sd, color=_COLORS.get(m), alpha=0.15)
    r = _nearest_ratio(result.aucs, focus_ratio)
    ax_d.axvline(1 - r, ls="--", color="grey", lw=0.8)
    ax_d.axhline(0.5, ls=":", color="lightgrey", lw=0.8)
    ax_d.set_xlim(0, 1.02)
    ax_d.set_xlabel("fraction of patients in hospital B")
    ax_d.set_ylabel(f"ROC AUC on hospital B ({result.config.n_folds}-fold CV)")
    ax_d.set_title("d  AUC vs A/B split (mean ± s.d. over splits)", fontsize=10)
    if len(summ):
        ax_d.legend(fontsize=8)
    at = result.aucs[np.isclose(result.aucs["ratio"].astype(float), r)].dropna(subset=["auc"])
    order = [m for m in METHODS if m in set(at["method"])]
    data = [at.loc[at["method"] == m, "auc"].to_numpy(float) for m in order]
    if data:
        bp = ax_e.boxplot(data, showmeans=True, patch_artist=True)
        for patch, m in zip(bp["boxes"], order, strict=True):
            patch.set_facecolor(_COLORS.get(m, "grey"))
            patch.set_alpha(0.4)
        ax_e.set_xticks(range(1, len(order) + 1), [m.replace("_", "\n") for m in order], fontsize=8)
        tests = result.tests[
            np.isclose(result.tests["ratio"].astype(float), r)
            & (result.tests["method_1"] == "representation")
        ]
        top = max(float(np.max(d)) for d in data)
        for _, t in tests.iterrows():
            if t["method_2"] in order:
                ax_e.text(order.index(t["method_2"]) + 1, top + 0.02, _stars(t["p"]), ha="center", fontsize=8)
        ax_e.set_ylim(top=min(1.08, top + 0.08))
    ax_e.set_title(f"e  A:B = {r:.2f}:{1 - r:.2f} (stars: Wilcoxon vs representation)", fontsize=9)
    ax_e.set_ylabel("ROC AUC")
    fig.tight_layout()
    prepare_folder(path.parent)
    # the temporary file has no image suffix: the format comes from the path's (PNG without one)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png"))
    return path


def summary_markdown(result: TransferResult) -> str:
    """A short human-readable summary: mean ± s.d. AUC per ratio and method, and the Wilcoxon tests."""
    summ = result.summary()
    methods = [m for m in METHODS if m in set(summ["method"])]
    lines = [
        "# Hospital A/B transfer experiment",
        "",
        f"ROC AUC over hospital B's patients ({result.config.n_folds}-fold patient-grouped CV, "
        f"{result.config.n_cv_repeats} CV repeat(s) averaged per split); mean ± s.d. over the A/B splits "
        "(number of splits where the method could run).",
        "",
        "| A:B | patients A / B | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for ratio in sorted(result.aucs["ratio"].unique(), reverse=True):
        sub = result.aucs[result.aucs["ratio"] == ratio]
        na, nb = sub["n_patients_A"].median(), sub["n_patients_B"].median()
        cells = []
        for m in methods:
            row = summ[(summ["ratio"] == ratio) & (summ["method"] == m)]
            if row.empty:
                cells.append("n/a")
            else:
                sd = row["std"].iloc[0]
                sd_txt = f" ± {sd:.3f}" if np.isfinite(sd) else ""
                cells.append(f"{row['mean'].iloc[0]:.3f}{sd_txt} ({int(row['count'].iloc[0])})")
        lines.append(f"| {ratio:.3g}:{1 - ratio:.3g} | {na:.0f} / {nb:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Two-tailed Wilcoxon signed-rank tests, paired by split:",
        "",
        "| A:B | method 1 | method 2 | mean 1 | mean 2 | n | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, t in result.tests.iterrows():
        p = f"{t['p']:.2g}" if np.isfinite(t["p"]) else "n/a"
        lines.append(
            f"| {t['ratio']:.3g}:{1 - t['ratio']:.3g} | {t['method_1']} | {t['method_2']} | "
            f"{t['mean_1']:.3f} | {t['mean_2']:.3f} | {int(t['n'])} | {p} |"
        )
    return "\n".join(lines) + "\n"


def write_transfer_results(result: TransferResult, out_dir: str | Path, focus_ratio: float = 3 / 4) -> dict:
    """Write ``aucs.csv``, ``summary.csv``, ``summary.md``, ``tests.csv``, ``splits.csv.gz`` (which hospital
    and fold each sample was in, per split), ``config.json`` and ``transfer.png`` in ``out_dir``; returns
    name -> path."""
    out = Path(out_dir)
    names = {"aucs": "aucs.csv", "summary": "summary.csv", "tests": "tests.csv", "summary_md": "summary.md"}
    if result.splits is not None:
        names["splits"] = "splits.csv.gz"
    names |= {"config": "config.json", "figure": "transfer.png"}
    with staged_folder(out, overwrite=True) as stage:  # the files are moved into out_dir together
        for name, df in (("aucs", result.aucs), ("summary", result.summary()), ("tests", result.tests)):
            atomic_write_text(stage / names[name], df.to_csv(index=False, lineterminator="\n"))
        atomic_write_text(stage / names["summary_md"], summary_markdown(result))
        if result.splits is not None:
            result.splits.to_csv(
                stage / names["splits"], index=False, lineterminator="\n", compression="gzip"
            )
        atomic_write_text(stage / names["config"], json.dumps(asdict(result.config), indent=1))
        plot_transfer(result, stage / names["figure"], focus_ratio)
    return {key: out / name for key, name in names.items()}


def load_transfer_results(out_dir: str | Path) -> TransferResult:
    """Read back what :func:`write_transfer_results` wrote."""
    out = Path(out_dir)
    if not (out / "aucs.csv").is_file() or not (out / "config.json").is_file():
        raise DataError(
            f"{out} holds no transfer results (aucs.csv and config.json written by he2rna transfer)."
        )
    with unreadable_as(DataError, f"The transfer results in {out} cannot be read"):
        cfg = TransferConfig(**json.loads((out / "config.json").read_text()))
        aucs = pd.read_csv(out / "aucs.csv")
        tests = pd.read_csv(out / "tests.csv")
        splits = pd.read_csv(out / "splits.csv.gz", dtype={"sample": str, "patient": str}) if (
            out / "splits.csv.gz"
        ).is_file() else None  # fmt: skip
    missing = [c for c in AUC_COLUMNS if c not in aucs.columns]
    if missing:
        raise DataError(f"{out / 'aucs.csv'} lacks the column(s) {', '.join(missing)}.")
    return TransferResult(aucs, tests, cfg, splits)
