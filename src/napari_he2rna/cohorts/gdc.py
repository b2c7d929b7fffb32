"""A GDC download as a cohort: sample sheets, the files gdc-client wrote, STAR - Counts tables.

The GDC portal's cart gives a *sample sheet* (``gdc_sample_sheet.<date>.tsv``) with the columns
:data:`SHEET_COLUMNS` and then either ``Sample Type`` (older sheets) or ``Tissue Type, Tumor Descriptor,
Specimen Type, Preservation Method`` (current ones); a cell may hold several comma-separated ids.
``gdc-client`` writes each file to ``<File ID>/<File Name>`` (a file may also lie directly in the folder).
RNA-seq files (Data Type ``Gene Expression Quantification``, workflow STAR - Counts) are
``<uuid>.rna_seq.augmented_star_gene_counts.tsv``: a ``# gene-model: GENCODE v36`` line, the header
:data:`STAR_HEADER`, four ``N_unmapped/N_multimapping/N_noFeature/N_ambiguous`` rows, then one row per gene.
Slides (Data Type ``Slide Image``) are ``<slide barcode>.<UUID>.svs``.

:func:`build_gdc_cohort` lists every file of the sheets, pairs RNA-seq and slides by TCGA barcode
(:mod:`.pairing`) and reads the chosen value column of each paired STAR file as log10(1 + value).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback
from .pairing import (
    RNA_TYPE,
    SLIDE_TYPE,
    RnaAliquot,
    SlideFile,
    TcgaCohort,
    Unmatched,
    UnreadableFile,
    assemble,
    pair_samples,
)
from .tcga import gene_columns, is_barcode, normalise_barcode, sample_key, slide_barcode

SHEET_COLUMNS = ("File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID")
#: Older sheets have ``Sample Type``; current ones the other four.
DESCRIPTIVE_COLUMNS = (
    "Sample Type",
    "Tissue Type",
    "Tumor Descriptor",
    "Specimen Type",
    "Preservation Method",
)
_MANIFEST_COLUMNS = {"id", "filename", "md5", "size", "state"}

STAR_HEADER = (
    "gene_id",
    "gene_name",
    "gene_type",
    "unstranded",
    "stranded_first",
    "stranded_second",
    "tpm_unstranded",
    "fpkm_unstranded",
    "fpkm_uq_unstranded",
)
STAR_COUNT_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
#: ``--value`` choices and the STAR column each reads.
VALUE_COLUMNS = {
    "fpkm_uq": "fpkm_uq_unstranded",
    "tpm": "tpm_unstranded",
    "fpkm": "fpkm_unstranded",
    "counts": "unstranded",
}
MISSING = "file not found under the --files folders (as <File ID>/<File Name> or <File Name>)"


def snake_case(name: str) -> str:
    """``Tissue Type`` -> ``tissue_type``."""
    return "_".join(str(name).strip().lower().split())


def split_ids(cell: str) -> list[str]:
    """The distinct comma-separated ids of a sheet cell, in order."""
    return list(dict.fromkeys(p.strip() for p in str(cell).split(",") if p.strip()))


# ----------------------------------------------------------------------------------------------- sheets


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """One GDC sample sheet: the columns of :data:`SHEET_COLUMNS` and the descriptive ones it has, as text.

    Raises :class:`DataError` with one sentence when it is missing, unreadable, a gdc-client manifest or
    another table.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the sample sheet {path} does not exist.")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as exc:  # noqa: BLE001 - any parser error: one sentence
        raise DataError(
            f"{path.name} cannot be read as a GDC sample sheet ({type(exc).__name__}: {exc})."
        ) from None
    by_lower = {str(c).strip().lower(): c for c in df.columns}
    if _MANIFEST_COLUMNS <= set(by_lower):
        raise DataError(
            f"{path.name} is a gdc-client manifest, not a sample sheet: pass the cart's sample sheet "
            "(gdc_sample_sheet.<date>.tsv, the Sample Sheet button of the GDC cart)."
        )
    missing = [c for c in SHEET_COLUMNS if c.lower() not in by_lower]
    if missing:
        raise DataError(
            f"{path.name} is not a GDC sample sheet: it lacks the column(s) {', '.join(missing)} "
            "(the Sample Sheet button of the GDC cart writes gdc_sample_sheet.<date>.tsv)."
        )
    wanted = [c for c in SHEET_COLUMNS + DESCRIPTIVE_COLUMNS if c.lower() in by_lower]
    df = df[[by_lower[c.lower()] for c in wanted]].copy()
    df.columns = wanted
    for c in wanted:
        df[c] = df[c].astype(str).str.strip()
    df["sheet"] = path.name
    return df


