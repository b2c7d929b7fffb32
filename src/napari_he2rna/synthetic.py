"""The sample cohort: synthetic H&E-like slides with planted, known truth.

Every slide is drawn from a seed (numpy ``Generator``), written as a tiled pyramidal TIFF that OpenSlide
opens as ``generic-tiff`` (256 px JPEG tiles, reduced levels as top-level pages with ``subfiletype=1``,
resolution tags in centimetres so ``openslide.mpp-x`` = 10000 / XResolution), with its ground truth:

* ``<id>_tiles.csv``: per 112 µm tile of the grid of ``docs/architecture.md``: cell counts per type, tissue,
  epithelium, tumour, stroma and fat fractions;
* ``<id>_cells.csv``: every drawn nucleus (level-0 px centre, type, proliferating flag);
* ``<id>_CD3.tsv`` / ``<id>_CD20.tsv``: "IHC" cell tables in QuPath's detection measurement export format;
* ``<id>_epithelium_mask.png`` (+ ``.json`` sidecar): binary epithelium mask at downsample 8;
* ``<id>_tumor.geojson``: QuPath GeoJSON tumour annotation polygons (level-0 px, holes allowed).

A cohort adds ``samples.tsv`` (sample, patient, cancer type, slide file, MSI-like label),
``expression.tsv`` (samples x genes, log10(1 + FPKM-UQ)-like) and ``cell_abundance.tsv``, and
cell-type-resolved targets for SLIDE-EX (``celltype_expression/<type>.tsv``, ``celltype_abundance.tsv``,
``responders.tsv``, see :func:`write_celltype_targets`). The generative
formulas are documented in ``sample_data/README.md`` and in :data:`GENE_PANEL` /
:func:`expression_from_signals`.

Drawing model: tissue regions come from smooth random fields (thresholded at quantiles that hit the wanted
area fractions) on a coarse "layout" grid (8 level-0 px per cell), bilinearly upsampled so that region borders
stay smooth; nuclei are placed on jittered grids inside their regions and painted as small optical-density
patches; the colour comes from a Beer-Lambert stain model with standard haematoxylin and eosin OD vectors.
T and B lymphocytes look alike (one optical-density law, overlapping sizes) and share the lymphoid aggregates
(B-cell core, T-cell rim); T cells also infiltrate stroma and tumour. The lymphocyte levels follow one
distribution for every cancer type (:data:`IMMUNE_PRIOR`); only the tissue composition depends on the type.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .errors import DataError
from .jobs import CancelToken, ProgressCallback, check_cancel, report

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

# Haematoxylin / eosin optical-density vectors (the Macenko reference used to normalise NCT-CRC-HE, which
# looks like routine H&E scans), and the glass residual OD.
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)
_H_OD /= np.linalg.norm(_H_OD)
_E_OD /= np.linalg.norm(_E_OD)
_GLASS_OD = np.array([0.025, 0.025, 0.02], np.float32)

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


# --- data classes ------------------------------------------------------------------------------------------


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


@dataclass
class SlideTruth:
    """What was planted in one slide.

    Attributes
    ----------
    slide_id, path : the sample id and the TIFF path.
    dimensions : level-0 (width, height) in px.  mpp : µm per px.  tile_px : tile side in level-0 px.
    params : the :class:`SlideParams` it was drawn from.
    cells : one row per nucleus: ``x``, ``y`` (level-0 px, continuous, pixel i covers [i, i+1)), ``type``
        (one of :data:`CELL_TYPES`), ``proliferating`` (bool), ``radius_um``.
    tiles : the ``<id>_tiles.csv`` table (all tiles of the grid, row-major).
    epithelium_mask : (ceil(h/8), ceil(w/8)) bool, the written mask.
    tumor_polygons : list of polygons, each a list of rings (outer first, then holes), each ring an (n, 2)
        array of level-0 (x, y) px, closed.
    files : name -> path of every file written.
    """

    slide_id: str
    path: Path
    dimensions: tuple[int, int]
    mpp: float
    tile_px: int
    params: SlideParams
    cells: pd.DataFrame
    tiles: pd.DataFrame
    epithelium_mask: np.ndarray
    tumor_polygons: list[list[np.ndarray]]
    files: dict[str, Path] = field(default_factory=dict)

    def signals(self) -> dict[str, float]:
        """The slide-level drivers of expression (see :data:`SIGNAL_REFERENCE`)."""
        return slide_signals(self.tiles, self.mpp)


@dataclass
class CohortInfo:
    """A generated cohort: the folder, its sample sheet, expression and cell abundance tables."""

    out_dir: Path
    samples: pd.DataFrame  # sample_id, patient_id, cancer_type, slide, msi_status, seed
    expression: pd.DataFrame  # index sample_id, one column per gene
    abundance: pd.DataFrame  # index sample_id, drivers (densities and fractions)
    truths: list[SlideTruth] = field(default_factory=list)
    # cell-type-resolved targets (SLIDE-EX): {type: samples x genes}, samples x types, 0/1 per sample
    celltype_expression: dict[str, pd.DataFrame] = field(default_factory=dict)
    celltype_abundance: pd.DataFrame = field(default_factory=pd.DataFrame)
    responders: pd.Series = field(default_factory=lambda: pd.Series(dtype=int, name="responder"))

    def slide_path(self, sample_id: str) -> Path:
        row = self.samples.set_index("sample_id").loc[sample_id]
        return self.out_dir / row["slide"]


# --- random fields -----------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """A smooth zero-mean, unit-std random field of ``shape`` whose blobs are about ``feature_px`` wide."""
    f = max(int(round(feature_px)), 1)
    lattice = (int(math.ceil(shape[0] / f)) + 2, int(math.ceil(shape[1] / f)) + 2)
    noise = ndi.gaussian_filter(rng.standard_normal(lattice).astype(np.float32), 0.7, mode="wrap")
    up = _upsample(noise[None], (lattice[0] * f, lattice[1] * f), f)[0]
    if f > 2:  # round off the creases that linear interpolation leaves along the lattice lines
        up = ndi.uniform_filter(up, size=f // 2 + 1, mode="nearest")
    out = up[f : f + shape[0], f : f + shape[1]]
    return (out - out.mean()) / (out.std() + 1e-6)


def _upsample_axis(arr: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Cell-centred linear upsampling by the integer ``f`` along ``axis`` (-1 or -2), with edge clamping.

    Each output phase a in [0, f) is a fixed blend of two neighbouring inputs, so the whole thing is a few
    broadcast operations (``ndimage.zoom(order=1)`` is ~20x slower on a full-resolution slide).
    """
    if f == 1:
        return arr
    a = np.arange(f)
    frac = (a + 0.5) / f - 0.5
    lo = frac < 0
    t = np.where(lo, frac + 1.0, frac).astype(np.float32)
    half = int(lo.sum())  # phases [0, half) blend inputs (i-1, i); phases [half, f) blend (i, i+1)
    if axis == -1:
        n = arr.shape[-1]
        pad = np.concatenate([arr[..., :1], arr, arr[..., -1:]], axis=-1)
        out = np.empty((*arr.shape[:-1], n, f), np.float32)
        for a0, a1, off in ((0, half, 0), (half, f, 1)):
            left, right = pad[..., off : off + n, None], pad[..., off + 1 : off + 1 + n, None]
            view = out[..., a0:a1]
            np.multiply(right - left, t[a0:a1], out=view)
            view += left
        return out.reshape(*arr.shape[:-1], n * f)
    n = arr.shape[-2]
    pad = np.concatenate([arr[..., :1, :], arr, arr[..., -1:, :]], axis=-2)
    out = np.empty((*arr.shape[:-2], n, f, arr.shape[-1]), np.float32)
    for a0, a1, off in ((0, half, 0), (half, f, 1)):
        left, right = pad[..., off : off + n, None, :], pad[..., off + 1 : off + 1 + n, None, :]
        view = out[..., a0:a1, :]
        np.multiply(right - left, t[a0:a1, None], out=view)
        view += left
    return out.reshape(*arr.shape[:-2], n * f, arr.shape[-1])


