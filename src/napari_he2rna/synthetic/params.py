"""Parameters of the synthetic slides: sizes, cancer types and their tissue composition, the lymphocyte
prior, region labels, and the latent composition of one slide (:class:`SlideParams`, :func:`draw_params`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError

# --- constants ---------------------------------------------------------------------------------------------

MPP = 0.5  # µm per level-0 pixel (20x)
TILE_UM = 112.0  # the HE2RNA tile side (docs/architecture.md)
LAYOUT_DS = 8  # level-0 px per layout-grid cell (4 µm at 0.5 µm/px)
MASK_DOWNSAMPLE = 8  # downsample of the written epithelium mask
TUMOR_SPACING_UM = 15.0  # tumour cells sit on a jittered grid of this pitch
TIFF_TILE = 256
JPEG_QUALITY = 80

CANCER_TYPES = ("SYN-BRCA", "SYN-COAD", "SYN-LUAD")
CELL_TYPES = ("T cell", "B cell", "tumor", "stromal")

# Region labels of the full-resolution label image.
BACKGROUND, STROMA, FAT, EPITHELIUM, FOLLICLE = 0, 1, 2, 3, 4

# Per cancer type: mean epithelium fraction of tissue and mean fat fraction. These make the three "cancer
# types" differ in tissue composition, and in nothing else: the lymphocyte levels are drawn from one
# distribution for every type (IMMUNE_PRIOR), independently of the composition.
CANCER_PROFILES: dict[str, dict[str, float]] = {
    "SYN-BRCA": {"epithelium": 0.25, "fat": 0.18},
    "SYN-COAD": {"epithelium": 0.40, "fat": 0.03},
    "SYN-LUAD": {"epithelium": 0.20, "fat": 0.02},
}
# Slide lymphocyte levels, the same for every cancer type: name -> (median, sigma) of a lognormal, drawn
# independently of each other and of the tissue composition (:func:`draw_immune`).
IMMUNE_PRIOR: dict[str, tuple[float, float]] = {
    "t_level": (1.0, 0.6),  # stromal T cells (multiplies the stromal T-cell density)
    "til_level": (1.0, 0.8),  # tumour-infiltrating T cells among the tumour cells
    "follicles_per_mm2": (2.0, 0.7),  # lymphoid aggregates (B core, T rim) per mm² of tissue
}

# Lymphocyte nuclei: T and B share one optical-density distribution (per-nucleus level U(lo, hi) plus the
# same chromatin grain) and overlapping radii, so that colour alone cannot tell them apart.
LYMPHOCYTE_OD = (1.2, 1.4)  # per-nucleus haematoxylin OD level, uniform
LYMPHOCYTE_GRAIN = 0.25  # + this x U(0, 1) per pixel (chromatin grain)
T_RADIUS_UM = (3.0, 3.5)
B_RADIUS_UM = (3.2, 3.7)
AGGREGATE_CORE_T = 0.10  # share of T cells among the lymphocytes of an aggregate's B-cell core
AGGREGATE_RIM_T = 0.85  # share of T cells among the lymphocytes of its rim (T zone)

# Immune phenotypes a cohort can mix (``make_cohort(phenotypes=...)``, ``he2rna make-sample --phenotypes``):
# how a slide's drawn lymphocyte levels are changed. "mixed" keeps the draw (aggregates with a B core and a
# T rim, stromal T cells and TILs); "t-only" has T cells only (stromal and tumour-infiltrating, no aggregate,
# so no B cell), at least the prior's median level; "aggregates" has aggregates but few T cells outside them.
IMMUNE_PHENOTYPES: dict[str, dict[str, tuple[float, float]]] = {
    # level -> (multiplier, floor) applied as max(level * multiplier, floor)
    "mixed": {},
    "t-only": {"follicles_per_mm2": (0.0, 0.0), "t_level": (1.5, 1.0), "til_level": (1.5, 1.0)},
    "aggregates": {"follicles_per_mm2": (1.5, 2.0), "t_level": (0.15, 0.0), "til_level": (0.15, 0.0)},
}


@dataclass
class SlideParams:
    """The latent tissue composition of one slide (drawn by :func:`draw_params`)."""

    cancer_type: str = "SYN-BRCA"
    tissue_fraction: float = 0.65  # of the slide area
    epithelium: float = 0.25  # epithelium area / tissue area
    fat: float = 0.10  # fat area / tissue area
    t_level: float = 1.0  # multiplies the stromal T-cell density
    follicles_per_mm2: float = 1.0  # expected lymphoid aggregates (B core, T rim) per mm² of tissue
    proliferating: float = 0.15  # fraction of tumour nuclei that proliferate
    stain_h: float = 1.0  # haematoxylin intensity
    stain_e: float = 1.0  # eosin intensity
    til_level: float = 1.0  # multiplies the density of T cells among the tumour cells (TILs)


# --- parameters --------------------------------------------------------------------------------------------


def draw_immune(rng: np.random.Generator) -> dict[str, float]:
    """Draw a slide's lymphocyte levels from :data:`IMMUNE_PRIOR` (the same distribution for every type).

    Returns
    -------
    dict
        ``t_level`` (stromal T cells, x the base density), ``til_level`` (T cells among tumour cells) and
        ``follicles_per_mm2`` (expected lymphoid aggregates per mm² of tissue): independent lognormals.
    """
    return {k: float(med * rng.lognormal(0.0, sigma)) for k, (med, sigma) in IMMUNE_PRIOR.items()}


def apply_phenotype(params: SlideParams, phenotype: str) -> SlideParams:
    """Change ``params``' lymphocyte levels (in place, and return it) to one of :data:`IMMUNE_PHENOTYPES`."""
    if phenotype not in IMMUNE_PHENOTYPES:
        raise DataError(
            f"Unknown immune phenotype {phenotype!r}; choose among {', '.join(IMMUNE_PHENOTYPES)}."
        )
    for key, (mult, floor) in IMMUNE_PHENOTYPES[phenotype].items():
        setattr(params, key, max(float(getattr(params, key)) * mult, floor))
    return params


def draw_params(rng: np.random.Generator, cancer_type: str | None = None) -> SlideParams:
    """Draw a slide's latent composition for ``cancer_type`` (random among :data:`CANCER_TYPES` if None).

    The lymphocyte levels (:func:`draw_immune`) are drawn first, from the same distribution whatever the
    cancer type, so the same generator state gives the same levels for every type; only the epithelium and
    fat fractions depend on the type (:data:`CANCER_PROFILES`).
    """
    immune = draw_immune(rng)
    if cancer_type is None:
        cancer_type = str(rng.choice(CANCER_TYPES))
    if cancer_type not in CANCER_PROFILES:
        raise DataError(
            f"Unknown synthetic cancer type {cancer_type!r}; choose one of {', '.join(CANCER_TYPES)}."
        )
    prof = CANCER_PROFILES[cancer_type]
    return SlideParams(
        cancer_type=cancer_type,
        tissue_fraction=float(rng.uniform(0.55, 0.75)),
        epithelium=float(np.clip(prof["epithelium"] * rng.lognormal(0, 0.45), 0.03, 0.6)),
        fat=float(np.clip(prof["fat"] * rng.lognormal(0, 0.6), 0.0, 0.4)),
        proliferating=float(rng.beta(2, 10)),
        stain_h=float(rng.uniform(0.85, 1.15)),
        stain_e=float(rng.uniform(0.85, 1.15)),
        **immune,
    )
