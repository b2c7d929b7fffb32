"""TCGA barcodes and what follows from them, and the rule that gives every gene one column name.

A TCGA barcode reads ``TCGA-TSS-PPPP-SSV-PPA-...``: ``TCGA-A1-A0SB`` is the patient (the first 12
characters), ``01`` the sample type (characters 14-15: 01-09 tumour, 10-19 normal, 20-29 control), ``A``
the vial. An RNA-seq aliquot (``TCGA-A1-A0SB-01A-11R-A144-07``) and a slide of the same sample share the
patient and the sample type, never the vial: diagnostic FFPE slides are cut from vial ``Z``
(``TCGA-A1-A0SB-01Z-00-DX1``), frozen top/bottom/middle sections from the frozen vial
(``TCGA-A1-A0SB-01A-01-TS1``, ``-BS1``, ``-MS1``). So the sample *key* that pairs them is the first 15
characters, ``TCGA-A1-A0SB-01``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

#: ``--slides`` choices and the slide types (the letters of the slide barcode's last part) each keeps.
SLIDE_CHOICES = {"ffpe": ("DX",), "frozen": ("TS", "BS", "MS"), "all": None}

_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}", re.IGNORECASE)
_SLIDE = re.compile(
    r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]?-[A-Z0-9]{2}-(DX|TS|BS|MS)[A-Z0-9]*)(?![A-Z0-9-])",
    re.IGNORECASE,
)
# R turns the dashes of column names into dots (make.names): TCGA.A1.A0SB.01A.11R.A144.07
_DOTTED = re.compile(r"^TCGA\.[A-Z0-9]{2}\.[A-Z0-9]{4}\.\d{2}", re.IGNORECASE)

PAR_Y_SUFFIX = "_PAR_Y"


def normalise_barcode(text: str) -> str:
    """The barcode with R's dots turned back into dashes, upper case, stripped."""
    text = str(text).strip()
    if _DOTTED.match(text):
        text = text.replace(".", "-")
    return text.upper()


def is_barcode(text: str) -> bool:
    """Whether ``text`` starts with a TCGA sample barcode (patient and sample type: 15 characters)."""
    return bool(_BARCODE.match(normalise_barcode(text)))


def patient_of(barcode: str) -> str:
    """The patient: the first 12 characters (``TCGA-A1-A0SB``)."""
    return normalise_barcode(barcode)[:12]


def sample_key(barcode: str) -> str:
    """Patient + sample type, the first 15 characters (``TCGA-A1-A0SB-01``): what an RNA aliquot and a
    slide of one sample share."""
    return normalise_barcode(barcode)[:15]


def sample_type_code(barcode: str) -> str:
    """Characters 14-15 of the barcode (``01``)."""
    return normalise_barcode(barcode)[13:15]


def tissue_of(barcode: str) -> str:
    """``tumour`` (sample type 01-09), ``normal`` (10-19), ``control`` (20-29) or ``other``."""
    code = sample_type_code(barcode)
    if not code.isdigit():
        return "other"
    n = int(code)
    if 1 <= n <= 9:
        return "tumour"
    if 10 <= n <= 19:
        return "normal"
    if 20 <= n <= 29:
        return "control"
    return "other"


def slide_barcode(file_name: str) -> str | None:
    """The slide barcode a slide file's name starts with (``TCGA-A1-A0SB-01Z-00-DX1`` of
    ``TCGA-A1-A0SB-01Z-00-DX1.B34C267B-....svs``), or None."""
    m = _SLIDE.match(str(file_name).strip())
    return m.group(1).upper() if m else None


def slide_type(barcode: str | None) -> str:
    """``DX`` (diagnostic, FFPE), ``TS``/``BS``/``MS`` (frozen sections) or ``""`` when unknown."""
    m = _SLIDE.match(barcode or "")
    return m.group(2).upper() if m else ""


def slide_kept(kind: str, choice: str) -> bool:
    """Whether ``--slides choice`` keeps a slide of type ``kind``."""
    kept = SLIDE_CHOICES[choice]
    return kept is None or kind in kept


def cancer_type_of(project: str) -> str:
    """The project without ``TCGA-`` (``TCGA-BRCA`` -> ``BRCA``); other projects as they are."""
    project = str(project).strip()
    return project[5:] if project.upper().startswith("TCGA-") else project


def strip_version(gene_id: str) -> str:
    """``ENSG00000000003.15`` -> ``ENSG00000000003`` (``_PAR_Y`` kept)."""
    gene_id = str(gene_id)
    base, _, rest = gene_id.partition(".")
    suffix = PAR_Y_SUFFIX if gene_id.endswith(PAR_Y_SUFFIX) else ""
    return base + suffix if rest else gene_id


def gene_columns(genes: pd.DataFrame, gene_types: Sequence[str] | None = None) -> pd.DataFrame:
    """One column name per gene (its symbol), by one rule; returns ``genes`` with ``column`` and ``note``.

    ``genes`` has ``gene_id`` (Ensembl, with version; may be empty), ``gene_name`` and ``gene_type`` (may
    be empty), in file order. ``gene_types`` keeps only genes of these types (the others get no column).
    The rule:

    * ``ENSG..._PAR_Y`` rows are left out (``column`` empty): they are the chrY copies of the
      pseudo-autosomal genes, which GDC's GRCh38 reference masks, so their counts are zero; the chrX row
      of the same symbol holds the reads.
    * A symbol shared by several other genes names one of them: the first protein-coding one, or, when
      none is protein-coding, the first in file order (GDC files are sorted by Ensembl id). Each other
      gene is named ``SYMBOL_ENSG...`` (its Ensembl id without version); without Ensembl ids (a matrix
      with symbols only), ``SYMBOL_2``, ``SYMBOL_3``, ... in row order.
    * A gene without a symbol is named by its Ensembl id without version.
    """
    out = genes.reset_index(drop=True).copy()
    for c in ("gene_id", "gene_name", "gene_type"):
        out[c] = out[c].fillna("").astype(str).str.strip() if c in out else ""
    column: list[str] = [""] * len(out)
    note: list[str] = [""] * len(out)
    order: dict[str, list[int]] = {}
    wanted = set(gene_types) if gene_types else None
    for i, (gid, name, kind) in enumerate(
        zip(out["gene_id"], out["gene_name"], out["gene_type"], strict=True)
    ):
        if wanted is not None and kind not in wanted:
            note[i] = f"gene type {kind or '(none)'}: left out by --gene-types"
            continue
        if gid.endswith(PAR_Y_SUFFIX):
            note[i] = "chrY copy of a pseudo-autosomal gene (PAR_Y, no reads in GDC files): left out"
            continue
        order.setdefault(name or strip_version(gid), []).append(i)
    taken: set[str] = set()
    for name, rows in order.items():
        first = next((i for i in rows if out.at[i, "gene_type"] == "protein_coding"), rows[0])
        column[first] = name
        taken.add(name)
        for n, i in enumerate((i for i in rows if i != first), start=2):
            gid = strip_version(out.at[i, "gene_id"])
            alias = f"{name}_{gid}" if gid else f"{name}_{n}"
            while alias in taken or alias in order:
                alias += "_"
            column[i] = alias
            taken.add(alias)
            note[i] = f"symbol {name} shared with {out.at[first, 'gene_id'] or 'an earlier row'}: renamed"
    out["column"] = column
    out["note"] = note
    return out