def read_sheets(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Several sample sheets as one table (a file listed in two sheets once)."""
    sheets = [read_sheet(p) for p in paths]
    df = pd.concat(sheets, ignore_index=True).fillna("")
    df = df.drop_duplicates(subset=["File ID", "File Name"]).reset_index(drop=True)
    if df.empty:
        raise DataError("the sample sheets list no file.")
    return df


def locate(file_id: str, file_name: str, dirs: Sequence[Path]) -> Path | None:
    """``DIR/<File ID>/<File Name>`` (gdc-client's layout) or ``DIR/<File Name>``, in the first folder that
    has it; None when no folder has it."""
    if not file_name or Path(file_name).name != file_name:
        return None
    for d in dirs:
        for p in (d / file_id / file_name if file_id else None, d / file_name):
            if p is not None and p.is_file():
                return p
    return None


def sheet_items(
    sheet: pd.DataFrame, dirs: Sequence[Path], unmatched: Unmatched, rna: bool = True
) -> tuple[list[RnaAliquot], list[SlideFile]]:
    """The RNA-seq aliquots and slides a sheet lists, found on disk (``path`` None when missing, and then
    listed in ``unmatched``); files of other types, or not of one TCGA sample, go to ``unmatched``.

    ``rna=False``: RNA-seq rows are listed as not used (the expression comes from elsewhere).
    """
    descriptive = [c for c in DESCRIPTIVE_COLUMNS if c in sheet.columns]
    aliquots, slides = [], []
    for row in sheet.to_dict("records"):
        file_id, name, data_type = row["File ID"], row["File Name"], row["Data Type"]
        project = ", ".join(split_ids(row["Project ID"]))
        samples = split_ids(row["Sample ID"])
        keys = {sample_key(s) for s in samples if is_barcode(s)}

        def leave(reason: str, row=row, project=project) -> None:
            unmatched.add(
                None,
                reason,
                file_id=row["File ID"],
                file_name=row["File Name"],
                data_type=row["Data Type"],
                project_id=project,
                sample_id=row["Sample ID"],
            )

        if data_type not in (RNA_TYPE, SLIDE_TYPE):
            leave(f"neither RNA-seq ({RNA_TYPE}) nor a slide image ({SLIDE_TYPE})")
            continue
        if data_type == RNA_TYPE and not rna:
            leave("RNA-seq file not used: the expression comes from the matrix")
            continue
        if not samples or not all(is_barcode(s) for s in samples):
            leave("its Sample ID is not a TCGA barcode (only TCGA samples are paired)")
            continue
        if len(keys) > 1:
            leave(f"it belongs to several samples ({', '.join(sorted(keys))})")
            continue
        if len(split_ids(row["Project ID"])) > 1:
            leave(f"it belongs to several projects ({project})")
            continue
        path = locate(file_id, name, dirs)
        sample_id = normalise_barcode(samples[0])
        case_id = ", ".join(split_ids(row["Case ID"]))
        if data_type == RNA_TYPE:
            item: RnaAliquot | SlideFile = RnaAliquot(sample_id, project, file_id, name, path, case_id)
            aliquots.append(item)
        else:
            barcode = slide_barcode(name) or Path(name).stem
            gdc = {snake_case(c): ", ".join(split_ids(row[c])) for c in descriptive}
            item = SlideFile(barcode, sample_id, project, file_id, name, path, case_id, gdc)
            slides.append(item)
        if path is None:
            unmatched.add(item, MISSING)
    return aliquots, slides


def check_folders(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The ``--files`` folders, each checked to be a folder."""
    out = [Path(d).expanduser() for d in dirs]
    for d in out:
        if not d.is_dir():
            raise DataError(f"--files {d} is not a folder: give the folder gdc-client downloaded into.")
    return out


# ------------------------------------------------------------------------------------------ STAR files


def open_text(path: Path) -> io.TextIOBase:
    """A text file, gzip-compressed or not (by its name)."""
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_star(path: Path, column: str, with_genes: bool = True) -> tuple[str, pd.DataFrame]:
    """A STAR - Counts table: ``(gene model, table)`` with ``gene_id`` (+ ``gene_name``, ``gene_type`` when
    ``with_genes``) and ``column`` as float, the ``N_*`` rows left out.

    Raises :class:`DataError` (one sentence) when the header is not STAR's (another format: the whole run
    stops), :class:`UnreadableFile` when the file is damaged (listed, the others go on).
    """
    try:
        with open_text(path) as fh:
            model = ""
            line = fh.readline()
            while line.startswith("#"):
                if "gene-model:" in line:
                    model = line.split("gene-model:", 1)[1].strip()
                line = fh.readline()
            header = tuple(line.rstrip("\r\n").split("\t"))
            if header != STAR_HEADER:
                shown = ", ".join(header[:9]) if line.strip() else "nothing"
                raise DataError(
                    f"{path.name} is not a GDC STAR - Counts table: its header is {shown} "
                    f"(expected {', '.join(STAR_HEADER)})."
                )
            names = ["gene_id", "gene_name", "gene_type"] if with_genes else ["gene_id"]
            table = pd.read_csv(
                fh,
                sep="\t",
                header=None,
                names=list(STAR_HEADER),
                usecols=[*names, column],
                dtype={n: str for n in names},
                keep_default_na=False,
                na_values={column: [""]},
            )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated, not text, not a table: this file only
        raise UnreadableFile(f"{type(exc).__name__}: {exc}") from None
    table = table[~table["gene_id"].isin(STAR_COUNT_ROWS)].reset_index(drop=True)
    values = pd.to_numeric(table[column], errors="coerce")
    if table.empty:
        raise UnreadableFile("it has no gene rows")
    if values.isna().any():
        raise UnreadableFile(f"{int(values.isna().sum())} genes have no number in {column}")
    if (values < 0).any():
        raise UnreadableFile(f"{column} has negative values")
    table[column] = values.astype(np.float64)
    return model, table


class StarReader:
    """Reads the chosen value of paired STAR files as log10(1 + value); the first readable file sets the
    genes and every other must list the same genes in the same order."""

    def __init__(self, value: str = "fpkm_uq") -> None:
        if value not in VALUE_COLUMNS:
            raise DataError(f"unknown --value {value!r} (use {', '.join(VALUE_COLUMNS)}).")
        self.column = VALUE_COLUMNS[value]
        self.genes: pd.DataFrame | None = None
        self.model = ""
        self.source = ""
        self._first: tuple[Path, np.ndarray] | None = None

    @property
    def unit(self) -> str:
        return f"log10(1 + {self.column})"

    def prime(self, aliquots: Sequence[RnaAliquot]) -> bool:
        """Take the genes from the first of ``aliquots`` that reads; False when none does (each one that
        does not is read again, and listed, by :func:`~.pairing.assemble`)."""
        for a in aliquots:
            try:
                self.model, table = read_star(Path(a.path), self.column, with_genes=True)
            except UnreadableFile:
                continue
            self.genes = table[["gene_id", "gene_name", "gene_type"]].copy()
            self.source = a.file_name
            self._first = (Path(a.path), np.log10(1.0 + table[self.column].to_numpy()))
            return True
        return False

    def __call__(self, a: RnaAliquot) -> np.ndarray:
        path = Path(a.path)
        if self._first is not None and self._first[0] == path:
            return self._first[1]
        model, table = read_star(path, self.column, with_genes=False)
        assert self.genes is not None
        if model != self.model:
            raise UnreadableFile(
                f"its gene model is {model or 'not stated'}, not {self.model} as {self.source}"
            )
        ids = table["gene_id"].to_numpy()
        if len(ids) != len(self.genes) or not np.array_equal(ids, self.genes["gene_id"].to_numpy()):
            raise UnreadableFile(f"its genes are not those of {self.source} ({len(ids)} rows)")
        return np.log10(1.0 + table[self.column].to_numpy())


# ------------------------------------------------------------------------------------------- the cohort


def build_gdc_cohort(
    sheets: Sequence[str | os.PathLike],
    dirs: Sequence[str | os.PathLike],
    slides: str = "ffpe",
    value: str = "fpkm_uq",
    include_normal: bool = False,
    gene_types: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TcgaCohort:
    """A GDC download as a cohort (see :mod:`.pairing` for the rules); nothing is written.

    Parameters
    ----------
    sheets : GDC sample sheets (one cart with RNA-seq and slides, or one per data type).
    dirs : the folders gdc-client downloaded into.
    slides : ``ffpe`` (diagnostic ``DX`` slides), ``frozen`` (``TS``/``BS``/``MS``) or ``all``.
    value : the STAR column: ``fpkm_uq`` (default), ``tpm``, ``fpkm`` or ``counts``; written as
        log10(1 + value).
    include_normal : keep normal (10-19) and control (20-29) samples too.
    gene_types : keep only these gene types (``protein_coding``, ``lncRNA``, ...); default all.
    """
    reader = StarReader(value)
    folders = check_folders(dirs)
    sheet = read_sheets(sheets)
    unmatched = Unmatched()
    aliquots, slide_files = sheet_items(sheet, folders, unmatched)
    if not aliquots:
        raise DataError(
            f"the sample sheets list no RNA-seq file ({RNA_TYPE}, STAR - Counts) of a TCGA sample: add "
            "them to the cart, or give a genes x samples matrix to `he2rna cohort matrix`."
        )
    if not slide_files:
        raise DataError(
            f"the sample sheets list no slide ({SLIDE_TYPE}) of a TCGA sample: add them to the cart."
        )
    listed = aliquots + slide_files
    if all(x.path is None for x in listed):
        raise DataError(
            f"none of the {len(listed)} files of the sample sheets is in {', '.join(map(str, folders))} "
            "(as <File ID>/<File Name> or <File Name>): give the folder gdc-client downloaded into."
        )
    pairs = pair_samples(aliquots, slide_files, slides, include_normal, unmatched)
    if not pairs:
        raise DataError(
            f"no sample has both RNA-seq and a slide kept by --slides {slides} ({len(aliquots)} RNA-seq "
            f"files, {len(slide_files)} slides; e.g. {unmatched[0]['file_name']}: {unmatched[0]['reason']})."
        )
    if not reader.prime([a for p in pairs for a in p.aliquots]):
        raise DataError(f"no paired RNA-seq file can be read (e.g. {pairs[0].aliquots[0].path}).")
    genes = gene_columns(reader.genes, gene_types)
    if gene_types and not (genes["column"] != "").any():
        present = ", ".join(sorted(set(reader.genes["gene_type"])))
        raise DataError(f"no gene has a type of --gene-types {' '.join(gene_types)} (types here: {present}).")
    cohort = assemble(pairs, reader, genes, reader.unit, unmatched, progress, cancel)
    model = f"gene model {reader.model}" if reader.model else "gene model not stated in the files"
    cohort.notes.insert(0, f"values: {reader.unit} of the STAR - Counts files, float32 ({model}).")
    return cohort