def _upsample(stack: np.ndarray, out_hw: tuple[int, int], factor: int) -> np.ndarray:
    """Upsample a (k, gh, gw) stack by the integer ``factor`` and crop to (k, h, w)."""
    out = _upsample_axis(_upsample_axis(stack, factor, -1), factor, -2)
    return out[:, : out_hw[0], : out_hw[1]]


def _quantile_threshold(values: np.ndarray, keep_fraction: float) -> float:
    """The threshold above which ``keep_fraction`` of ``values`` lie."""
    if values.size == 0:
        return np.inf
    keep_fraction = float(np.clip(keep_fraction, 0.0, 1.0))
    if keep_fraction <= 0:
        return float(values.max()) + 1.0
    return float(np.quantile(values, 1.0 - keep_fraction))


def _jittered_grid(
    rng: np.random.Generator, w: int, h: int, spacing: float, jitter: float = 0.35
) -> np.ndarray:
    """Candidate cell centres: a jittered square grid, (n, 2) float (x, y) level-0 px inside the slide."""
    nx, ny = int(math.ceil(w / spacing)), int(math.ceil(h / spacing))
    gx, gy = np.meshgrid((np.arange(nx) + 0.5) * spacing, (np.arange(ny) + 0.5) * spacing)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    pts += rng.uniform(-jitter, jitter, pts.shape) * spacing
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    return pts[inside]


