"""SLIDE-EX's inputs: the deconvolved targets (expression per cell type, abundances) and the responder
labels, read and checked; the output names of a cell type's genes and abundances."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cohorts.cohort import load_expression, read_table
from ..errors import DataError

ABUNDANCE = "abundance"
RESPONDER = "responder"
TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")


def target_name(cell_type: str, gene: str) -> str:
    """The output name of a cell type's gene in a bundle: ``"fibroblast COL1A1"``."""
    return f"{cell_type} {gene}"


def abundance_name(cell_type: str) -> str:
    """The output name of a cell type's abundance in the abundance bundle: ``"fibroblast abundance"``."""
    return f"{cell_type} {ABUNDANCE}"


# ------------------------------------------------------------------------------------------ reading


@dataclass
class DeconvolvedTargets:
    """Deconvolution output per sample: expression per cell type and (optionally) abundances.

    ``expression[cell_type]`` is samples x genes (log10(1 + FPKM)), ``abundance`` samples x cell types. All
    tables list the same samples (checked when read).
    """

    expression: dict[str, pd.DataFrame]
    abundance: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cell_types(self) -> list[str]:
        return list(self.expression)

    @property
    def sample_ids(self) -> list[str]:
        first = next(iter(self.expression.values()), None)
        if first is not None:
            return list(first.index)
        return list(self.abundance.index) if self.abundance is not None else []


def _table_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(TABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _find_celltype_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"Cell-type expression folder {folder} does not exist.")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(TABLE_SUFFIXES):
            stem = _table_stem(p)
            if stem in files:
                raise DataError(
                    f"{folder} holds two tables for cell type {stem!r} ({files[stem].name}, {p.name})."
                )
            files[stem] = p
    if not files:
        raise DataError(
            f"{folder} holds no cell-type expression table "
            "(expected one <cell type>.tsv or .csv per cell type)."
        )
    return files


def _same_samples(tables: Mapping[str, pd.DataFrame], what: Mapping[str, str]) -> None:
    """Raise :class:`DataError` unless every table lists the same samples (order may differ)."""
    items = list(tables.items())
    ref_key, ref = items[0]
    ref_ids = set(ref.index)
    for key, tab in items[1:]:
        ids = set(tab.index)
        if ids != ref_ids:
            only_here = sorted(ids - ref_ids)
            only_ref = sorted(ref_ids - ids)
            raise DataError(
                f"{what[key]} and {what[ref_key]} list different samples: {len(only_here)} only in "
                f"{what[key]} (e.g. {only_here[:3]}), {len(only_ref)} only in {what[ref_key]} "
                f"(e.g. {only_ref[:3]}); deconvolved tables must cover the same samples."
            )


def read_celltype_expression(
    source: str | Path | Mapping[str, str | Path | pd.DataFrame],
    cell_types: Sequence[str] | None = None,
    transform: str = "auto",
    filter_zero_median: bool = True,
) -> dict[str, pd.DataFrame]:
    """Read the cell-type-specific expression tables (samples x genes per cell type).

    Parameters
    ----------
    source
        A folder with one table per cell type named ``<cell type>.tsv`` (or ``.csv``, gzip ok; first column
        the sample id), or a mapping ``cell type -> path or DataFrame``.
    cell_types
        Only these cell types (each must have a table); default all found.
    transform, filter_zero_median
        See :func:`napari_he2rna.cohorts.cohort.load_expression`: ``"raw"`` FPKM is turned into log10(1 +
        FPKM),
        ``"log"`` is kept, ``"auto"`` decides per table (raw when any value exceeds 50). Genes with a zero
        median in a cell type are dropped (not expressed there) unless ``filter_zero_median`` is False.

    Returns
    -------
    dict
        ``cell type -> DataFrame`` float32, index sample ids (str), columns genes.

    Raises
    ------
    DataError
        A requested cell type has no table, a table is unreadable, has non-numeric values or duplicate
        samples, or the tables do not list the same samples.
    """
    if isinstance(source, Mapping):
        files: dict[str, Any] = {str(k): v for k, v in source.items()}
        where = "the given tables"
    else:
        folder = Path(source)
        files = _find_celltype_files(folder)
        where = str(folder)
    if cell_types is not None:
        missing = [c for c in cell_types if c not in files]
        if missing:
            raise DataError(
                f"No expression table for cell type(s) {', '.join(map(repr, missing))} in {where} "
                f"(found: {', '.join(files) or 'none'}); expected <cell type>.tsv or .csv."
            )
        files = {c: files[c] for c in cell_types}
    if not files:
        raise DataError("No cell type was given.")
    tables: dict[str, pd.DataFrame] = {}
    labels: dict[str, str] = {}
    for ct, src in files.items():
        if not isinstance(src, pd.DataFrame) and not Path(src).is_file():
            raise DataError(f"Expression table of cell type {ct!r} ({src}) does not exist.")
        labels[ct] = f"the {ct} table" if isinstance(src, pd.DataFrame) else Path(src).name
        tables[ct] = load_expression(src, transform=transform, filter_zero_median=filter_zero_median)
    _same_samples(tables, labels)
    return tables


