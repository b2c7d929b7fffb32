"""``he2rna cohort gdc|matrix``: a TCGA download as a cohort for ``extract``, ``train`` and ``evaluate``.

Writes ``samples.tsv``, ``expression.parquet``, ``genes.tsv`` and ``unmatched.tsv`` into ``--out`` (see
docs/tcga.md). Files listed but missing or unreadable are listed in unmatched.tsv, the others go on, and
the exit code is then 1 (as ``he2rna extract`` does for slides that fail).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from ._common import add_overwrite_argument, refuse_existing

_RULES = (
    "Pairing, by TCGA barcode: patient = the first 12 characters, sample type = characters 14-15 (01-09 "
    "tumour, 10-19 normal, 20-29 control). An RNA-seq aliquot (TCGA-A1-A0SB-01A-11R-A144-07) and a slide "
    "(TCGA-A1-A0SB-01Z-00-DX1) of the same patient and sample type belong together. Only tumour samples "
    "unless --include-normal.",
    "Duplicates: several slides of one sample give one row per slide (same patient, same expression, so "
    "patient-grouped folds keep them together); several RNA-seq aliquots of one sample give the mean of "
    "their log values (said in the summary and in the note column of samples.tsv). Several projects are "
    "all kept; cancer_type is the project without 'TCGA-'.",
    "Outputs in --out: samples.tsv (sample_id = the slide barcode, patient_id, cancer_type, slide = the "
    "slide's absolute path, then the GDC columns); expression.parquet (samples x genes, float32, gene "
    "symbols as columns); genes.tsv (Ensembl id with version, symbol, gene type and its column: the chrY "
    "PAR copies are left out, a symbol shared by several genes names the first protein-coding one, or the "
    "first in the file, and the others become SYMBOL_ENSG...); unmatched.tsv (every file left out, and "
    "why). Missing or unreadable files are listed there, the rest is written, and the exit code is 1.",
    "Next: he2rna extract OUT/samples.tsv --backbone B; he2rna train --samples OUT/samples.tsv "
    "--expression OUT/expression.parquet --backbone B --out MODEL. train reads the values as they are: "
    "log values stay below 50, so its --expression-scale auto takes them as already log.",
)


def _text(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cohort",
        help="turn a TCGA download (GDC sample sheets + files, or a genes x samples matrix) into a cohort",
        description=_text(
            "Turn a TCGA download into a cohort for extract, train and evaluate: `he2rna cohort gdc` for a "
            "GDC download, `he2rna cohort matrix` for a genes x samples matrix with barcodes as columns.",
            *_RULES,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    gdc = sub.add_parser(
        "gdc",
        help="a GDC download: the cart's sample sheet(s) and the folder gdc-client wrote",
        description=_text(
            "A GDC download as a cohort: the cart's sample sheet(s) (gdc_sample_sheet.<date>.tsv, with the "
            "older 'Sample Type' column or the current 'Tissue Type, Tumor Descriptor, Specimen Type, "
            "Preservation Method' ones; one cart with RNA-seq and slides, or a sheet each) and the "
            "folder(s) holding the files (gdc-client's <File ID>/<File Name>, or <File Name>).",
            "RNA-seq: 'Gene Expression Quantification' STAR - Counts tables "
            "(*.rna_seq.augmented_star_gene_counts.tsv). Written: log10(1 + the --value column), "
            "by default log10(1 + fpkm_uq_unstranded), float32.",
            *_RULES,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gdc.add_argument(
        "sheets", nargs="+", metavar="SHEET", help="GDC sample sheet(s) (gdc_sample_sheet.*.tsv)"
    )
    gdc.add_argument(
        "--value",
        choices=["fpkm_uq", "tpm", "fpkm", "counts"],
        default="fpkm_uq",
        help="the STAR column written as log10(1 + x): fpkm_uq_unstranded (default, as HE2RNA and "
        "SEQUOIA), tpm_unstranded, fpkm_unstranded or the unstranded counts",
    )
    _common_arguments(gdc)
    gdc.set_defaults(func=run_gdc)
    matrix = sub.add_parser(
        "matrix",
        help="a genes x samples matrix with TCGA barcodes as columns (TCGAbiolinks / SEQUOIA style)",
        description=_text(
            "A genes x samples expression matrix as a cohort (TCGAbiolinks' assay written out, SEQUOIA's "
            "download script): TSV, CSV, space-separated as R's write.table writes it, parquet or h5ad; "
            "rows: Ensembl ids or symbols, with an optional gene_name and gene_type column; columns: TCGA "
            "aliquot or sample barcodes (R's dots for dashes accepted).",
            "Slides: those GDC sample sheets list (--sheet), found in the --files folders; without --sheet, "
            "every slide file under --files named by its barcode (TCGA-XX-XXXX-01Z-00-DX1.<UUID>.svs), "
            "of the project --project. Written: log10(1 + x) of the matrix values, or the values as they "
            "are when they are already log (--expression-scale), float32. Without Ensembl ids, the later "
            "rows of a repeated symbol become SYMBOL_2, SYMBOL_3, ...",
            *_RULES,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    matrix.add_argument("matrix", metavar="MATRIX", help="genes x samples table, TCGA barcodes as columns")
    matrix.add_argument(
        "--sheet",
        action="append",
        default=[],
        metavar="SHEET",
        help="a GDC sample sheet listing the slides (repeatable; its RNA-seq rows are not used)",
    )
    matrix.add_argument(
        "--project",
        default=None,
        help="the project of the slides when no --sheet says it (e.g. TCGA-BRCA; cancer_type = BRCA)",
    )
    matrix.add_argument(
        "--expression-scale",
        choices=["auto", "raw", "log"],
        default="auto",
        help="raw values (log10(1+x) applied), already log, or auto (raw if any value > 50)",
    )
    _common_arguments(matrix)
    matrix.set_defaults(func=run_matrix)


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--files",
        action="append",
        required=True,
        metavar="DIR",
        help="a folder holding the downloaded files (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="COHORT_DIR", help="folder to write the cohort into")
    p.add_argument(
        "--slides",
        choices=["ffpe", "frozen", "all"],
        default="ffpe",
        help="which slides: ffpe = diagnostic DX slides (default, as SEQUOIA), frozen = TS/BS/MS sections "
        "(as the HE2RNA paper), all",
    )
    p.add_argument(
        "--include-normal",
        action="store_true",
        help="keep normal (10-19) and control (20-29) samples too (left out by default)",
    )
    p.add_argument(
        "--gene-types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="keep only genes of these types (e.g. protein_coding lncRNA miRNA, as SEQUOIA); default all",
    )
    add_overwrite_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _outputs(args: argparse.Namespace) -> Path:
    from ..cohorts.pairing import OUTPUT_FILES, check_parquet_engine

    out = Path(args.out).expanduser()
    refuse_existing([out / name for name in OUTPUT_FILES], args.overwrite)
    check_parquet_engine()
    return out


def _options(args: argparse.Namespace) -> dict:
    """The options both sources take."""
    from ..jobs import TextProgress

    progress = None if args.quiet else TextProgress("RNA-seq")
    return {
        "slides": args.slides,
        "include_normal": args.include_normal,
        "gene_types": args.gene_types,
        "progress": progress,
    }


def run_gdc(args: argparse.Namespace) -> int:
    out = _outputs(args)
    from ..cohorts.gdc import build_gdc_cohort

    cohort = build_gdc_cohort(args.sheets, args.files, value=args.value, **_options(args))
    return _finish(cohort, out, args.overwrite)


def run_matrix(args: argparse.Namespace) -> int:
    out = _outputs(args)
    from ..cohorts.barcode_matrix import build_matrix_cohort

    cohort = build_matrix_cohort(
        args.matrix, args.files, args.sheet, args.project, scale=args.expression_scale, **_options(args)
    )
    return _finish(cohort, out, args.overwrite)


def _reason_kind(reason: str) -> str:
    """A reason without its ids and details, to count them: ``no slide of sample TCGA-A1-A0SB-01 in the
    sheets`` -> ``no slide in the sheets``."""
    text = re.sub(r"\s*\([^)]*\)", "", str(reason).split(";")[0])
    return re.sub(r"\s*of sample TCGA-[A-Z0-9-]+", "", text, flags=re.IGNORECASE).split(":")[0].strip()


def _finish(cohort, out: Path, overwrite: bool) -> int:
    from ..cohorts.gdc import MISSING
    from ..cohorts.pairing import write_cohort

    write_cohort(cohort, out, overwrite)
    print(f"cohort: {cohort.summary()} -> {out}")
    for note in cohort.notes:
        print(f"  {note}")
    left = cohort.unmatched
    if len(left):
        counts = left["reason"].map(_reason_kind).value_counts()
        shown = "; ".join(f"{n} {kind}" for kind, n in counts.items())
        print(f"  {len(left)} files left out (unmatched.tsv): {shown}")
    missing = int((left["reason"] == MISSING).sum()) if len(left) else 0
    unreadable = int(left["reason"].str.startswith("unreadable").sum()) if len(left) else 0
    print(
        f"next: he2rna extract {out / 'samples.tsv'} --backbone BACKBONE; he2rna train --samples "
        f"{out / 'samples.tsv'} --expression {out / 'expression.parquet'} --backbone BACKBONE --out MODEL"
    )
    if missing or unreadable:
        parts = [f"{missing} missing"] * bool(missing) + [f"{unreadable} unreadable"] * bool(unreadable)
        print(
            f"he2rna: warning: {' and '.join(parts)} file(s) left out (see unmatched.tsv); the rest of the "
            "cohort was written.",
            file=sys.stderr,
        )
        return 1
    return 0