def _voronoi_gap(seeds_spacing: float, seeds: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """d2 - d1 (px) for pixel centres (ys, xs), seeds on a jittered grid of ``seeds_spacing`` (grid-indexed).

    ``seeds`` is (ny, nx, 2) (x, y); the nearest two seeds are looked for in the 3x3 neighbouring grid cells,
    which is exact enough for a jitter below half the spacing. Small values are Voronoi borders (cell walls).
    """
    ny, nx = seeds.shape[:2]
    ci = np.clip((ys / seeds_spacing).astype(np.int64), 0, ny - 1)
    cj = np.clip((xs / seeds_spacing).astype(np.int64), 0, nx - 1)
    d1 = np.full(ys.shape, np.inf, np.float32)
    d2 = np.full(ys.shape, np.inf, np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ii = np.clip(ci + di, 0, ny - 1)
            jj = np.clip(cj + dj, 0, nx - 1)
            s = seeds[ii, jj]
            d = np.hypot(s[..., 0] - xs, s[..., 1] - ys).astype(np.float32)
            # a clipped neighbour can repeat a seed: only count distinct grid cells
            valid = (ci + di == ii) & (cj + dj == jj)
            d = np.where(valid, d, np.inf)
            d2 = np.where(d < d1, d1, np.minimum(d2, d))
            d1 = np.minimum(d1, d)
    return d2 - d1


def _seed_grid(rng: np.random.Generator, w: int, h: int, spacing: float, jitter: float = 0.3) -> np.ndarray:
    ny, nx = int(math.ceil(h / spacing)) + 1, int(math.ceil(w / spacing)) + 1
    gx, gy = np.meshgrid((np.arange(nx) + 0.5) * spacing, (np.arange(ny) + 0.5) * spacing)
    seeds = np.stack([gx, gy], -1) + rng.uniform(-jitter, jitter, (ny, nx, 2)) * spacing
    return seeds.astype(np.float32)


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


# --- layout ------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    labels: np.ndarray  # (h, w) uint8 region label
    tumor_score: np.ndarray  # (gh, gw) float32, > 0 inside the tumour bed (layout grid)
    t_density: np.ndarray  # (gh, gw) float32, stromal T-cell keep probability (7.5 µm grid)
    til_density: np.ndarray  # (gh, gw) float32, keep probability of T cells among tumour cells
    follicle_score: np.ndarray  # (h, w) float32, > 0 inside lymphoid aggregates, halo is (-0.25, 0]
    core_score: np.ndarray  # (gh, gw) float32, > 0 in the aggregates' B-cell cores (layout grid)
    fibres: np.ndarray  # (h, w) float32 in [0, 1]
    texture: np.ndarray  # (h, w) float32 ~ N(0,1) smooth, fine-scale
    fibre_angle: np.ndarray  # (gh, gw) local fibre direction (radians), for spindle nuclei


def _layout(rng: np.random.Generator, w: int, h: int, p: SlideParams, mpp: float) -> _Layout:
    ds = LAYOUT_DS
    gh, gw = int(math.ceil(h / ds)), int(math.ceil(w / ds))
    g_um = ds * mpp  # µm per layout cell
    um = lambda v: v / g_um  # noqa: E731  µm -> layout px

    # Tissue: an elliptical blob with a wobbly outline; keep the largest piece.
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    cy, cx = gh / 2 * (1 + rng.uniform(-0.08, 0.08)), gw / 2 * (1 + rng.uniform(-0.08, 0.08))
    ry, rx = gh * rng.uniform(0.42, 0.5), gw * rng.uniform(0.42, 0.5)
    ang = rng.uniform(0, np.pi)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    r2 = (dx * np.cos(ang) + dy * np.sin(ang)) ** 2 + (-dx * np.sin(ang) + dy * np.cos(ang)) ** 2
    t_field = (
        1.0
        - r2
        + 0.22 * _smooth_noise(rng, (gh, gw), um(300))
        + 0.08 * _smooth_noise(rng, (gh, gw), um(60))
        + 0.03 * _smooth_noise(rng, (gh, gw), um(12))
    )
    t_thr = _quantile_threshold(t_field.ravel(), p.tissue_fraction)
    tissue = t_field > t_thr
    lab, n = ndi.label(tissue)
    if n > 1:
        sizes = ndi.sum(tissue, lab, index=np.arange(1, n + 1))
        keep = ndi.binary_dilation(lab == (1 + int(np.argmax(sizes))), iterations=2)
        t_field = np.where(keep, t_field, t_thr - 1.0)
    tissue_s = (t_field - t_thr) * 4.0
    in_tissue = tissue_s > 0

    # Tumour bed: large blobs; epithelial nests: finer blobs inside the bed.
    bed_frac = min(0.85, p.epithelium / 0.55)
    b_field = _smooth_noise(rng, (gh, gw), um(350)) + 0.35 * _smooth_noise(rng, (gh, gw), um(100))
    b_thr = _quantile_threshold(b_field[in_tissue], bed_frac)
    bed_s = np.minimum(tissue_s, b_field - b_thr)
    in_bed = bed_s > 0
    n_field = _smooth_noise(rng, (gh, gw), um(60)) + 0.4 * _smooth_noise(rng, (gh, gw), um(20))
    nest_frac_in_bed = p.epithelium * in_tissue.sum() / max(in_bed.sum(), 1)
    n_thr = _quantile_threshold(n_field[in_bed], nest_frac_in_bed)
    nest_s = np.minimum(bed_s * 3.0, n_field - n_thr)

    # Fat: large lobules outside the tumour bed.
    f_field = _smooth_noise(rng, (gh, gw), um(250)) + 0.3 * _smooth_noise(rng, (gh, gw), um(80))
    out_bed = in_tissue & ~in_bed
    f_thr = _quantile_threshold(f_field[out_bed], p.fat * in_tissue.sum() / max(out_bed.sum(), 1))
    fat_s = np.minimum(np.minimum(tissue_s, -bed_s), f_field - f_thr)

    # Lymphoid aggregates ("follicles"): round dense aggregates centred in stroma (not fat, not tumour bed),
    # a B-cell core (70-85 % of the radius) inside a T-cell rim.
    tissue_mm2 = in_tissue.sum() * (g_um / 1000.0) ** 2
    n_fol = int(rng.poisson(p.follicles_per_mm2 * tissue_mm2))
    fol_s = np.full((gh, gw), -10.0, np.float32)
    core_s = np.full((gh, gw), -10.0, np.float32)
    stroma_cells = np.argwhere(in_tissue & ~in_bed & ~(fat_s > 0) & (tissue_s > 0.6))
    centres: list[tuple[float, float, float]] = []
    for _ in range(n_fol):
        if len(stroma_cells) == 0:
            break
        for _try in range(20):
            cyx = stroma_cells[rng.integers(len(stroma_cells))]
            rad = um(rng.uniform(70, 150))
            if all(math.hypot(cyx[0] - c[0], cyx[1] - c[1]) > rad + c[2] + um(40) for c in centres):
                centres.append((float(cyx[0]), float(cyx[1]), rad))
                break
    wob = _smooth_noise(rng, (gh, gw), um(40))
    for fy, fx, rad in centres:
        e = rng.uniform(0.8, 1.2)
        core = rng.uniform(0.7, 0.85)
        d = np.hypot((yy - fy) * e, (xx - fx) / e) / rad
        fol_s = np.maximum(fol_s, 1.0 - d + 0.06 * wob)
        core_s = np.maximum(core_s, core - d + 0.06 * wob)
    fol_s = np.minimum(fol_s, tissue_s)
    core_s = np.minimum(core_s, fol_s)

    # Stromal T cells: loose patches of higher density in the stroma (and along the tumour margin).
    infil = _smooth_noise(rng, (gh, gw), um(80))
    margin = np.exp(-np.abs(b_field - b_thr) * 3.0)
    t_density = 0.03 + 0.30 * np.clip(infil - 0.6, 0, None) + 0.08 * margin
    t_density = (t_density * p.t_level).astype(np.float32)
    # Tumour-infiltrating T cells: patchy (mean-one lognormal field, 150 µm patches), x til_level.
    til = np.exp(0.7 * _smooth_noise(rng, (gh, gw), um(150)) - 0.245)
    til_density = (0.30 * p.til_level * til).astype(np.float32)

    # Stroma fibre orientation field and textures (layout grid, upsampled below).
    warp1 = _smooth_noise(rng, (gh, gw), um(150)) * 40.0
    warp2 = _smooth_noise(rng, (gh, gw), um(150)) * 40.0
    blend = 1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, (gh, gw), um(200))))
    bundles = _smooth_noise(rng, (gh, gw), um(25))
    texture = _smooth_noise(rng, (gh, gw), um(10))

    stack = np.stack([tissue_s, fat_s, nest_s, fol_s, warp1, warp2, blend, bundles, texture]).astype(
        np.float32
    )
    full = _upsample(stack, (h, w), ds)
    tissue_f, fat_f, nest_f, fol_f, w1, w2, bl, bund, tex = full

    labels = np.zeros((h, w), np.uint8)
    labels[tissue_f > 0] = STROMA
    labels[(fat_f > 0) & (tissue_f > 0)] = FAT
    labels[(nest_f > 0) & (tissue_f > 0)] = EPITHELIUM
    labels[(fol_f > 0) & (tissue_f > 0)] = FOLLICLE

    # Collagen fibres: white noise smeared along one axis (streaks), rows/columns shifted by a smooth warp so
    # that the streaks wave, two families (along x, along y) blended; computed at half resolution.
    h2, w2_ = (h + 1) // 2, (w + 1) // 2
    fam = []
    for axis, warp in ((1, w1), (0, w2)):
        streak = rng.standard_normal((h2, w2_), dtype=np.float32)
        streak = ndi.gaussian_filter1d(streak, 4.0, axis=axis)
        streak = ndi.gaussian_filter1d(streak, 0.6, axis=1 - axis)
        streak /= streak.std() + 1e-6
        shift = np.round(warp[::2, ::2] * 1.0).astype(np.int64)
        if axis == 1:  # waves: each column's streaks are moved up/down by the warp
            idx = np.clip(np.arange(h2)[:, None] + shift, 0, h2 - 1)
            streak = np.take_along_axis(streak, idx, axis=0)
        else:
            idx = np.clip(np.arange(w2_)[None, :] + shift, 0, w2_ - 1)
            streak = np.take_along_axis(streak, idx, axis=1)
        fam.append(streak)
    bl2 = bl[::2, ::2]
    fib = bl2 * fam[0] + (1.0 - bl2) * fam[1]
    fib = np.clip(0.4 + 0.4 * fib, 0.0, 1.0) * np.clip(0.6 + 0.4 * bund[::2, ::2], 0.15, 1.0)
    fibres = _upsample(fib[None], (h, w), 2)[0]
    # fibre direction: family 1 runs along x, family 2 along y
    fibre_angle = np.where(blend > 0.5, 0.0, np.pi / 2).astype(np.float32)
    return _Layout(
        labels,
        bed_s.astype(np.float32),
        t_density,
        til_density,
        fol_f,
        core_s.astype(np.float32),
        fibres.astype(np.float32),
        tex.astype(np.float32),
        fibre_angle,
    )


# --- cells -------------------------------------------------------------------------------------------------


