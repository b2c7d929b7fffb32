"""A genes x samples expression matrix whose columns are TCGA barcodes, as a cohort.

TCGAbiolinks (``assay(GDCprepare(query), "fpkm_uq_unstrand")`` written out) and SEQUOIA's download script
(``write.table(fpkm.data, "BRCA.txt", sep = " ")``) give one row per gene (Ensembl ids or symbols) and
one column per RNA-seq aliquot (``TCGA-A1-A0SB-01A-11R-A144-07``; R may have turned the dashes into dots).
The slides come from GDC sample sheets with their download folders, or from folders of slide files
named by barcode (``TCGA-A1-A0SB-01Z-00-DX1.<UUID>.svs``, as the GDC names them). Columns and slides are
paired by the same barcode rules as a GDC download (:mod:`.pairing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback
from .cohort import RAW_THRESHOLD, read_table
from .gdc import check_folders, open_text, read_sheets, sheet_items
from .pairing import RnaAliquot, SlideFile, TcgaCohort, Unmatched, assemble, pair_samples
from .tcga import gene_columns, is_barcode, normalise_barcode, slide_barcode

#: Slide files looked for in folders when no sample sheet lists them.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif")
#: Columns of a matrix that name the genes of its rows (any case); ``gene_type`` gives their type.
SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "symbol", "hugo_symbol", "external_gene_name")
TYPE_COLUMNS = ("gene_type", "gene_biotype", "biotype")


def _read_text_matrix(path: Path) -> pd.DataFrame:
    """A delimited text matrix; R's ``write.table`` header (one field fewer than the rows) is understood."""
    with open_text(path) as fh:
        first = fh.readline()
    sep = "\t" if "\t" in first else "," if "," in first else " "
    df = pd.read_csv(path, sep=sep)
    if df.index.nlevels == 1 and not isinstance(df.index, pd.RangeIndex):
        return df  # the header was one field short: pandas took the first column as the index
    return df.set_index(df.columns[0])