def read_abundance(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read cell-type abundances, samples x cell types (fractions or any non-negative scale).

    The first column holds the sample ids. Returns float32, index sample ids (str).

    Raises
    ------
    DataError
        Unreadable table, non-numeric or missing values, negative values, duplicate samples.
    """
    if isinstance(source, pd.DataFrame):
        df, name = source.copy(), "the abundance table"
    else:
        path = Path(source)
        df, name = read_table(path), path.name
        df = df.set_index(df.columns[0])
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"{name} has no samples or no cell types.")
    if df.index.duplicated().any():
        raise DataError(
            f"{name} lists samples more than once (e.g. {df.index[df.index.duplicated()][:3].tolist()})."
        )
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise DataError(
            f"{name} has non-numeric values in column(s) {non_numeric[:3]}; it must be samples x cell types "
            "with the sample id in the first column."
        )
    values = df.to_numpy(np.float64)
    if not np.isfinite(values).all():
        bad = df.columns[~np.isfinite(values).all(axis=0)].tolist()
        raise DataError(f"{name} has empty, NaN or infinite values (cell types {bad[:3]}).")
    if (values < 0).any():
        raise DataError(f"{name} has negative abundances.")
    out = pd.DataFrame(values.astype(np.float32), index=df.index, columns=df.columns)
    out.index.name = "sample_id"
    return out


def load_deconvolved(
    expression: str | Path | Mapping[str, str | Path | pd.DataFrame] | None,
    abundance: str | Path | pd.DataFrame | None = None,
    cell_types: Sequence[str] | None = None,
    transform: str = "auto",
    filter_zero_median: bool = True,
) -> DeconvolvedTargets:
    """Cell-type expression tables and the abundance table, checked to cover the same samples.

    See :func:`read_celltype_expression` and :func:`read_abundance`.
    """
    if expression is None and abundance is None:
        raise DataError("Give cell-type expression tables, an abundance table, or both.")
    expr = (
        read_celltype_expression(expression, cell_types, transform, filter_zero_median)
        if expression is not None
        else {}
    )
    notes = []
    for ct, tab in expr.items():
        dropped = sum(
            tab.attrs.get(f"n_genes_dropped_{why}", 0) for why in ("zero_median", "nan", "infinite")
        )
        if dropped:
            notes.append(
                f"{ct}: {dropped} of {tab.attrs.get('n_genes_in')} genes dropped (zero median, NaN or "
                "infinite values)"
            )
    ab = read_abundance(abundance) if abundance is not None else None
    if ab is not None and expr:
        first = next(iter(expr))
        name = Path(abundance).name if not isinstance(abundance, pd.DataFrame) else "the abundance table"
        _same_samples(
            {first: expr[first], ABUNDANCE: ab}, {first: f"{first}'s expression table", ABUNDANCE: name}
        )
    return DeconvolvedTargets(expression=expr, abundance=ab, notes=notes)


def read_responders(
    source: str | Path | pd.DataFrame, label_column: str = RESPONDER, positive: Any | None = None
) -> pd.Series:
    """0/1 responder label per sample from a table with ``sample_id`` and ``label_column``.

    ``positive`` names the value of class 1 (default: 1/True, see
    :func:`napari_he2rna.transfer.labels.binary_labels`). Rows without a label are left out.
    """
    from ..transfer.labels import binary_labels

    if isinstance(source, pd.DataFrame):
        df, name = source.copy(), "the responder table"
        if "sample_id" not in df.columns and df.index.name == "sample_id":
            df = df.reset_index()
    else:
        df, name = read_table(Path(source)), Path(source).name
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("sample_id", label_column):
        if col not in df.columns:
            raise DataError(f"{name} lacks the column {col!r} (has {', '.join(df.columns)}).")
    df = df[df[label_column].notna()]
    if df.empty:
        raise DataError(f"{name} has no labelled sample.")
    df["sample_id"] = df["sample_id"].astype(str)
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].head(3).tolist()
        raise DataError(f"{name} lists samples more than once (e.g. {dup}).")
    labels = binary_labels(df[label_column], positive)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{name}: every sample has the same label; a classifier needs both classes.")
    return pd.Series(labels, index=pd.Index(df["sample_id"], name="sample_id"), name=RESPONDER)