def _bilinear_at(arr: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear value of the layout-grid field ``arr`` at level-0 (x, y) px ``pts`` (cell-centred grid)."""
    coords = np.stack([pts[:, 1] / LAYOUT_DS - 0.5, pts[:, 0] / LAYOUT_DS - 0.5])
    return ndi.map_coordinates(arr, coords, order=1, mode="nearest")


def _place_cells(
    rng: np.random.Generator, lay: _Layout, w: int, h: int, p: SlideParams, mpp: float
) -> pd.DataFrame:
    """Nucleus centres per type on jittered grids, kept where their region (and density) says."""
    labels = lay.labels
    px = lambda um: um / mpp  # noqa: E731

    def region_at(pts: np.ndarray) -> np.ndarray:
        return labels[pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)]

    def layout_at(arr: np.ndarray, pts: np.ndarray) -> np.ndarray:
        gi = np.clip((pts[:, 1] / LAYOUT_DS).astype(np.int64), 0, arr.shape[0] - 1)
        gj = np.clip((pts[:, 0] / LAYOUT_DS).astype(np.int64), 0, arr.shape[1] - 1)
        return arr[gi, gj]

    parts = []
    # Tumour cells: packed epithelium, ~13 µm apart.
    pts = _jittered_grid(rng, w, h, px(TUMOR_SPACING_UM), 0.25)
    pts = pts[(region_at(pts) == EPITHELIUM) & (rng.random(len(pts)) < 0.97)]
    prolif = rng.random(len(pts)) < p.proliferating
    parts.append(
        pd.DataFrame(
            {
                "x": pts[:, 0],
                "y": pts[:, 1],
                "type": "tumor",
                "proliferating": prolif,
                "radius_um": np.clip(rng.lognormal(np.log(5.3), 0.13, len(pts)), 4.2, 7.0),
            }
        )
    )
    tumor_xy = pts
    # Lymphoid aggregates: one packed lymphocyte grid (~7 µm apart, 90 % kept) over core and rim alike, so
    # the packing does not tell the zones apart; each lymphocyte is a T cell with probability 0.10 in the
    # B-cell core and 0.85 in the rim (T zone), else a B cell.
    pts = _jittered_grid(rng, w, h, px(7.2), 0.2)
    pts = pts[(region_at(pts) == FOLLICLE) & (rng.random(len(pts)) < 0.9)]
    in_core = _bilinear_at(lay.core_score, pts) > 0
    agg_t = rng.random(len(pts)) < np.where(in_core, AGGREGATE_CORE_T, AGGREGATE_RIM_T)
    # T cells outside aggregates: stromal (patchy infiltrates, tumour margin), a soft halo around the
    # aggregates, TILs among the tumour cells (not on top of a tumour nucleus), a very few in fat.
    cand = _jittered_grid(rng, w, h, px(7.5), 0.35)
    reg = region_at(cand)
    fol = lay.follicle_score[cand[:, 1].astype(np.int64), cand[:, 0].astype(np.int64)]
    halo = (reg == STROMA) & (fol > -0.25)
    prob = np.select(
        [reg == STROMA, reg == EPITHELIUM, reg == FAT],
        [layout_at(lay.t_density, cand), layout_at(lay.til_density, cand), 0.003 * p.t_level],
        0.0,
    )
    prob = np.clip(prob + halo * 0.12 * min(p.t_level, 2.0), 0.0, 0.85)
    keep = rng.random(len(cand)) < prob
    tils = keep & (reg == EPITHELIUM)
    if tils.any() and len(tumor_xy):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(tumor_xy).query(cand[tils])
        keep[np.flatnonzero(tils)[dist < px(7.0)]] = False
    t_xy = np.concatenate([pts[agg_t], cand[keep]])
    b_xy = pts[~agg_t]
    for ctype, xy, (r_lo, r_hi) in (("B cell", b_xy, B_RADIUS_UM), ("T cell", t_xy, T_RADIUS_UM)):
        parts.append(
            pd.DataFrame(
                {
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                    "type": ctype,
                    "proliferating": False,
                    "radius_um": rng.uniform(r_lo, r_hi, len(xy)),
                }
            )
        )
    # Stromal cells (fibroblasts): sparse spindles in the stroma.
    pts = _jittered_grid(rng, w, h, px(18.0), 0.4)
    fol = lay.follicle_score[pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)]
    pts = pts[(region_at(pts) == STROMA) & (fol < -0.25) & (rng.random(len(pts)) < 0.45)]
    parts.append(
        pd.DataFrame(
            {
                "x": pts[:, 0],
                "y": pts[:, 1],
                "type": "stromal",
                "proliferating": False,
                "radius_um": rng.uniform(4.0, 6.0, len(pts)),
            }
        )
    )
    cells = pd.concat(parts, ignore_index=True)
    # Round centres to 0.01 µm so that the µm written in the QuPath tables maps back to the same px exactly.
    cells["x"] = np.round(cells["x"].to_numpy() * mpp, 2) / mpp
    cells["y"] = np.round(cells["y"].to_numpy() * mpp, 2) / mpp
    cells = cells[(cells["x"] < w) & (cells["y"] < h)].reset_index(drop=True)
    cells["proliferating"] = cells["proliferating"].astype(bool)
    return cells


# --- painting ----------------------------------------------------------------------------------------------


def _paint_nuclei(
    rng: np.random.Generator,
    hmap: np.ndarray,
    cover: np.ndarray,
    cells: pd.DataFrame,
    lay: _Layout,
    mpp: float,
    pad: int,
) -> None:
    """Paint every nucleus as an OD patch into the padded ``hmap`` (max) and ``cover`` (nucleus coverage)."""
    for ctype in CELL_TYPES:
        sub = cells[cells["type"] == ctype]
        if len(sub) == 0:
            continue
        k = len(sub)
        cx = sub["x"].to_numpy(np.float32) + pad
        cy = sub["y"].to_numpy(np.float32) + pad
        rad = sub["radius_um"].to_numpy(np.float32) / mpp
        prolif = sub["proliferating"].to_numpy(bool)
        if ctype == "stromal":  # spindle, along the local fibres
            a, b = rad * 1.6, rad * 0.32
            gi = np.clip(((cy - pad) / LAYOUT_DS).astype(np.int64), 0, lay.fibre_angle.shape[0] - 1)
            gj = np.clip(((cx - pad) / LAYOUT_DS).astype(np.int64), 0, lay.fibre_angle.shape[1] - 1)
            theta = lay.fibre_angle[gi, gj] + rng.normal(0, 0.3, k).astype(np.float32)
        else:
            ratio = (
                rng.uniform(0.75, 1.0, k).astype(np.float32)
                if ctype == "tumor"
                else rng.uniform(0.88, 1.0, k).astype(np.float32)
            )
            a, b = rad / np.sqrt(ratio), rad * np.sqrt(ratio)
            theta = rng.uniform(0, np.pi, k).astype(np.float32)
        half = int(math.ceil(float(np.max(a)))) + 2
        off = np.arange(-half, half + 1, dtype=np.float32)
        ix0 = np.floor(cx).astype(np.int64)
        iy0 = np.floor(cy).astype(np.int64)
        # pixel-centre offsets from the nucleus centre, (k, size, size)
        ddx = (ix0 - cx + 0.5)[:, None, None] + off[None, None, :]
        ddy = (iy0 - cy + 0.5)[:, None, None] + off[None, :, None]
        ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u = (ddx * ct + ddy * st) / a[:, None, None]
        v = (-ddx * st + ddy * ct) / b[:, None, None]
        phi = np.arctan2(v, u)
        wobble = 1.0 + (0.07 if ctype == "tumor" else 0.035) * np.cos(
            3 * phi + rng.uniform(0, 6.3, k)[:, None, None].astype(np.float32)
        )
        r = np.sqrt(u * u + v * v) * wobble
        inside = np.clip((1.0 - r) / 0.18, 0.0, 1.0)  # soft edge, ~1 px
        grain = rng.random(r.shape, dtype=np.float32)
        if ctype == "tumor":
            # vesicular: pale interior, dark rim (nuclear membrane), a nucleolus; proliferating: dense
            rim = np.clip(1.0 - np.abs(r - 0.9) / 0.12, 0.0, 1.0)
            nuc_off = rng.uniform(-0.3, 0.3, (k, 2)).astype(np.float32)
            dn = np.hypot(u - nuc_off[:, 0, None, None], v - nuc_off[:, 1, None, None])
            nucleolus = np.clip((0.16 - dn) / 0.06, 0.0, 1.0)
            speck = (grain > 0.8) * 0.35  # coarse chromatin granules
            od = inside * (0.38 + 0.35 * rim + speck) + 0.5 * nucleolus
            dense = inside * (1.2 + 0.6 * grain)
            od = np.where(prolif[:, None, None], dense, od)
        elif ctype in ("T cell", "B cell"):  # one OD level per nucleus, the same law for T and B
            level = rng.uniform(*LYMPHOCYTE_OD, k).astype(np.float32)
            od = inside * (level[:, None, None] + LYMPHOCYTE_GRAIN * grain)
        else:
            od = inside * (0.95 + 0.2 * grain)
        rows = iy0[:, None, None] + off.astype(np.int64)[None, :, None]
        cols = ix0[:, None, None] + off.astype(np.int64)[None, None, :]
        flat = rows * hmap.shape[1] + cols
        keep = inside > 0
        flat, od_k, cov_k = flat[keep], od[keep], inside[keep]
        np.maximum.at(hmap.ravel(), flat, od_k.astype(np.float32))
        np.maximum.at(cover.ravel(), flat, cov_k.astype(np.float32))


def _render(
    rng: np.random.Generator, lay: _Layout, cells: pd.DataFrame, w: int, h: int, p: SlideParams, mpp: float
) -> np.ndarray:
    """The RGB level-0 image (h, w, 3) uint8 from regions, fibres and nuclei via Beer-Lambert."""
    labels = lay.labels
    tex = lay.texture
    hmap = np.zeros((h, w), np.float32)
    emap = np.zeros((h, w), np.float32)

    stroma = labels == STROMA
    emap[stroma] = (0.15 + 0.7 * lay.fibres + 0.04 * tex)[stroma]
    hmap[stroma] = (0.05 + 0.05 * lay.fibres)[stroma]

    # Epithelium: pale purple cytoplasm with faint cell borders (Voronoi walls of the tumour-cell grid).
    epi = labels == EPITHELIUM
    if epi.any():
        seeds_spacing = TUMOR_SPACING_UM / mpp
        seeds = _seed_grid(rng, w, h, seeds_spacing)
        ey, ex = np.nonzero(epi)
        gap = _voronoi_gap(seeds_spacing, seeds, ey.astype(np.float32) + 0.5, ex.astype(np.float32) + 0.5)
        wall = np.clip(1.0 - gap / 2.0, 0, 1)
        emap[ey, ex] = 0.30 + 0.05 * tex[ey, ex] + 0.18 * wall
        hmap[ey, ex] = 0.17 + 0.03 * tex[ey, ex] + 0.06 * wall

    # Fat: empty polygonal adipocytes with thin pink walls.
    fat = labels == FAT
    if fat.any():
        seeds_spacing = 80.0 / mpp
        seeds = _seed_grid(rng, w, h, seeds_spacing, 0.35)
        fy, fx = np.nonzero(fat)
        gap = _voronoi_gap(seeds_spacing, seeds, fy.astype(np.float32) + 0.5, fx.astype(np.float32) + 0.5)
        wall = np.clip(1.0 - gap / 3.0, 0, 1)
        emap[fy, fx] = 0.6 * wall
        hmap[fy, fx] = 0.08 * wall

    fol = labels == FOLLICLE
    emap[fol] = 0.16 + 0.03 * tex[fol]
    hmap[fol] = 0.14 + 0.03 * tex[fol]

    # Nuclei, on a padded canvas so that patches near the border need no clipping.
    pad = 24
    hpad = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    cpad = np.zeros_like(hpad)
    _paint_nuclei(rng, hpad, cpad, cells, lay, mpp, pad)
    hn, cov = hpad[pad:-pad, pad:-pad], cpad[pad:-pad, pad:-pad]
    np.maximum(hmap, hn, out=hmap)
    emap *= 1.0 - 0.65 * cov

    hmap *= p.stain_h
    emap *= p.stain_e
    # Slight per-pixel noise (sensor / section thickness), only where there is tissue.
    tissue = (labels != BACKGROUND) & (labels != FAT)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    hmap += 0.025 * noise * tissue
    emap += 0.02 * noise[::-1] * tissue
    # Beer-Lambert through a lookup table on quantised OD (an exp per pixel and channel is the slowest step).
    hq = np.clip(hmap * (255.0 / _OD_MAX), 0, 255).astype(np.uint8)
    eq = np.clip(emap * (255.0 / _OD_MAX), 0, 255).astype(np.uint8)
    return _stain_lut()[hq, eq]


_OD_MAX = 3.0


def _stain_lut() -> np.ndarray:
    """(256, 256, 3) uint8: RGB of haematoxylin OD i and eosin OD j (both in [0, _OD_MAX] over 255 steps)."""
    od = np.linspace(0, _OD_MAX, 256, dtype=np.float32)
    tot = od[:, None, None] * _H_OD + od[None, :, None] * _E_OD + _GLASS_OD
    return np.clip(248.0 * np.exp(-tot), 0, 255).round().astype(np.uint8)


# --- truth tables ------------------------------------------------------------------------------------------


def _block_mean(mask: np.ndarray, block: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Fraction of True per block of ``block`` px, zero-padded to (n_rows*block, n_cols*block)."""
    full = np.zeros((n_rows * block, n_cols * block), np.float32)
    hh, ww = min(mask.shape[0], full.shape[0]), min(mask.shape[1], full.shape[1])
    full[:hh, :ww] = mask[:hh, :ww]
    return full.reshape(n_rows, block, n_cols, block).mean(axis=(1, 3))


def _tumor_polygons(bed_s: np.ndarray, ds: int, w: int, h: int) -> list[list[np.ndarray]]:
    """Outer rings with their holes, level-0 (x, y) px, from the layout-grid tumour-bed score (> 0 inside)."""
    from matplotlib.path import Path as MplPath
    from skimage.measure import find_contours

    padded = np.pad(bed_s, 1, constant_values=-1.0)
    rings = []
    for c in find_contours(padded, 0.0, positive_orientation="high"):
        if len(c) < 4:
            continue
        xy = np.stack([(c[:, 1] - 1 + 0.5) * ds, (c[:, 0] - 1 + 0.5) * ds], 1)
        xy[:, 0] = np.clip(xy[:, 0], 0, w)  # the slide border closes rings that run off the slide
        xy[:, 1] = np.clip(xy[:, 1], 0, h)
        xy = np.round(xy, 2)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        # shoelace in (x, y) with y down: high-valued islands come out with one sign, holes the other
        area = 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))
        if abs(area) < (2 * ds) ** 2:
            continue
        rings.append((area, xy))
    if not rings:
        return []
    outer_sign = np.sign(max(rings, key=lambda r: abs(r[0]))[0])
    outers = [r[1] for r in rings if np.sign(r[0]) == outer_sign]
    holes = [r[1] for r in rings if np.sign(r[0]) != outer_sign]
    polys: list[list[np.ndarray]] = [[o] for o in outers]
    for hole in holes:
        for poly in polys:
            if MplPath(poly[0]).contains_point(hole[0]):
                poly.append(hole)
                break
    return polys


