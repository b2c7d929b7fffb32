"""Pairing TCGA RNA-seq samples with their slides, and writing the cohort ``train`` takes.

Both importers (:mod:`.gdc` for a GDC download, :mod:`.barcode_matrix` for a genes x samples matrix) list
RNA-seq aliquots and slide files; :func:`pair_samples` pairs them by sample key (patient + sample type,
:func:`~napari_he2rna.cohorts.tcga.sample_key`), :func:`assemble` reads the values of the paired aliquots
and :func:`write_cohort` writes ``samples.tsv``, ``expression.parquet``, ``genes.tsv`` and
``unmatched.tsv`` together. Every file left out gets a row in ``unmatched`` with its reason.

The rules: only tumour samples (sample type 01-09) unless ``include_normal``; slides of the chosen kind
(``--slides``); one row per slide (several slides of one sample: several rows, same patient, same
expression, so patient-grouped folds keep them together); several RNA-seq aliquots of one sample: the
mean of their log values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from .tcga import (
    SLIDE_CHOICES,
    cancer_type_of,
    patient_of,
    sample_key,
    sample_type_code,
    slide_kept,
    slide_type,
    tissue_of,
)

OUTPUT_FILES = ("samples.tsv", "expression.parquet", "genes.tsv", "unmatched.tsv")
UNMATCHED_COLUMNS = ("file_id", "file_name", "data_type", "project_id", "sample_id", "reason")
RNA_TYPE = "Gene Expression Quantification"
SLIDE_TYPE = "Slide Image"
_KIND_NAMES = {"DX": "diagnostic FFPE", "TS": "frozen", "BS": "frozen", "MS": "frozen", "": "unknown-type"}


class UnreadableFile(DataError):
    """One input file cannot be read; it is listed in ``unmatched.tsv`` and the others go on."""


@dataclass
class RnaAliquot:
    """One RNA-seq aliquot: a STAR - Counts file of a GDC download, or a column of a matrix."""

    sample_id: str  # a TCGA barcode (the GDC Sample ID, or the matrix column)
    project: str
    file_id: str = ""
    file_name: str = ""
    path: Path | None = None  # None: listed but not on disk
    case_id: str = ""

    @property
    def key(self) -> str:
        return sample_key(self.sample_id)


@dataclass
class SlideFile:
    """One slide image of a GDC download (or of a folder of slides named by barcode)."""

    barcode: str  # the slide barcode its name starts with (TCGA-A1-A0SB-01Z-00-DX1), or its stem
    sample_id: str  # the GDC Sample ID (TCGA-A1-A0SB-01Z), or the barcode
    project: str
    file_id: str = ""
    file_name: str = ""
    path: Path | None = None  # None: listed but not on disk
    case_id: str = ""
    gdc: dict[str, str] = field(default_factory=dict)  # the sheet's descriptive columns, snake_case

    @property
    def key(self) -> str:
        return sample_key(self.sample_id)

    @property
    def kind(self) -> str:
        return slide_type(self.barcode)


@dataclass
class Pair:
    """One sample with RNA-seq and slides: ``slides`` become rows, ``aliquots`` their expression."""

    key: str
    slides: list[SlideFile]
    aliquots: list[RnaAliquot]


class Unmatched(list):
    """The files left out, one dict per file (the columns of ``unmatched.tsv``)."""

    def add(self, item: RnaAliquot | SlideFile | None, reason: str, **fields: str) -> None:
        row = dict.fromkeys(UNMATCHED_COLUMNS, "")
        if item is not None:
            row.update(
                file_id=item.file_id,
                file_name=item.file_name,
                data_type=RNA_TYPE if isinstance(item, RnaAliquot) else SLIDE_TYPE,
                project_id=item.project,
                sample_id=item.sample_id,
            )
        row.update(fields, reason=reason)
        self.append(row)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(list(self), columns=list(UNMATCHED_COLUMNS))


@dataclass
class TcgaCohort:
    """A cohort ready to write: the sample sheet, expression (samples x genes), genes and what was left
    out."""

    samples: pd.DataFrame  # sample_id, patient_id, cancer_type, slide, ... (one row per slide)
    expression: pd.DataFrame  # index sample_id, one float32 column per gene
    genes: pd.DataFrame  # gene_id, gene_name, gene_type, column, note
    unmatched: pd.DataFrame
    unit: str  # what the values are, e.g. "log10(1 + fpkm_uq_unstranded)"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``3 patients, 3 samples, 4 slides, 60660 genes``."""
        s = self.samples
        n_samples = s["patient_id"].str.cat(s["sample_type_code"], sep="-").nunique()
        return (
            f"{s['patient_id'].nunique()} patients, {n_samples} samples, {len(s)} slides, "
            f"{self.expression.shape[1]} genes"
        )


