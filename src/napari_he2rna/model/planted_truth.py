"""Planted truth: which genes of a cohort carry a planted signal and which are noise-only controls (a
``genes.tsv`` with a role column, as ``he2rna make-sample`` writes it), and how an evaluation splits over
them: per cancer type, planted genes significant of the planted ones, controls significant of the controls,
and the median R of the planted genes (``he2rna evaluate --gene-roles``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..safe_output import atomic_write_text
from .evaluation import Evaluation, md_table

PLANTED, CONTROL = "planted", "control"
SPLIT_FILE = "planted_truth.csv"
_YES = {"yes", "true", "1", "y", "t"}
_NO = {"no", "false", "0", "n", "f"}


@dataclass(frozen=True)
class GeneRoles:
    """The genes of a ``genes.tsv`` by role (file order kept)."""

    planted: tuple[str, ...]  # planted genes whose driver the model can see: the ones counted
    not_visible: tuple[str, ...]  # planted genes whose driver it cannot see (e.g. fat): listed, not counted
    controls: tuple[str, ...]  # noise-only controls
    drivers: Mapping[str, str]  # gene -> driver, where the file names one
    source: str = ""

    def restrict(self, genes: Iterable[str]) -> GeneRoles:
        """The same roles, keeping only ``genes`` (those the model predicts)."""
        keep = set(genes)
        return GeneRoles(
            tuple(g for g in self.planted if g in keep),
            tuple(g for g in self.not_visible if g in keep),
            tuple(g for g in self.controls if g in keep),
            {g: d for g, d in self.drivers.items() if g in keep},
            self.source,
        )

    def describe(self) -> str:
        """One line: how many genes of each role, and which planted genes are not counted and why."""
        text = f"{len(self.planted)} visible planted genes, {len(self.controls)} noise-only controls"
        if self.not_visible:
            which = ", ".join(
                f"{g} ({self.drivers[g]})" if self.drivers.get(g) else g for g in self.not_visible
            )
            text += f"; planted but not visible in the tiles (not counted): {which}"
        return text


def _parse_visible(values: pd.Series, path: Path) -> np.ndarray:
    words = values.astype(str).str.strip().str.lower()
    bad = sorted(set(words) - _YES - _NO)
    if bad:
        raise DataError(
            f"{path}: the `visible` column holds {', '.join(map(repr, bad[:5]))}; use yes or no (true/false)."
        )
    return words.isin(_YES).to_numpy()


def read_gene_roles(path: str | Path) -> GeneRoles:
    """Read a ``genes.tsv`` of gene roles (tab-separated; comma-separated when it ends in ``.csv``).

    Columns: ``gene``; ``role``, ``planted`` or ``control``; optional ``driver`` (free text) and ``visible``
    (yes/no: whether the tiles the model sees show the driver; a planted gene with ``no`` is listed but not
    counted; without the column every planted gene counts). Other columns are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The gene roles file {path} does not exist (`he2rna make-sample` writes genes.tsv).")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read as a gene roles table ({exc}).") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("gene", "role") if c not in table.columns]
    if missing:
        raise DataError(
            f"{path} has no {' and no '.join(f'`{c}`' for c in missing)} column; a gene roles table has one "
            "row per gene with `gene` and `role` (planted or control), as `he2rna make-sample` writes "
            "genes.tsv."
        )
    genes = table["gene"].str.strip()
    roles = table["role"].str.strip().str.lower()
    unknown = sorted(set(roles) - {PLANTED, CONTROL})
    if unknown:
        raise DataError(
            f"{path}: unknown role(s) {', '.join(map(repr, unknown[:5]))}; a role is planted or control."
        )
    dup = genes[genes.duplicated()].unique().tolist()
    if dup:
        raise DataError(f"{path} lists gene(s) twice: {', '.join(dup[:5])}.")
    visible = (
        _parse_visible(table["visible"], path) if "visible" in table.columns else np.ones(len(table), bool)
    )
    planted = (roles == PLANTED).to_numpy()
    drivers = dict(zip(genes, table["driver"].str.strip(), strict=True)) if "driver" in table.columns else {}
    return GeneRoles(
        tuple(genes[planted & visible]),
        tuple(genes[planted & ~visible]),
        tuple(genes[(roles == CONTROL).to_numpy()]),
        {g: d for g, d in drivers.items() if d},
        str(path),
    )


def _count(sub: pd.DataFrame, genes: tuple[str, ...], column: str) -> float:
    if column not in sub.columns:
        return np.nan  # no untrained null, so no test
    return float(sub.loc[list(genes), column].astype(bool).sum())


def _median(sub: pd.DataFrame, genes: tuple[str, ...], column: str) -> float:
    values = sub.loc[list(genes), column].dropna().to_numpy(float)
    return float(np.median(values)) if values.size else np.nan