def rasterize_polygons(
    polygons: list[list[np.ndarray]], shape_hw: tuple[int, int], downsample: float = 1.0
) -> np.ndarray:
    """Rasterise polygons with holes (even-odd) to a bool mask of ``shape_hw`` at ``downsample``."""
    from PIL import Image, ImageDraw

    out = np.zeros(shape_hw, bool)
    for poly in polygons:
        for ring in poly:
            img = Image.new("1", (shape_hw[1], shape_hw[0]), 0)
            pts = [(float(x) / downsample - 0.5, float(y) / downsample - 0.5) for x, y in ring]
            ImageDraw.Draw(img).polygon(pts, fill=1)
            out ^= np.asarray(img, bool)
    return out


def _outside(h: int, w: int, tile_px: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Per tile, how many of its px lie beyond the slide's edge (partial tiles of the last row/column)."""
    in_h = np.minimum(h - np.arange(n_rows) * tile_px, tile_px)
    in_w = np.minimum(w - np.arange(n_cols) * tile_px, tile_px)
    return (tile_px**2 - in_h[:, None] * in_w[None, :]).ravel().astype(float)


def _tile_table(
    cells: pd.DataFrame,
    labels: np.ndarray,
    epi_mask_ds: np.ndarray,
    tumor_ds: np.ndarray,
    w: int,
    h: int,
    tile_px: int,
) -> pd.DataFrame:
    n_rows, n_cols = int(math.ceil(h / tile_px)), int(math.ceil(w / tile_px))
    rr, cc = np.mgrid[0:n_rows, 0:n_cols]
    tab = pd.DataFrame({"row": rr.ravel(), "col": cc.ravel()})
    tab["x"] = tab["col"] * tile_px
    tab["y"] = tab["row"] * tile_px
    tab["size"] = tile_px
    # pixels of each region per tile in one pass (block means of 5 masks were the slowest part of the truth)
    tile_of_px = (np.arange(h) // tile_px)[:, None] * n_cols + (np.arange(w) // tile_px)[None, :]
    region_px = np.bincount((tile_of_px * 5 + labels).ravel(), minlength=n_rows * n_cols * 5)
    region_px = region_px.reshape(n_rows * n_cols, 5).astype(float)
    tab["tissue_fraction"] = (
        tile_px**2 - region_px[:, BACKGROUND] - _outside(h, w, tile_px, n_rows, n_cols)
    ) / tile_px**2
    col = np.floor(cells["x"].to_numpy() / tile_px).astype(np.int64)
    row = np.floor(cells["y"].to_numpy() / tile_px).astype(np.int64)
    idx = row * n_cols + col
    n = n_rows * n_cols
    types = cells["type"].to_numpy()
    for name, sel in (
        ("t_cells", types == "T cell"),
        ("b_cells", types == "B cell"),
        ("tumor_cells", types == "tumor"),
        ("proliferating_cells", (types == "tumor") & cells["proliferating"].to_numpy()),
        ("stromal_cells", types == "stromal"),
    ):
        tab[name] = np.bincount(idx[sel], minlength=n)
    tab["lymphocytes"] = tab["t_cells"] + tab["b_cells"]
    tab["total_cells"] = np.bincount(idx, minlength=n)
    mblock = tile_px // MASK_DOWNSAMPLE
    if tile_px % MASK_DOWNSAMPLE == 0:  # exact: the fraction a reader of the written mask gets
        tab["epithelium_fraction"] = _block_mean(epi_mask_ds, mblock, n_rows, n_cols).ravel()
    else:
        tab["epithelium_fraction"] = region_px[:, EPITHELIUM] / tile_px**2
    tab["tumor_fraction"] = _block_mean(tumor_ds, tile_px // 2, n_rows, n_cols).ravel()
    tab["stroma_fraction"] = region_px[:, STROMA] / tile_px**2
    tab["fat_fraction"] = region_px[:, FAT] / tile_px**2
    tab["follicle_fraction"] = region_px[:, FOLLICLE] / tile_px**2
    for c in (
        "tissue_fraction",
        "epithelium_fraction",
        "tumor_fraction",
        "stroma_fraction",
        "fat_fraction",
        "follicle_fraction",
    ):
        tab[c] = tab[c].astype(float).round(5)
    return tab


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


def write_celltype_targets(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the cell-type-resolved targets of the cohort in ``out_dir`` (from its ``cell_abundance.tsv``).

    Files: ``celltype_expression/<cell type>.tsv`` (samples x genes), ``celltype_abundance.tsv`` (samples x
    cell types) and ``responders.tsv`` (sample_id, patient_id, responder 0/1). Works on cohorts made before
    these files existed.
    """
    out = Path(out_dir)
    abundance = pd.read_csv(out / "cell_abundance.tsv", sep="\t", index_col=0)
    abundance.index = abundance.index.astype(str)
    samples = pd.read_csv(out / "samples.tsv", sep="\t", dtype={"sample_id": str, "patient_id": str})
    pid = samples.set_index("sample_id").loc[abundance.index, "patient_id"].tolist()
    tables, frac, responder = celltype_targets(abundance, seed, pid)
    (out / "celltype_expression").mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    for ct, tab in tables.items():
        paths[ct] = out / "celltype_expression" / f"{ct}.tsv"
        _write_atomic_text(paths[ct], tab.to_csv(sep="\t", lineterminator="\n"))
    paths["celltype_abundance"] = out / "celltype_abundance.tsv"
    _write_atomic_text(paths["celltype_abundance"], frac.round(6).to_csv(sep="\t", lineterminator="\n"))
    resp = pd.DataFrame({"sample_id": responder.index, "patient_id": pid, "responder": responder.to_numpy()})
    paths["responders"] = out / "responders.tsv"
    _write_df(paths["responders"], resp, "\t")
    return paths


# --- writers -----------------------------------------------------------------------------------------------


def _atomic_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file should have the usual permissions
    return Path(tmp)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = _atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_df(path: Path, df: pd.DataFrame, sep: str, index: bool = False) -> None:
    _write_atomic_text(path, df.to_csv(sep=sep, index=index, lineterminator="\n"))


def _downsample2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return (
        img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    )


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float = MPP,
    description: str = "",
    min_level_px: int = 512,
    quality: int = JPEG_QUALITY,
) -> Path:
    """Write (h, w, 3) uint8 as a generic tiled pyramidal TIFF with JPEG tiles, atomically.

    Levels are halved until the longer side is <= ``min_level_px``; each level is a top-level page
    (``subfiletype=1`` for reduced ones, which is what OpenSlide's generic-tiff reader wants), with resolution
    tags in centimetres so that OpenSlide reports ``openslide.mpp-x`` = ``mpp`` for level 0.
    """
    import tifffile

    path = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > min_level_px:
        levels.append(_downsample2(levels[-1]))
    tmp = _atomic_path(path)
    try:
        with tifffile.TiffWriter(tmp) as tif:
            for i, level in enumerate(levels):
                ds = rgb.shape[1] / level.shape[1]
                res = 10000.0 / (mpp * ds)  # px per cm
                tif.write(
                    level,
                    tile=(TIFF_TILE, TIFF_TILE),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    photometric="rgb",
                    subfiletype=0 if i == 0 else 1,
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    description=description if i == 0 else None,
                    metadata=None,
                    software="napari-he2rna",
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _qupath_table(
    cells: pd.DataFrame,
    positive: str,
    image_name: str,
    mpp: float,
    tumor_ds: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """A QuPath detection measurement export (0.4 style, ``Class`` column) for one IHC marker."""
    is_pos = (cells["type"] == positive).to_numpy()
    n = len(cells)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    gi = np.clip((cells["y"].to_numpy() / 2).astype(np.int64), 0, tumor_ds.shape[0] - 1)
    gj = np.clip((cells["x"].to_numpy() / 2).astype(np.int64), 0, tumor_ds.shape[1] - 1)
    in_tumor = tumor_ds[gi, gj]
    radius = cells["radius_um"].to_numpy()
    area = np.pi * radius**2 * (np.where(cells["type"] == "stromal", 0.64, 1.0))
    dab = np.where(is_pos, rng.uniform(0.25, 0.7, n), rng.uniform(0.01, 0.09, n))
    hema = rng.uniform(0.2, 0.6, n)
    return pd.DataFrame(
        {
            "Image": image_name,
            "Object ID": ids,
            "Object type": "Detection",
            "Name": "",
            "Class": np.where(is_pos, "Positive", "Negative"),
            "Parent": np.where(in_tumor, "Tumor", "Annotation"),
            "ROI": "Polygon",
            "Centroid X µm": np.round(cells["x"].to_numpy() * mpp, 2),
            "Centroid Y µm": np.round(cells["y"].to_numpy() * mpp, 2),
            "Nucleus: Area µm^2": np.round(area, 2),
            "Nucleus: Hematoxylin OD mean": np.round(hema, 4),
            "DAB: Mean": np.round(dab, 4),
        }
    )


def _geojson(polygons: list[list[np.ndarray]], rng: np.random.Generator) -> dict:
    feats = []
    for poly in polygons:
        feats.append(
            {
                "type": "Feature",
                "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "geometry": {"type": "Polygon", "coordinates": [ring.tolist() for ring in poly]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


# --- public API --------------------------------------------------------------------------------------------


def make_slide(
    path: str | Path,
    seed: int = 0,
    size_px: tuple[int, int] = (1792, 1792),
    cancer_type: str | None = None,
    mpp: float = MPP,
    params: SlideParams | None = None,
    truth_dir: str | Path | None = None,
    write_truth: bool = True,
) -> SlideTruth:
    """Draw one synthetic H&E slide, write it as a pyramidal TIFF and its truth files next to it.

    Parameters
    ----------
    path : the ``.tiff`` to write; its stem is the slide id and prefixes the truth files.
    seed : everything (layout, cells, colours, truth) follows from it.
    size_px : level-0 (width, height) in px.
    cancer_type : one of :data:`CANCER_TYPES` (random from the seed if None); ignored with ``params``.
    mpp : µm per level-0 px (tile side is round(112 / mpp) px).
    params : the latent composition; drawn from the seed when None.
    truth_dir : where the truth files go (default: the slide's folder).
    write_truth : write the truth files (the returned :class:`SlideTruth` holds them in any case).

    Returns
    -------
    SlideTruth
    """
    path = Path(path)
    w, h = int(size_px[0]), int(size_px[1])
    if w < 64 or h < 64:
        raise DataError(f"A synthetic slide must be at least 64x64 px, not {w}x{h}.")
    rng = np.random.default_rng(seed)
    p = params if params is not None else draw_params(rng, cancer_type)
    tile_px = int(round(TILE_UM / mpp))
    lay = _layout(rng, w, h, p, mpp)
    cells = _place_cells(rng, lay, w, h, p, mpp)
    rgb = _render(rng, lay, cells, w, h, p, mpp)

    # Truth rasters: epithelium mask at MASK_DOWNSAMPLE (majority of its 8x8 block), tumour polygons at 2x.
    mh, mw = int(math.ceil(h / MASK_DOWNSAMPLE)), int(math.ceil(w / MASK_DOWNSAMPLE))
    epi_mask = _block_mean(lay.labels == EPITHELIUM, MASK_DOWNSAMPLE, mh, mw) >= 0.5
    polys = _tumor_polygons(lay.tumor_score, LAYOUT_DS, w, h)
    tumor_ds = rasterize_polygons(polys, (int(math.ceil(h / 2)), int(math.ceil(w / 2))), 2.0)
    tiles = _tile_table(cells, lay.labels, epi_mask, tumor_ds, w, h, tile_px)

    slide_id = path.stem
    desc = f"napari-he2rna synthetic H&E slide {slide_id} seed={seed} cancer_type={p.cancer_type} mpp={mpp}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid_tiff(path, rgb, mpp, description=desc)
    truth = SlideTruth(
        slide_id, path, (w, h), mpp, tile_px, p, cells, tiles, epi_mask, polys, {"slide": path}
    )
    if write_truth:
        _write_truth(truth, Path(truth_dir) if truth_dir is not None else path.parent, tumor_ds, rng)
    return truth


def truth_paths(slide_id: str, truth_dir: str | Path) -> dict[str, Path]:
    """Where the truth files of ``slide_id`` live."""
    d = Path(truth_dir)
    return {
        "tiles": d / f"{slide_id}_tiles.csv",
        "cells": d / f"{slide_id}_cells.csv",
        "CD3": d / f"{slide_id}_CD3.tsv",
        "CD20": d / f"{slide_id}_CD20.tsv",
        "epithelium_mask": d / f"{slide_id}_epithelium_mask.png",
        "epithelium_mask_json": d / f"{slide_id}_epithelium_mask.json",
        "tumor": d / f"{slide_id}_tumor.geojson",
    }


def _write_truth(truth: SlideTruth, truth_dir: Path, tumor_ds: np.ndarray, rng: np.random.Generator) -> None:
    from PIL import Image

    truth_dir.mkdir(parents=True, exist_ok=True)
    paths = truth_paths(truth.slide_id, truth_dir)
    _write_df(paths["tiles"], truth.tiles, ",")
    cells = truth.cells.copy()
    cells["x"] = cells["x"].round(3)
    cells["y"] = cells["y"].round(3)
    cells["radius_um"] = cells["radius_um"].round(2)
    cells["proliferating"] = cells["proliferating"].astype(int)
    _write_df(paths["cells"], cells, ",")
    image_name = truth.path.name
    for marker, ctype in (("CD3", "T cell"), ("CD20", "B cell")):
        _write_df(
            paths[marker], _qupath_table(truth.cells, ctype, image_name, truth.mpp, tumor_ds, rng), "\t"
        )
    tmp = _atomic_path(paths["epithelium_mask"])
    try:
        Image.fromarray(truth.epithelium_mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, paths["epithelium_mask"])
    finally:
        tmp.unlink(missing_ok=True)
    side = {
        "slide": image_name,
        "downsample": MASK_DOWNSAMPLE,
        "mpp": truth.mpp * MASK_DOWNSAMPLE,
        "slide_dimensions": list(truth.dimensions),
        "positive_value": 255,
        "meaning": "epithelium (tumour nests); pixel (i, j) covers level-0 px [8j, 8j+8) x [8i, 8i+8)",
    }
    _write_atomic_text(paths["epithelium_mask_json"], json.dumps(side, indent=1))
    _write_atomic_text(paths["tumor"], json.dumps(_geojson(truth.tumor_polygons, rng)))
    truth.files.update(paths)


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 30,
    seed: int = 0,
    size_px: tuple[int, int] = (1792, 1792),
    cancer_types: Sequence[str] | None = None,
    second_slide_fraction: float = 0.2,
    names: Sequence[str] | None = None,
    mpp: float = MPP,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    n_controls: int = len(HOUSEKEEPING),
) -> CohortInfo:
    """Generate a cohort of synthetic slides with truth, sample sheet and expression table in ``out_dir``.

    Patients get one slide, or two (a fraction ``second_slide_fraction`` of patients) that share the
    patient's cancer type and lymphocyte levels (x LogNormal(0, 0.15) each). Cancer types cycle through
    ``cancer_types`` (default all three). The MSI-like label is drawn once per patient, from the mean
    T- and B-cell densities of the patient's slides: every slide of a patient carries the same label.

    Parameters
    ----------
    out_dir : folder to write into (created).
    n_slides : number of slides (>= 1).  seed : everything follows from it.
    size_px : level-0 (width, height) of every slide, px.  mpp : µm per level-0 px.
    cancer_types : the types to cycle through.  names : sample ids (one per slide; default SYN-0000, ...).
    second_slide_fraction : probability that a patient gets a second slide.
    n_controls : noise-only control genes in ``expression.tsv`` (:func:`control_genes`: 20 = the
        :data:`HOUSEKEEPING` genes; more adds ``CTRL0001``, ...).

    Files: ``<id>.tiff`` and its truth files (see :func:`make_slide`), ``samples.tsv``, ``expression.tsv``,
    ``cell_abundance.tsv`` and the SLIDE-EX targets (:func:`write_celltype_targets`). Deterministic from
    ``seed``.
    """
    out = Path(out_dir)
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise DataError(f"A cohort needs a whole number of slides >= 1, not {n_slides!r}.")
    if names is not None and len(names) != n_slides:
        raise DataError(f"{len(names)} names were given for {n_slides} slides.")
    if not 0.0 <= second_slide_fraction <= 1.0:
        raise DataError(f"second_slide_fraction must lie in [0, 1], not {second_slide_fraction!r}.")
    controls = control_genes(n_controls)
    types = list(cancer_types) if cancer_types else list(CANCER_TYPES)
    for t in types:
        if t not in CANCER_PROFILES:
            raise DataError(f"Unknown synthetic cancer type {t!r}; choose among {', '.join(CANCER_TYPES)}.")
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    plan_rng, expr_rng, label_rng = (np.random.default_rng(s) for s in root.spawn(3))
    slide_seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence([seed, 1]).spawn(n_slides)]

    # Patients and their latent parameters.
    plan: list[tuple[str, SlideParams]] = []
    pi = 0
    while len(plan) < n_slides:
        ctype = types[pi % len(types)]
        base = draw_params(plan_rng, ctype)
        pid = f"SYN-P{pi:04d}"
        plan.append((pid, base))
        if len(plan) < n_slides and plan_rng.random() < second_slide_fraction:
            twin = draw_params(plan_rng, ctype)  # another block: same patient's cancer and immune levels
            for key in IMMUNE_PRIOR:
                setattr(twin, key, getattr(base, key) * float(plan_rng.lognormal(0, 0.15)))
            plan.append((pid, twin))
        pi += 1

    rows, expr, abund, truths = [], [], [], []
    patient_signals: dict[str, list[dict[str, float]]] = {}
    for i, (pid, params) in enumerate(plan):
        check_cancel(cancel)
        sid = names[i] if names is not None else f"SYN-{i:04d}"
        truth = make_slide(out / f"{sid}.tiff", slide_seeds[i], size_px, mpp=mpp, params=params)
        sig = truth.signals()
        patient_signals.setdefault(pid, []).append(sig)
        expr.append({"sample_id": sid, **expression_from_signals(sig, expr_rng, controls)})
        rows.append(
            {
                "sample_id": sid,
                "patient_id": pid,
                "cancer_type": params.cancer_type,
                "slide": f"{sid}.tiff",
                "msi_status": "",
                "seed": slide_seeds[i],
            }
        )
        counts = truth.cells["type"].value_counts()
        total = max(len(truth.cells), 1)
        abund.append(
            {
                "sample_id": sid,
                **{k: round(v, 6) for k, v in sig.items()},
                **{f"{t.replace(' ', '_')}_fraction": round(counts.get(t, 0) / total, 6) for t in CELL_TYPES},
            }
        )
        truth.cells = truth.cells.iloc[:0]  # keep the cohort object light; the tables are on disk
        truths.append(truth)
        report(progress, i + 1, n_slides, sid)
    # Patient-level label: one draw per patient (in patient order) from the mean signals of its slides.
    status = {}
    for pid, sigs in patient_signals.items():
        mean_sig = {k: float(np.mean([s[k] for s in sigs])) for k in ("t_density", "b_density")}
        status[pid] = "MSI-H" if label_rng.random() < msi_probability(mean_sig) else "MSS"
    for row in rows:
        row["msi_status"] = status[row["patient_id"]]
    samples = pd.DataFrame(rows)
    expression = pd.DataFrame(expr).set_index("sample_id")
    abundance = pd.DataFrame(abund).set_index("sample_id")
    _write_df(out / "samples.tsv", samples, "\t")
    _write_atomic_text(out / "expression.tsv", expression.round(5).to_csv(sep="\t", lineterminator="\n"))
    _write_atomic_text(out / "cell_abundance.tsv", abundance.to_csv(sep="\t", lineterminator="\n"))
    write_celltype_targets(out, seed)
    info = load_cohort(out)
    return CohortInfo(
        out,
        samples,
        expression,
        abundance,
        truths,
        info.celltype_expression,
        info.celltype_abundance,
        info.responders,
    )


# --- loaders -----------------------------------------------------------------------------------------------


def load_tile_truth(path: str | Path) -> pd.DataFrame:
    """Read a ``<id>_tiles.csv`` truth table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Tile truth table {path} does not exist.")
    tab = pd.read_csv(path)
    missing = {"row", "col", "x", "y", "size", "tissue_fraction"} - set(tab.columns)
    if missing:
        raise DataError(
            f"{path.name} is not a tile truth table (missing columns: {', '.join(sorted(missing))})."
        )
    return tab


def load_cells(path: str | Path) -> pd.DataFrame:
    """Read a ``<id>_cells.csv`` table (x, y level-0 px, type, proliferating, radius_um)."""
    tab = pd.read_csv(path)
    tab["proliferating"] = tab["proliferating"].astype(bool)
    return tab


def load_cohort(out_dir: str | Path) -> CohortInfo:
    """Read a cohort written by :func:`make_cohort` (sample sheet, expression, abundances)."""
    out = Path(out_dir)
    sheet = out / "samples.tsv"
    if not sheet.is_file():
        raise DataError(f"{out} holds no samples.tsv; generate a cohort with `he2rna make-sample {out}`.")
    samples = pd.read_csv(sheet, sep="\t", dtype={"sample_id": str, "patient_id": str})
    expression = pd.read_csv(out / "expression.tsv", sep="\t", index_col=0)
    ab_path = out / "cell_abundance.tsv"
    abundance = pd.read_csv(ab_path, sep="\t", index_col=0) if ab_path.is_file() else pd.DataFrame()
    ct_expr = {
        p.stem: pd.read_csv(p, sep="\t", index_col=0)
        for p in sorted((out / "celltype_expression").glob("*.tsv"))
    }
    ct_path, resp_path = out / "celltype_abundance.tsv", out / "responders.tsv"
    ct_abund = pd.read_csv(ct_path, sep="\t", index_col=0) if ct_path.is_file() else pd.DataFrame()
    responders = (
        pd.read_csv(resp_path, sep="\t", dtype={"sample_id": str}).set_index("sample_id")["responder"]
        if resp_path.is_file()
        else pd.Series(dtype=int, name="responder")
    )
    return CohortInfo(out, samples, expression, abundance, [], ct_expr, ct_abund, responders)
