"""The expression model of the sample cohort: the gene panel and its drivers, slide signals -> bulk
expression, the MSI-like label, and the cell-type-resolved targets of SLIDE-EX (cell states -> expression per
cell type, responders). The formulas are documented in ``sample_data/README.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import DataError
from .params import MPP

# gene -> (driver signal, base FPKM, amplitude FPKM per unit of normalised signal, lognormal noise sigma).
# FPKM = (base + amplitude * signal / reference) * exp(sigma * N(0, 1));  value = log10(1 + FPKM).
SIGNAL_REFERENCE = {
    "t_density": 1000.0,  # T cells per mm² of tissue
    "b_density": 1000.0,  # B cells per mm² of tissue
    "epithelium": 0.30,  # epithelium area / tissue area
    "proliferating_density": 300.0,  # proliferating tumour nuclei per mm² of tissue
    "stroma": 0.50,  # stroma area / tissue area
    "fat": 0.10,  # fat area / tissue area
}
GENE_PANEL: dict[str, tuple[str | None, float, float, float]] = {
    "CD3D": ("t_density", 2.0, 60.0, 0.15),
    "CD3E": ("t_density", 1.5, 45.0, 0.15),
    "CD3G": ("t_density", 1.0, 25.0, 0.18),
    "CD247": ("t_density", 1.0, 15.0, 0.18),
    "CD2": ("t_density", 2.0, 40.0, 0.15),
    "CD8A": ("t_density", 1.0, 20.0, 0.20),
    "CD19": ("b_density", 0.5, 15.0, 0.18),
    "MS4A1": ("b_density", 1.0, 50.0, 0.15),
    "CD79A": ("b_density", 1.5, 60.0, 0.15),
    "KRT8": ("epithelium", 20.0, 400.0, 0.12),
    "KRT18": ("epithelium", 20.0, 350.0, 0.12),
    "TP63": ("epithelium", 1.0, 30.0, 0.20),
    "EPCAM": ("epithelium", 5.0, 150.0, 0.15),
    "MKI67": ("proliferating_density", 1.0, 20.0, 0.15),
    "TOP2A": ("proliferating_density", 2.0, 35.0, 0.15),
    "COL1A1": ("stroma", 20.0, 500.0, 0.15),
    "ADIPOQ": ("fat", 0.5, 40.0, 0.20),
}
# Housekeeping / control genes: FPKM = base * exp(0.25 * N(0, 1)), independent of the tissue. More controls
# than these 20 get generated names (CONTROL_PREFIX + 4 digits, see :func:`control_genes`).
HOUSEKEEPING: dict[str, float] = {
    "ACTB": 900.0,
    "GAPDH": 800.0,
    "B2M": 700.0,
    "PPIA": 300.0,
    "RPLP0": 600.0,
    "TBP": 8.0,
    "HPRT1": 12.0,
    "GUSB": 20.0,
    "PGK1": 90.0,
    "TFRC": 30.0,
    "YWHAZ": 150.0,
    "SDHA": 40.0,
    "HMBS": 10.0,
    "UBC": 250.0,
    "POLR2A": 35.0,
    "PUM1": 15.0,
    "IPO8": 9.0,
    "EEF1A1": 1200.0,
    "RPL13A": 500.0,
    "TUBB": 110.0,
}
HOUSEKEEPING_SIGMA = 0.25
CONTROL_PREFIX = "CTRL"
GENES: list[str] = [*GENE_PANEL, *HOUSEKEEPING]  # the genes of a cohort made with the default 20 controls


def control_genes(n_controls: int = len(HOUSEKEEPING)) -> dict[str, float]:
    """The noise-only control genes of a cohort with ``n_controls`` of them: name -> base FPKM.

    The first 20 are :data:`HOUSEKEEPING` (in that order; fewer than 20 takes the first ones); more are named
    ``CTRL0001``, ``CTRL0002``, ... with bases spread log-uniformly over 5–2000 FPKM by a fixed
    (seed-free) low-discrepancy sequence, so a name always has the same base.

    Parameters
    ----------
    n_controls
        How many control genes (>= 0).
    """
    if isinstance(n_controls, bool) or not isinstance(n_controls, (int, np.integer)) or n_controls < 0:
        raise DataError(f"The number of control genes must be a whole number >= 0, not {n_controls!r}.")
    names = list(HOUSEKEEPING)[: int(n_controls)]
    out = {g: HOUSEKEEPING[g] for g in names}
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for k in range(1, int(n_controls) - len(names) + 1):
        frac = (k * golden) % 1.0
        out[f"{CONTROL_PREFIX}{k:04d}"] = round(5.0 * 400.0**frac, 2)
    return out


def is_control_gene(gene: str) -> bool:
    """True for the noise-only control genes (:data:`HOUSEKEEPING` and generated ``CTRL0001``-style names)."""
    if gene in HOUSEKEEPING:
        return True
    rest = gene[len(CONTROL_PREFIX) :]
    return gene.startswith(CONTROL_PREFIX) and len(rest) >= 4 and rest.isdigit()


def slide_signals(tiles: pd.DataFrame, mpp: float = MPP) -> dict[str, float]:
    """Slide-level expression drivers from a tile truth table.

    Densities are cells per mm² of tissue, fractions are areas over the tissue area.
    """
    tile_mm2 = (tiles["size"].to_numpy(float) * mpp / 1000.0) ** 2
    tissue_mm2 = float(np.sum(tiles["tissue_fraction"].to_numpy() * tile_mm2))
    tissue_mm2 = max(tissue_mm2, 1e-9)

    def area(col: str) -> float:
        return float(np.sum(tiles[col].to_numpy() * tile_mm2)) / tissue_mm2

    return {
        "tissue_mm2": tissue_mm2,
        "t_density": float(tiles["t_cells"].sum()) / tissue_mm2,
        "b_density": float(tiles["b_cells"].sum()) / tissue_mm2,
        "tumor_density": float(tiles["tumor_cells"].sum()) / tissue_mm2,
        "proliferating_density": float(tiles["proliferating_cells"].sum()) / tissue_mm2,
        "stromal_density": float(tiles["stromal_cells"].sum()) / tissue_mm2,
        "epithelium": area("epithelium_fraction"),
        "stroma": area("stroma_fraction"),
        "fat": area("fat_fraction"),
    }


def expression_from_signals(
    signals: dict[str, float], rng: np.random.Generator, controls: dict[str, float] | None = None
) -> dict[str, float]:
    """log10(1 + FPKM-UQ)-like values of the panel and control genes for one sample.

    Parameters
    ----------
    signals
        The slide drivers of :func:`slide_signals` (densities in cells per mm² of tissue, area fractions).
    rng
        Draws the noise: one N(0, 1) per gene, panel genes first, in order.
    controls
        Control gene -> base FPKM (default :data:`HOUSEKEEPING`; see :func:`control_genes`), each
        ``log10(1 + base · exp(0.25 · N(0, 1)))``: noise only.

    Returns
    -------
    dict
        Gene -> value, :data:`GENE_PANEL` (formulas there) then the controls.
    """
    out = {}
    for gene, (driver, base, amp, sigma) in GENE_PANEL.items():
        z = signals[driver] / SIGNAL_REFERENCE[driver]
        fpkm = (base + amp * z) * math.exp(sigma * rng.standard_normal())
        out[gene] = math.log10(1.0 + fpkm)
    for gene, base in (HOUSEKEEPING if controls is None else controls).items():
        out[gene] = math.log10(1.0 + base * math.exp(HOUSEKEEPING_SIGMA * rng.standard_normal()))
    return out


def msi_probability(signals: dict[str, float]) -> float:
    """P(MSI-H) = sigmoid(2.5 * (log(t_density / 1000) + 0.5 * log1p(b_density / 1000)) - 1.2)."""
    t = max(signals["t_density"], 1.0) / SIGNAL_REFERENCE["t_density"]
    b = signals["b_density"] / SIGNAL_REFERENCE["b_density"]
    s = 2.5 * (math.log(t) + 0.5 * math.log1p(b)) - 1.2
    return 1.0 / (1.0 + math.exp(-s))


# --- cell-type-resolved targets (SLIDE-EX) ------------------------------------------------------------------

#: Cell types of the deconvolved targets (file names): the drawn ``stromal`` spindles are the fibroblasts.
DECONV_CELL_TYPES: dict[str, str] = {
    "T_cell": "T cell",
    "B_cell": "B cell",
    "tumor": "tumor",
    "fibroblast": "stromal",
}

#: cell type -> gene -> (cell-state driver or None, base FPKM, amplitude FPKM, lognormal sigma): the
#: expression *per cell of that type* (what a deconvolution tool such as CODEFACS estimates), not the
#: bulk. FPKM = (base + amplitude * state) * exp(sigma * N(0, 1)), value = log10(1 + FPKM); the states are
#: in [0, 1] (:func:`cell_states`). A gene with driver None is a control: noise only.
CELLTYPE_PANEL: dict[str, dict[str, tuple[str | None, float, float, float]]] = {
    "T_cell": {
        "CD8A": ("t_activation", 5.0, 60.0, 0.15),
        "GZMB": ("t_activation", 2.0, 120.0, 0.20),
        "IFNG": ("t_activation", 1.0, 30.0, 0.20),
        "IL7R": (None, 40.0, 0.0, 0.25),
    },
    "B_cell": {
        "AICDA": ("b_germinal", 1.0, 40.0, 0.20),
        "CD79A": (None, 80.0, 0.0, 0.25),
    },
    "tumor": {
        "MKI67": ("proliferation", 2.0, 80.0, 0.15),
        "TOP2A": ("proliferation", 4.0, 120.0, 0.15),
        "KRT8": (None, 300.0, 0.0, 0.25),
    },
    "fibroblast": {
        "COL1A1": ("desmoplasia", 50.0, 900.0, 0.15),
        "COL3A1": ("desmoplasia", 30.0, 500.0, 0.15),
        "VIM": (None, 200.0, 0.0, 0.25),
    },
}


def cell_states(signals: dict[str, float]) -> dict[str, float]:
    """Per-sample cell states in [0, 1] that drive the cell-type-specific expression.

    * ``t_activation``: fraction of activated T cells = sigmoid(1.5 · ln(t_density / 1000)) (dense infiltrates
      are the "hot", activated ones);
    * ``b_germinal``: germinal-centre activity = sigmoid(1.5 · ln(b_density / 1000));
    * ``proliferation``: proliferating fraction of tumour nuclei (drawn: dense dark nuclei);
    * ``desmoplasia``: stroma area / tissue area (collagen-rich stroma is activated fibroblast territory).
    """

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    t = max(signals["t_density"], 1.0) / SIGNAL_REFERENCE["t_density"]
    b = max(signals["b_density"], 1.0) / SIGNAL_REFERENCE["b_density"]
    return {
        "t_activation": sig(1.5 * math.log(t)),
        "b_germinal": sig(1.5 * math.log(b)),
        "proliferation": signals["proliferating_density"] / max(signals["tumor_density"], 1e-9),
        "desmoplasia": float(np.clip(signals["stroma"], 0.0, 1.0)),
    }


def responder_probability(signals: dict[str, float]) -> float:
    """P(responder) = sigmoid(5 · (t_activation − 0.5) + 6 · (proliferation − 0.15)) (immune-hot, fast-growing
    tumours respond to chemotherapy)."""
    s = cell_states(signals)
    v = 5.0 * (s["t_activation"] - 0.5) + 6.0 * (s["proliferation"] - 0.15)
    return 1.0 / (1.0 + math.exp(-v))


def celltype_targets(
    abundance: pd.DataFrame, seed: int = 0, patients: Sequence[str] | None = None
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, pd.Series]:
    """Cell-type-resolved targets of a cohort from its ``cell_abundance.tsv`` table (deterministic).

    Parameters
    ----------
    abundance
        Index sample id; the slide signals of :func:`slide_signals` and ``<type>_fraction`` columns.
    patients
        Patient per sample (same order): samples of a patient share the responder label (drawn for the first).

    Returns
    -------
    (expression, fractions, responder)
        ``{cell type: DataFrame samples x genes}`` (log10(1 + FPKM)), cell-type fractions (samples x
        :data:`DECONV_CELL_TYPES`, summing to 1 over the drawn cells) and the 0/1 responder label per sample.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))  # own stream: other outputs unchanged
    expr: dict[str, list[dict[str, float]]] = {ct: [] for ct in CELLTYPE_PANEL}
    responder: dict[str, int] = {}
    by_patient: dict[str, int] = {}
    pats = list(patients) if patients is not None else list(abundance.index)
    for sid, pid in zip(abundance.index, pats, strict=True):
        sig = abundance.loc[sid].to_dict()
        states = cell_states(sig)
        for ct, genes in CELLTYPE_PANEL.items():
            row = {}
            for gene, (driver, base, amp, sigma) in genes.items():
                z = states[driver] if driver else 0.0
                row[gene] = round(
                    math.log10(1.0 + (base + amp * z) * math.exp(sigma * rng.standard_normal())), 5
                )
            expr[ct].append(row)
        u = rng.random()
        if pid not in by_patient:
            by_patient[pid] = int(u < responder_probability(sig))
        responder[str(sid)] = by_patient[pid]
    index = pd.Index([str(s) for s in abundance.index], name="sample_id")
    tables = {ct: pd.DataFrame(rows, index=index) for ct, rows in expr.items()}
    frac = pd.DataFrame(
        {
            ct: abundance[f"{t.replace(' ', '_')}_fraction"].to_numpy(float)
            for ct, t in DECONV_CELL_TYPES.items()
        },
        index=index,
    )
    return tables, frac, pd.Series(responder, name="responder").rename_axis("sample_id")