def truth_split(ev: Evaluation, roles: GeneRoles) -> pd.DataFrame:
    """Per cancer type, how an evaluation splits over planted genes and controls.

    Columns: ``cancer_type``, ``n_planted`` (visible planted genes evaluated), ``planted_significant_bh``
    (fold-averaged R, Benjamini–Hochberg), ``planted_significant_bh_pooled`` (the R pooled over folds),
    ``planted_significant_holm_sidak``, ``n_controls``, ``controls_significant_bh``,
    ``controls_significant_bh_pooled``, ``median_r_planted`` and ``median_r_planted_pooled`` (over the same
    ``n_planted`` genes), ``median_r_controls_pooled``, ``planted_not_significant_bh`` and
    ``controls_significant`` (gene names, ``;``-separated; a control counts when BH on either R calls it).
    The counts are whole numbers, empty (NA) for an evaluation without an untrained null.
    """
    roles = roles.restrict(ev.per_gene["gene"])
    rows = []
    for tname, sub in ev.per_gene.groupby("cancer_type", sort=True):
        sub = sub.set_index("gene")
        row = {
            "cancer_type": tname,
            "n_planted": len(roles.planted),
            "planted_significant_bh": _count(sub, roles.planted, "significant_bh"),
            "planted_significant_bh_pooled": _count(sub, roles.planted, "significant_bh_pooled"),
            "planted_significant_holm_sidak": _count(sub, roles.planted, "significant"),
            "n_controls": len(roles.controls),
            "controls_significant_bh": _count(sub, roles.controls, "significant_bh"),
            "controls_significant_bh_pooled": _count(sub, roles.controls, "significant_bh_pooled"),
            "median_r_planted": _median(sub, roles.planted, "r"),
            "median_r_planted_pooled": _median(sub, roles.planted, "r_pooled_folds"),
            "median_r_controls_pooled": _median(sub, roles.controls, "r_pooled_folds"),
        }
        if "significant_bh" in sub.columns:
            called = sub.loc[list(roles.controls), ["significant_bh", "significant_bh_pooled"]].any(axis=1)
            missed = ~sub.loc[list(roles.planted), "significant_bh"].astype(bool)
            row["planted_not_significant_bh"] = ";".join(missed[missed].index)
            row["controls_significant"] = ";".join(called[called].index)
        rows.append(row)
    counts = [
        f"{role}_significant_{test}" for role in ("planted", "controls") for test in ("bh", "bh_pooled")
    ]
    counts.append("planted_significant_holm_sidak")
    return pd.DataFrame(rows).astype({c: "Int64" for c in counts})


def truth_split_table(evaluations: Mapping[str, Evaluation], roles: GeneRoles) -> pd.DataFrame:
    """:func:`truth_split` of several evaluations (e.g. HE2RNA and the ridge baseline), a ``model`` column
    beside the cancer type; rows by cancer type, then in the order given."""
    frames = []
    for name, ev in evaluations.items():
        df = truth_split(ev, roles)
        df.insert(1, "model", name)
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values("cancer_type", kind="stable", ignore_index=True)


def _of(table: pd.DataFrame, count: str, total: str) -> list[str]:
    """``"<count> / <total>"`` per row ("–" where there was no test)."""
    return ["–" if pd.isna(c) else f"{int(c)} / {n}" for c, n in zip(table[count], table[total], strict=True)]


def split_display(table: pd.DataFrame) -> pd.DataFrame:
    """The table of :func:`truth_split_table` as the README shows it: "significant / of how many"."""
    return pd.DataFrame(
        {
            "cancer type": table["cancer_type"],
            "model": table["model"],
            "planted significant (BH)": _of(table, "planted_significant_bh", "n_planted"),
            "planted, on pooled R": _of(table, "planted_significant_bh_pooled", "n_planted"),
            "controls significant (BH)": _of(table, "controls_significant_bh", "n_controls"),
            "controls, on pooled R": _of(table, "controls_significant_bh_pooled", "n_controls"),
            "median R of planted (pooled)": table["median_r_planted_pooled"].round(2),
        }
    )


def split_text(table: pd.DataFrame, roles: GeneRoles) -> str:
    """What ``he2rna evaluate --gene-roles`` prints: the roles line, the split per type and model, and the
    controls that were called."""
    lines = [f"planted truth ({roles.source or 'gene roles'}): {roles.describe()}"]
    lines[0] += "; counts: significant (Benjamini-Hochberg per cancer type) / genes of that role"
    lines.append(split_display(table).to_string(index=False))
    if "controls_significant" in table.columns:
        called = table[table["controls_significant"].astype(bool)]
        for r in called.itertuples():
            lines.append(
                f"controls called significant in {r.cancer_type} by {r.model}: {r.controls_significant}"
            )
    return "\n".join(lines)


def write_truth_split(out_dir: str | Path, table: pd.DataFrame, roles: GeneRoles) -> Path:
    """Write the split as ``planted_truth.csv`` into a report folder and add its section to ``report.md``.

    Returns
    -------
    Path
        The CSV.
    """
    out = Path(out_dir)
    csv = atomic_write_text(out / SPLIT_FILE, table.to_csv(index=False, lineterminator="\n"))
    report = out / "report.md"
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    section = [
        "## Planted genes and controls",
        "",
        f"From `{roles.source}`: {roles.describe()}. Counts are of significant genes (Benjamini–Hochberg per "
        "cancer type, on the fold-averaged R and on the R pooled over folds) out of the genes of that role; "
        f"the median R is over the same planted genes. Per gene: per_gene.csv; this table: {SPLIT_FILE}.",
        "",
        md_table(split_display(table), floatfmt=".2f"),
        "",
    ]
    atomic_write_text(report, text.rstrip("\n") + "\n\n" + "\n".join(section))
    return csv
