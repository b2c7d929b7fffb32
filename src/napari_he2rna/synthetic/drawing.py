"""Drawing a synthetic H&E slide: smooth random fields -> tissue layout, nuclei placed in their regions,
painted as optical-density patches and coloured by a Beer-Lambert stain model (see
:mod:`napari_he2rna.synthetic`). Every draw comes from the one ``Generator`` passed in, in a fixed order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .params import (
    AGGREGATE_CORE_T,
    AGGREGATE_RIM_T,
    B_RADIUS_UM,
    BACKGROUND,
    CELL_TYPES,
    EPITHELIUM,
    FAT,
    FOLLICLE,
    LAYOUT_DS,
    LYMPHOCYTE_GRAIN,
    LYMPHOCYTE_OD,
    STROMA,
    T_RADIUS_UM,
    TUMOR_SPACING_UM,
    SlideParams,
)

# Haematoxylin / eosin optical-density vectors (the Macenko reference used to normalise NCT-CRC-HE, which
# looks like routine H&E scans), and the glass residual OD.
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)
_H_OD /= np.linalg.norm(_H_OD)
_E_OD /= np.linalg.norm(_E_OD)
_GLASS_OD = np.array([0.025, 0.025, 0.02], np.float32)

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


# --- layout ------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    labels: np.ndarray  # (h, w) uint8 region label
    tumor_score: np.ndarray  # (gh, gw) float32, > 0 inside the tumour bed (layout grid)
    t_density: np.ndarray  # (gh, gw) float32, stromal T-cell keep probability (7.5 µm grid)
    til_density: np.ndarray  # (gh, gw) float32, keep probability of T cells among tumour cells
    follicle_score: np.ndarray  # (h, w) float32, > 0 inside lymphoid aggregates, halo is (-0.25, 0]
    core_score: np.ndarray  # (gh, gw) float32, > 0 in the aggregates' B-cell cores (layout grid)
    fibres: np.ndarray  # (h, w) float32 in [0, 1]
    texture: np.ndarray  # (h, w) float32 ~ N(0,1) smooth, fine-scale
    fibre_angle: np.ndarray  # (gh, gw) local fibre direction (radians), for spindle nuclei


def _layout(rng: np.random.Generator, w: int, h: int, p: SlideParams, mpp: float) -> Layout:
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
    return Layout(
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


def _nuclei(xy: np.ndarray, ctype: str, proliferating: Any, radius_um: np.ndarray) -> pd.DataFrame:
    """One row per nucleus: level-0 (x, y) px centre, type, proliferating flag(s), radius in µm."""
    return pd.DataFrame(
        {"x": xy[:, 0], "y": xy[:, 1], "type": ctype, "proliferating": proliferating, "radius_um": radius_um}
    )


def _place_cells(
    rng: np.random.Generator, lay: Layout, w: int, h: int, p: SlideParams, mpp: float
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
    parts.append(_nuclei(pts, "tumor", prolif, np.clip(rng.lognormal(np.log(5.3), 0.13, len(pts)), 4.2, 7.0)))
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
        parts.append(_nuclei(xy, ctype, False, rng.uniform(r_lo, r_hi, len(xy))))
    # Stromal cells (fibroblasts): sparse spindles in the stroma.
    pts = _jittered_grid(rng, w, h, px(18.0), 0.4)
    fol = lay.follicle_score[pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)]
    pts = pts[(region_at(pts) == STROMA) & (fol < -0.25) & (rng.random(len(pts)) < 0.45)]
    parts.append(_nuclei(pts, "stromal", False, rng.uniform(4.0, 6.0, len(pts))))
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
    lay: Layout,
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
    rng: np.random.Generator, lay: Layout, cells: pd.DataFrame, w: int, h: int, p: SlideParams, mpp: float
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


def draw_slide(
    rng: np.random.Generator, w: int, h: int, p: SlideParams, mpp: float
) -> tuple[Layout, pd.DataFrame, np.ndarray]:
    """Draw one slide of level-0 size ``w`` x ``h`` px from ``rng``: its layout, its nuclei, its pixels.

    Returns
    -------
    (layout, cells, rgb)
        The region layout (:class:`Layout`), one row per nucleus (``x``, ``y`` level-0 px, ``type``,
        ``proliferating``, ``radius_um``) and the (h, w, 3) uint8 image. The generator is drawn from in this
        order (layout, cells, painting), so a seed always gives the same slide.
    """
    lay = _layout(rng, w, h, p, mpp)
    cells = _place_cells(rng, lay, w, h, p, mpp)
    return lay, cells, _render(rng, lay, cells, w, h, p, mpp)