def _tissue_reason(barcode: str) -> str:
    tissue = tissue_of(barcode)
    code = sample_type_code(barcode)
    if tissue == "other":
        return f"sample type {code} is not tumour (01-09), normal (10-19) or control (20-29)"
    return f"{tissue} tissue (sample type {code}); --include-normal keeps it"


def pair_samples(
    rna: Iterable[RnaAliquot],
    slides: Iterable[SlideFile],
    choice: str,
    include_normal: bool,
    unmatched: Unmatched,
) -> list[Pair]:
    """Pair RNA-seq aliquots and slides by sample key; everything else goes to ``unmatched`` with a reason.

    Items whose ``path`` is None (listed but missing) must already be in ``unmatched``: here they only
    explain why their partner is left out.
    """
    if choice not in SLIDE_CHOICES:
        raise DataError(f"unknown slide choice {choice!r} (use {', '.join(SLIDE_CHOICES)}).")
    allowed = {"tumour"} | ({"normal", "control"} if include_normal else set())
    rna_by_key: dict[str, list[RnaAliquot]] = {}
    rna_missing: set[str] = set()
    for a in rna:
        if a.path is None:
            rna_missing.add(a.key)
        elif tissue_of(a.sample_id) not in allowed:
            unmatched.add(a, _tissue_reason(a.sample_id))
        else:
            rna_by_key.setdefault(a.key, []).append(a)
    slides_by_key: dict[str, list[SlideFile]] = {}
    other_kinds: dict[str, set[str]] = {}
    slide_missing: dict[str, list[str]] = {}
    for s in slides:
        if s.path is None:
            slide_missing.setdefault(s.key, []).append(s.barcode)
        elif tissue_of(s.sample_id) not in allowed:
            unmatched.add(s, _tissue_reason(s.sample_id))
        elif not slide_kept(s.kind, choice):
            keeps = "all" if not s.kind else next(c for c, k in SLIDE_CHOICES.items() if k and s.kind in k)
            unmatched.add(s, f"{_KIND_NAMES[s.kind]} slide ({s.kind or '?'}); --slides {keeps} keeps it")
            other_kinds.setdefault(s.key, set()).add(_KIND_NAMES[s.kind])
        else:
            slides_by_key.setdefault(s.key, []).append(s)
    pairs = []
    for key, aliquots in sorted(rna_by_key.items()):
        if key in slides_by_key:
            pairs.append(Pair(key, sorted(slides_by_key[key], key=lambda s: s.barcode), aliquots))
            continue
        if key in slide_missing:
            why = f"its slide is not on disk ({', '.join(slide_missing[key])})"
        elif key in other_kinds:
            wanted = "diagnostic FFPE" if choice == "ffpe" else "frozen"
            why = (
                f"no {wanted} slide of sample {key} (its {' and '.join(sorted(other_kinds[key]))} "
                f"slides are left out by --slides {choice})"
            )
        else:
            why = f"no slide of sample {key} in the sheets"
        for a in aliquots:
            unmatched.add(a, why)
    for key, kept in slides_by_key.items():
        if key in rna_by_key:
            continue
        why = (
            f"its sample's RNA-seq file is not on disk ({key})"
            if key in rna_missing
            else f"no RNA-seq of sample {key} in the sheets"
        )
        for s in kept:
            unmatched.add(s, why)
    return pairs


def _slide_ids(slides: list[SlideFile]) -> list[str]:
    """Sample ids, one per slide: the slide barcode; where barcodes repeat, the file's stem (then its File
    ID too, where stems repeat)."""
    ids = [s.barcode for s in slides]
    for better in (lambda s: Path(s.file_name).stem or s.barcode, lambda s: f"{s.barcode}.{s.file_id}"):
        counts = pd.Series(ids).value_counts()
        ids = [i if counts[i] == 1 else better(s) for i, s in zip(ids, slides, strict=True)]
    return ids