def read_matrix(path: str | os.PathLike) -> pd.DataFrame:
    """The matrix as a DataFrame indexed by its first column (the genes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the expression matrix {path} does not exist.")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq", ".h5ad")):
        df = read_table(path)
        return df.set_index(df.columns[0])
    try:
        return _read_text_matrix(path)
    except Exception as exc:  # noqa: BLE001 - any parser error: one sentence
        raise DataError(f"{path.name} cannot be read as a matrix ({type(exc).__name__}: {exc}).") from None


def matrix_genes(df: pd.DataFrame) -> pd.DataFrame:
    """``gene_id, gene_name, gene_type`` of the matrix rows: Ensembl ids or symbols in the index, a symbol
    column (:data:`SYMBOL_COLUMNS`) and a type column (:data:`TYPE_COLUMNS`) where it has them."""
    index = df.index.astype(str).str.strip()
    lower = {str(c).strip().lower(): c for c in df.columns}
    symbol = next((lower[c] for c in SYMBOL_COLUMNS if c in lower), None)
    kind = next((lower[c] for c in TYPE_COLUMNS if c in lower), None)
    ensembl = float(np.mean(index.str.upper().str.startswith("ENSG"))) > 0.5 if len(index) else False
    return pd.DataFrame(
        {
            "gene_id": index if ensembl else "",
            "gene_name": df[symbol].astype(str).to_numpy() if symbol else ("" if ensembl else index),
            "gene_type": df[kind].astype(str).to_numpy() if kind else "",
        }
    )


def to_log(values: np.ndarray, scale: str, name: str) -> tuple[np.ndarray, str]:
    """``values`` as log10(1 + x) per ``scale`` (``raw``, ``log`` or ``auto``: raw when any value > 50);
    returns them and the unit written."""
    finite = values[np.isfinite(values)]
    if scale == "auto":
        scale = "raw" if finite.size and finite.max() > RAW_THRESHOLD else "log"
    if scale == "raw":
        if finite.size and finite.min() < 0:
            raise DataError(
                f"{name} has negative values, so they are not raw FPKM-UQ: pass --expression-scale log."
            )
        return np.log10(1.0 + values), f"log10(1 + the values of {name})"
    if scale != "log":
        raise DataError(f"unknown --expression-scale {scale!r} (use auto, raw or log).")
    return values, f"the values of {name}, taken as already log10(1 + x)"


def scan_slides(dirs: Sequence[Path], project: str, unmatched: Unmatched) -> list[SlideFile]:
    """Slide files under ``dirs`` (any depth) named by a TCGA slide barcode; others with a slide suffix
    go to ``unmatched``."""
    slides = []
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if not p.is_file() or not p.name.lower().endswith(SLIDE_SUFFIXES):
                continue
            barcode = slide_barcode(p.name)
            if barcode is None:
                unmatched.add(None, "its name does not start with a TCGA slide barcode", file_name=p.name)
                continue
            file_id = p.parent.name if p.parent != d else ""
            slides.append(SlideFile(barcode, barcode, project, file_id, p.name, p))
    return slides


def build_matrix_cohort(
    matrix: str | os.PathLike,
    dirs: Sequence[str | os.PathLike],
    sheets: Sequence[str | os.PathLike] = (),
    project: str | None = None,
    slides: str = "ffpe",
    scale: str = "auto",
    include_normal: bool = False,
    gene_types: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TcgaCohort:
    """A genes x samples matrix + slides as a cohort (the rules of :mod:`.pairing`); nothing is written.

    ``sheets``: GDC sample sheets listing the slides (found in ``dirs`` as gdc-client writes them); without
    them the slides are the files under ``dirs`` named by barcode, and ``project`` (``TCGA-BRCA``) gives
    their cancer type.
    """
    folders = check_folders(dirs)
    path = Path(matrix)
    unmatched = Unmatched()
    if sheets:
        _, slide_files = sheet_items(read_sheets(sheets), folders, unmatched, rna=False)
    else:
        if not project:
            raise DataError(
                "without a GDC sample sheet the project of the slides is unknown: pass --project "
                "(e.g. --project TCGA-BRCA) or --sheet with the slides' sample sheet."
            )
        slide_files = scan_slides(folders, project, unmatched)
    if not slide_files:
        raise DataError(
            f"no TCGA slide was found in {', '.join(map(str, folders))}"
            + (" from the sample sheets." if sheets else " (files named TCGA-XX-XXXX-01Z-00-DX1....svs).")
        )
    df = read_matrix(path)
    barcodes = [c for c in df.columns if is_barcode(str(c))]
    if not barcodes:
        raise DataError(
            f"{path.name} has no column named by a TCGA barcode (columns: "
            f"{', '.join(map(str, df.columns[:5]))}{' ...' if df.shape[1] > 5 else ''}): it must be genes x "
            "samples with barcodes as column names."
        )
    numeric = df[barcodes].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in barcodes if numeric[c].isna().all() and df[c].notna().any()]
    if bad:
        raise DataError(f"{path.name} has non-numeric sample columns (e.g. {bad[:3]}).")
    values, unit = to_log(numeric.to_numpy(dtype=np.float64), scale, path.name)
    column_of = {str(c): i for i, c in enumerate(barcodes)}
    aliquots = [RnaAliquot(normalise_barcode(c), project or "", "", str(c), path) for c in barcodes]
    pairs = pair_samples(aliquots, slide_files, slides, include_normal, unmatched)
    if not pairs:
        raise DataError(
            f"no column of {path.name} pairs with a slide kept by --slides {slides} ({len(barcodes)} "
            f"columns, {len(slide_files)} slides; e.g. {unmatched[0]['file_name']}: "
            f"{unmatched[0]['reason']})."
        )
    genes = gene_columns(matrix_genes(df), gene_types)
    if not (genes["column"] != "").any():
        raise DataError(f"no gene of {path.name} is left (--gene-types {' '.join(gene_types or [])}?).")
    cohort = assemble(
        pairs, lambda a: values[:, column_of[a.file_name]], genes, unit, unmatched, progress, cancel
    )
    cohort.notes.insert(0, f"values: {unit}, float32.")
    return cohort