def assemble(
    pairs: list[Pair],
    read: Callable[[RnaAliquot], np.ndarray],
    genes: pd.DataFrame,
    unit: str,
    unmatched: Unmatched,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TcgaCohort:
    """Read the values of the paired aliquots (``read`` gives the log values of every gene of ``genes``,
    in order, or raises :class:`UnreadableFile`) and build the cohort: one row per slide, the mean of a
    sample's aliquots."""
    keep = genes["column"].astype(str).to_numpy() != ""
    rows, values, slides_kept = [], [], []
    n_averaged = 0
    total = sum(len(p.aliquots) for p in pairs)
    done = 0
    for p in pairs:
        logs, used = [], []
        for a in p.aliquots:
            check_cancel(cancel)
            try:
                logs.append(np.asarray(read(a), dtype=np.float64))
                used.append(a)
            except UnreadableFile as exc:
                unmatched.add(a, f"unreadable: {exc}")
            done += 1
            report(progress, done, total, a.file_name or a.sample_id)
        if not logs:
            for s in p.slides:
                unmatched.add(s, f"the RNA-seq file of sample {p.key} is unreadable")
            continue
        mean = logs[0] if len(logs) == 1 else np.mean(np.stack(logs), axis=0)
        n_averaged += len(logs) > 1
        note = f"mean of the log values of {len(logs)} RNA-seq aliquots" if len(logs) > 1 else ""
        for s in p.slides:
            slides_kept.append(s)
            values.append(mean[keep].astype(np.float32))
            rows.append(
                {
                    "patient_id": patient_of(p.key),
                    "cancer_type": cancer_type_of(s.project),
                    "slide": str(Path(s.path).absolute()) if s.path is not None else "",
                    "tissue": tissue_of(p.key),
                    "sample_type_code": sample_type_code(p.key),
                    "slide_type": s.kind,
                    "project_id": s.project,
                    "case_id": s.case_id,
                    "slide_sample_id": s.sample_id,
                    "slide_file_id": s.file_id,
                    "slide_file_name": s.file_name,
                    "rna_sample_id": ",".join(a.sample_id for a in used),
                    "rna_file_id": ",".join(a.file_id for a in used),
                    "rna_file_name": ",".join(a.file_name for a in used),
                    "n_rna_aliquots": len(used),
                    "note": note,
                    **s.gdc,
                }
            )
    if not rows:
        raise DataError("no sample has both a readable RNA-seq file and a slide; see why in unmatched.tsv.")
    samples = pd.DataFrame(rows)
    samples.insert(0, "sample_id", _slide_ids(slides_kept))
    expression = pd.DataFrame(
        np.stack(values),
        index=pd.Index(samples["sample_id"], name="sample_id"),
        columns=genes["column"][keep],
    )
    notes = []
    if n_averaged:
        notes.append(
            f"{n_averaged} sample(s) have several RNA-seq aliquots: each row holds the mean of their log "
            "values (note and rna_file_id in samples.tsv)."
        )
    if project_note(samples["project_id"]):
        notes.append(project_note(samples["project_id"]))
    return TcgaCohort(samples, expression, genes, unmatched.table(), unit, notes)


def project_note(projects: Sequence[str]) -> str:
    """A note when a cohort mixes projects (kept; ``cancer_type`` is per project), else ''."""
    counts = pd.Series([cancer_type_of(p) for p in projects]).value_counts().sort_index()
    if len(counts) < 2:
        return ""
    listed = ", ".join(f"{k} ({v} slides)" for k, v in counts.items())
    return (
        f"{len(counts)} projects mixed: {listed}; all kept, cancer_type is the project "
        "(train stratifies its folds by it)."
    )


def check_parquet_engine() -> None:
    """Raise one sentence when pandas cannot write parquet here."""
    try:
        import pyarrow  # noqa: F401 - the engine pandas uses for expression.parquet
    except ImportError:
        raise DataError("writing expression.parquet needs pyarrow: pip install pyarrow.") from None


def write_cohort(cohort: TcgaCohort, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``out`` together (staged, then moved into place)."""
    from ..safe_output import staged_folder

    check_parquet_engine()
    out = Path(out)
    with staged_folder(out, overwrite=overwrite) as stage:
        cohort.samples.to_csv(stage / "samples.tsv", sep="\t", index=False)
        cohort.expression.reset_index().to_parquet(stage / "expression.parquet", index=False)
        cohort.genes.to_csv(stage / "genes.tsv", sep="\t", index=False)
        cohort.unmatched.to_csv(stage / "unmatched.tsv", sep="\t", index=False)
    return [out / name for name in OUTPUT_FILES]
