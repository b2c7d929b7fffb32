"""How well does a heatmap match the truth? Tile-level metrics of the HE2RNA paper's validation.

Per tile, a model score (a gene or gene set) is set against a truth value from
:mod:`napari_he2rna.validation.truth`: a
cell count (CD3+ cells counted by QuPath), a mask fraction (epithelium) or an annotation label (tumour). The
metrics are those of the paper's figures 4-5 and tables 1-3:

- Pearson R with its two-tailed p-value, and Spearman rho, between score and truth;
- ROC-AUC of the score for "tiles whose count exceeds the 75th/90th/95th/99th percentile" (and any threshold
  the user gives), with the ROC curves for plotting;
- the median truth in the top-N scored tiles against all tiles;
- for annotations, the tumour-vs-non-tumour AUC and the share of the top-N tiles that fall in tumour.

Undefined numbers are NaN with a reason (constant scores, a single class), never a crash or a silent 0.5.

.. caution::
   Neighbouring tiles are correlated, so tile-level p-values (which assume independent tiles) are optimistic.
   :func:`spatial_null_p` gives a spatially aware alternative from circular shifts of the score map.

Everything is vectorised NumPy/SciPy/scikit-learn: a full :func:`tile_metrics` at 30,000 tiles takes a few
tens of milliseconds, so a widget can recompute it whenever the gene or the truth changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from ..maps.exports import TILE_CSV_COLUMNS
from ..slides.tiling import TileGrid

DEFAULT_PERCENTILES = (75, 90, 95, 99)

#: Shown with every tile-level p-value.
P_VALUE_CAVEAT = (
    "tile-level p-values treat neighbouring tiles as independent and are optimistic; "
    "see the spatial null (circular shifts of the score map)"
)


@dataclass
class TileMetrics:
    """Tile-level agreement between one score column and one truth.

    Attributes
    ----------
    n_tiles
        Tiles with both a finite score and a finite truth (the others are left out).
    pearson_r, pearson_p, spearman_rho, spearman_p
        Correlations and their two-tailed p-values (see :data:`P_VALUE_CAVEAT`); NaN when undefined.
    correlation_note
        Why the correlations are NaN ("" when they are defined).
    auc
        Label (``"p75"``, ``"p90"``, ..., ``">5"`` for a user threshold) -> ROC-AUC or NaN.
    auc_threshold
        Label -> the truth value a tile must exceed to count as positive.
    auc_n_positive
        Label -> number of positive tiles.
    auc_note
        Label -> why the AUC is NaN ("" when defined).
    roc
        Label -> (fpr, tpr) arrays for plotting (absent when the AUC is NaN).
    top_n, median_truth_top_n, median_truth_all
        The median truth in the ``top_n`` best-scored tiles and in all tiles.
    """

    n_tiles: int
    pearson_r: float = math.nan
    pearson_p: float = math.nan
    spearman_rho: float = math.nan
    spearman_p: float = math.nan
    correlation_note: str = ""
    auc: dict[str, float] = field(default_factory=dict)
    auc_threshold: dict[str, float] = field(default_factory=dict)
    auc_n_positive: dict[str, int] = field(default_factory=dict)
    auc_note: dict[str, str] = field(default_factory=dict)
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    top_n: int = 0
    median_truth_top_n: float = math.nan
    median_truth_all: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """One flat row (for a per-slide table): ``pearson_r``, ``auc_p75``, ``median_truth_top_n``..."""
        row: dict[str, Any] = {
            "n_tiles": self.n_tiles,
            "pearson_r": self.pearson_r,
            "pearson_p": self.pearson_p,
            "spearman_rho": self.spearman_rho,
            "spearman_p": self.spearman_p,
        }
        for label, value in self.auc.items():
            row[f"auc_{label}"] = value
        row["top_n"] = self.top_n
        row["median_truth_top_n"] = self.median_truth_top_n
        row["median_truth_all"] = self.median_truth_all
        notes = [self.correlation_note] + [f"AUC {k}: {v}" for k, v in self.auc_note.items() if v]
        row["note"] = "; ".join(n for n in notes if n)
        return row

    def table(self) -> pd.DataFrame:
        """Long metrics table: ``metric, subset, value, threshold, n_positive, note`` (one row per number)."""
        rows = [
            ("n_tiles", "", self.n_tiles, math.nan, -1, ""),
            ("pearson_r", "", self.pearson_r, math.nan, -1, self.correlation_note),
            ("pearson_p", "", self.pearson_p, math.nan, -1, self.correlation_note or P_VALUE_CAVEAT),
            ("spearman_rho", "", self.spearman_rho, math.nan, -1, self.correlation_note),
            ("spearman_p", "", self.spearman_p, math.nan, -1, self.correlation_note or P_VALUE_CAVEAT),
        ]
        for label, value in self.auc.items():
            rows.append(
                (
                    "roc_auc",
                    label,
                    value,
                    self.auc_threshold.get(label, math.nan),
                    self.auc_n_positive.get(label, 0),
                    self.auc_note.get(label, ""),
                )
            )
        rows.append(("median_truth_top_n", f"top {self.top_n}", self.median_truth_top_n, math.nan, -1, ""))
        rows.append(("median_truth_all", "all", self.median_truth_all, math.nan, -1, ""))
        out = pd.DataFrame(rows, columns=["metric", "subset", "value", "threshold", "n_positive", "note"])
        out["n_positive"] = out["n_positive"].astype("Int64").where(out["n_positive"] >= 0)
        return out


@dataclass
class AnnotationMetrics:
    """Score against an annotation label (1 = e.g. tumour, 0 = not; NaN left out).

    Attributes
    ----------
    n_tiles, n_positive, n_negative
        Labelled tiles, and how many are inside / outside.
    auc, auc_note
        Tumour-vs-non-tumour ROC-AUC of the score, or NaN and why.
    roc
        (fpr, tpr) or ``None``.
    top_n, top_n_share_positive
        Share of the ``top_n`` best-scored labelled tiles that are inside (paper: 94 % of the top 10,000).
    positive_rate
        Share of all labelled tiles that are inside: what ``top_n_share_positive`` is worth by chance.
    """

    n_tiles: int
    n_positive: int
    n_negative: int
    auc: float = math.nan
    auc_note: str = ""
    roc: tuple[np.ndarray, np.ndarray] | None = None
    top_n: int = 0
    top_n_share_positive: float = math.nan
    positive_rate: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_tiles": self.n_tiles,
            "n_inside": self.n_positive,
            "n_outside": self.n_negative,
            "annotation_auc": self.auc,
            "top_n": self.top_n,
            "top_n_share_inside": self.top_n_share_positive,
            "share_inside_all": self.positive_rate,
            "note": self.auc_note,
        }

    def table(self) -> pd.DataFrame:
        rows = [
            ("annotation_auc", "inside vs outside", self.auc, self.n_positive, self.auc_note),
            ("top_n_share_inside", f"top {self.top_n}", self.top_n_share_positive, self.n_positive, ""),
            ("share_inside_all", "all", self.positive_rate, self.n_positive, ""),
        ]
        out = pd.DataFrame(rows, columns=["metric", "subset", "value", "n_positive", "note"])
        out.insert(3, "threshold", math.nan)
        out["n_positive"] = out["n_positive"].astype("Int64")
        return out


# ------------------------------------------------------------------------------------------------------------
# Helpers


def _finite_pair(scores: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    if s.shape != t.shape:
        raise ValueError(f"scores ({s.shape[0]}) and truth ({t.shape[0]}) must have one value per tile")
    ok = np.isfinite(s) & np.isfinite(t)
    return s[ok], t[ok]


def _constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.ptp(x) == 0)


def binary_auc(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[float, str, tuple[np.ndarray, np.ndarray] | None]:
    """ROC-AUC of ``scores`` for boolean ``labels``: (auc, note, (fpr, tpr)); NaN and a note when undefined.

    Recent scikit-learn returns NaN with a warning for a single class and older ones raise: both are
    guarded here so the reason reaches the user.
    """
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        which = "positive" if n_pos == 0 else "negative"
        return math.nan, f"undefined: no {which} tile ({n_pos} positive, {n_neg} negative)", None
    if _constant(scores):
        return math.nan, f"undefined: the scores are constant ({scores[0]:.4g} on every tile)", None
    # roc_auc_score is exactly auc(roc_curve(...)) for two classes; calling roc_curve once and integrating
    # it ourselves halves the time, which matters when a widget recomputes several cuts per keystroke.
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(area_under_curve(fpr, tpr)), "", (fpr, tpr)


def _median_top(scores: np.ndarray, truth: np.ndarray, top_n: int) -> tuple[int, float]:
    n = int(min(max(top_n, 0), scores.size))
    if n == 0:
        return 0, math.nan
    # argpartition picks the n largest scores in O(N); ties at the cut are broken arbitrarily but stably
    idx = np.argpartition(-scores, n - 1)[:n]
    return n, float(np.median(truth[idx]))


def _threshold_label(value: float) -> str:
    return f">{value:g}"


# ------------------------------------------------------------------------------------------------------------
# Metrics


def tile_metrics(
    scores: Any,
    truth: Any,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    thresholds: Sequence[float] = (),
    top_n: int = 100,
) -> TileMetrics:
    """Agreement between a tile score and a per-tile truth (count or fraction).

    Parameters
    ----------
    scores
        (N,) model score per tile (a gene or set column of the tile scores).
    truth
        (N,) truth per tile: cell count, mask fraction... Tiles where either is NaN are left out.
    percentiles
        For each p, the AUC of the score for "truth > p-th percentile of truth" (paper: 75, 90, 95, 99).
    thresholds
        Extra absolute truth thresholds (e.g. ``5`` for "more than 5 cells").
    top_n
        Median truth in this many best-scored tiles (paper: 100).

    Returns
    -------
    TileMetrics
        With NaN and a note wherever a number is undefined (constant scores or truth, one class, < 3 tiles).
    """
    s, t = _finite_pair(scores, truth)
    m = TileMetrics(n_tiles=int(s.size))
    if s.size < 3:
        m.correlation_note = f"undefined: only {s.size} tiles have both a score and a truth"
    elif _constant(s):
        m.correlation_note = f"undefined: the scores are constant ({s[0]:.4g} on every tile)"
    elif _constant(t):
        m.correlation_note = f"undefined: the truth is constant ({t[0]:.4g} on every tile)"
    else:
        r = stats.pearsonr(s, t)
        rho = stats.spearmanr(s, t)
        m.pearson_r, m.pearson_p = float(r.statistic), float(r.pvalue)
        m.spearman_rho, m.spearman_p = float(rho.statistic), float(rho.pvalue)
    cuts: list[tuple[str, float]] = []
    if t.size:
        cuts += [(f"p{p:g}", float(np.percentile(t, p))) for p in percentiles]
    else:
        cuts += [(f"p{p:g}", math.nan) for p in percentiles]
    cuts += [(_threshold_label(float(v)), float(v)) for v in thresholds]
    for label, cut in cuts:
        m.auc_threshold[label] = cut
        if not np.isfinite(cut):
            m.auc[label], m.auc_note[label], m.auc_n_positive[label] = math.nan, "undefined: no tiles", 0
            continue
        positive = t > cut
        m.auc_n_positive[label] = int(positive.sum())
        auc, note, roc = binary_auc(s, positive)
        if positive.sum() == 0:
            note = f"undefined: no tile has a truth above {cut:g} (the {label} cut)"
        m.auc[label], m.auc_note[label] = auc, note
        if roc is not None:
            m.roc[label] = roc
    m.top_n, m.median_truth_top_n = _median_top(s, t, top_n)
    if _constant(s):  # the "top" tiles of a constant map are an arbitrary pick
        m.median_truth_top_n = math.nan
    m.median_truth_all = float(np.median(t)) if t.size else math.nan
    return m


def annotation_metrics(scores: Any, labels: Any, top_n: int = 100) -> AnnotationMetrics:
    """Score against an annotation label per tile (from :func:`truth.annotation_labels`).

    Parameters
    ----------
    scores
        (N,) score per tile.
    labels
        (N,) 1/True inside (e.g. tumour), 0/False outside, NaN left out.
    top_n
        Share of the ``top_n`` best-scored labelled tiles that are inside.
    """
    s, lab = _finite_pair(scores, np.asarray(labels, dtype=np.float64))
    inside = lab > 0.5
    m = AnnotationMetrics(n_tiles=int(s.size), n_positive=int(inside.sum()), n_negative=int((~inside).sum()))
    m.auc, m.auc_note, m.roc = binary_auc(s, inside)
    n = int(min(max(top_n, 0), s.size))
    m.top_n = n
    if n:
        idx = np.argpartition(-s, n - 1)[:n]
        m.top_n_share_positive = float(inside[idx].mean())
        m.positive_rate = float(inside.mean())
    return m


def spatial_null_p(
    scores_raster: np.ndarray,
    truth_raster: np.ndarray,
    n: int | None = 999,
    *,
    min_shift: int = 2,
    min_overlap: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """Two-tailed p-value of Pearson R against circular shifts of the score map over the tile grid.

    The score raster is rolled by every (dy, dx) on the torus and R is recomputed, over the tiles where both
    maps are defined, for each shift at once with FFT cross-correlations (exact, O(HW log HW)). A shift keeps
    the map's spatial autocorrelation but breaks its link to the truth, so the shifted Rs are a null that
    respects neighbouring tiles being alike, unlike the tile-level p-value of :func:`tile_metrics`.

    Caveats: the slide's outline is not a torus, so large shifts overlap the truth on few or atypical tiles
    (shifts with less than ``min_overlap`` of the observed overlap are dropped), and very small shifts
    (``max(|dy|, |dx|) < min_shift``) are near copies of the map (dropped). With few valid shifts (a small
    grid) the p-value cannot go below ``1 / (n_shifts + 1)``. Treat it as a sanity check, not an exact test.

    Parameters
    ----------
    scores_raster, truth_raster
        (n_rows, n_cols) maps (e.g. :func:`heatmaps.heatmap_raster`), NaN off tissue.
    n
        Number of shifts drawn at random (seeded) from the valid ones; ``None`` uses them all.

    Returns
    -------
    dict
        ``r`` (observed), ``p`` (two-tailed, ``(1 + #|R_null| >= |r|) / (1 + n_shifts)``), ``n_shifts``,
        ``null`` (the shifted Rs) and ``note`` (why ``p`` is NaN, if it is).
    """
    a = np.asarray(scores_raster, dtype=np.float64)
    b = np.asarray(truth_raster, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"the score and truth rasters must be 2-D of one shape, got {a.shape} and {b.shape}")
    ma, mb = np.isfinite(a), np.isfinite(b)
    both = ma & mb
    out: dict[str, Any] = {"r": math.nan, "p": math.nan, "n_shifts": 0, "null": np.empty(0), "note": ""}
    if both.sum() < 3 or _constant(a[both]) or _constant(b[both]):
        out["note"] = "undefined: fewer than 3 tiles, or constant scores or truth"
        return out
    # Centre each map on its own valid mean: keeps the FFT sums small, so cancellation does not bite.
    a0 = np.where(ma, a - a[ma].mean(), 0.0)
    b0 = np.where(mb, b - b[mb].mean(), 0.0)
    fa, fb = np.fft.rfft2(a0), np.fft.rfft2(b0)
    fma, fmb = np.fft.rfft2(ma.astype(float)), np.fft.rfft2(mb.astype(float))
    fa2, fb2 = np.fft.rfft2(a0 * a0), np.fft.rfft2(b0 * b0)
    shape = a.shape

    def xcorr(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        # C[d] = sum_k x[k] * y[k + d] = sum over tiles of roll(x, d) * y
        return np.fft.irfft2(np.conj(fx) * fy, s=shape)

    count = np.rint(xcorr(fma, fmb))
    sa, sb = xcorr(fa, fmb), xcorr(fma, fb)
    saa, sbb = xcorr(fa2, fmb), xcorr(fma, fb2)
    sab = xcorr(fa, fb)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sab - sa * sb / count
        var_a = saa - sa * sa / count
        var_b = sbb - sb * sb / count
        r_all = cov / np.sqrt(var_a * var_b)
    r_obs = float(r_all[0, 0])
    dy = np.minimum(np.arange(shape[0]), shape[0] - np.arange(shape[0]))[:, None]
    dx = np.minimum(np.arange(shape[1]), shape[1] - np.arange(shape[1]))[None, :]
    valid = (
        (np.maximum(dy, dx) >= min_shift)
        & (count >= max(3, min_overlap * count[0, 0]))
        & np.isfinite(r_all)
        & (var_a > 1e-12 * max(var_a[0, 0], 1e-300))
        & (var_b > 1e-12 * max(var_b[0, 0], 1e-300))
    )
    null = r_all[valid]
    if n is not None and null.size > n:
        null = np.random.default_rng(seed).choice(null, size=n, replace=False)
    out.update(r=r_obs, n_shifts=int(null.size), null=null)
    if null.size == 0:
        out["note"] = "undefined: no shift of the map keeps enough tiles in common (grid too small)"
        return out
    out["p"] = float((1 + np.sum(np.abs(null) >= abs(r_obs) - 1e-12)) / (1 + null.size))
    return out


# ------------------------------------------------------------------------------------------------------------
# Tables


def compare_models(
    tile_scores: pd.DataFrame,
    columns: Sequence[str],
    truth: Any,
    **kwargs: Any,
) -> dict[str, TileMetrics]:
    """:func:`tile_metrics` of several score columns (e.g. "T cells" vs "B cells") against one truth."""
    missing = [c for c in columns if c not in tile_scores.columns]
    if missing:
        from ..errors import GeneError

        raise GeneError(
            f"no score column {', '.join(map(repr, missing))}; "
            f"the columns are: {', '.join(tile_scores.columns)}"
        )
    return {c: tile_metrics(tile_scores[c].to_numpy(), truth, **kwargs) for c in columns}


def metrics_table(
    results: Mapping[str, TileMetrics | AnnotationMetrics], truth_name: str = ""
) -> pd.DataFrame:
    """Long metrics table of several results, with ``score`` (the column name) and ``truth`` columns first."""
    parts = []
    for name, res in results.items():
        t = res.table()
        t.insert(0, "truth", truth_name)
        t.insert(0, "score", name)
        parts.append(t)
    if not parts:
        return pd.DataFrame(
            columns=["score", "truth", "metric", "subset", "value", "threshold", "n_positive", "note"]
        )
    return pd.concat(parts, ignore_index=True)


def compare_table(
    tiles: pd.DataFrame,
    scores: Mapping[str, Any] | pd.DataFrame,
    truths: Mapping[str, Any],
) -> pd.DataFrame:
    """Per-tile table for export: tile id and position, then score and truth columns.

    Parameters
    ----------
    tiles
        The grid table (``tile_id``, ``row``, ``col``, ``x``, ``y``) or the tile CSV (``x_px``, ``y_px``...).
    scores
        Column name -> (N,) scores.
    truths
        Truth name (``"CD3 count"``, ``"epithelium fraction"``, ``"tumour"``) -> (N,) values.
    """
    out = pd.DataFrame({"tile_id": tiles["tile_id"].to_numpy()})
    for c in ("row", "col", "x", "y", "x_px", "y_px", "x_um", "y_um"):
        if c in tiles.columns:
            out[c] = tiles[c].to_numpy()
    items = scores.items() if isinstance(scores, Mapping) else ((c, scores[c]) for c in scores.columns)
    for name, values in list(items) + list(truths.items()):
        values = np.asarray(values)
        if len(values) != len(out):
            raise ValueError(f"{name!r} has {len(values)} values for {len(out)} tiles")
        out[name] = values
    return out


def summarize_slides(per_slide: pd.DataFrame, group: Sequence[str] = ("score", "truth")) -> pd.DataFrame:
    """Mean, median and standard deviation of each numeric metric over slides, one row per group and stat.

    ``per_slide`` has one row per slide (and score/truth), e.g. from ``he2rna compare --manifest``; the rows
    returned have ``slide`` set to ``"mean"``, ``"median"`` and ``"sd"``.
    """
    group = [g for g in group if g in per_slide.columns]
    numeric = [
        c
        for c in per_slide.columns
        if c not in group and c != "slide" and pd.api.types.is_numeric_dtype(per_slide[c])
    ]
    rows = []
    grouped = per_slide.groupby(group, sort=False, dropna=False) if group else [((), per_slide)]
    for key, sub in grouped:
        key = key if isinstance(key, tuple) else (key,)
        for stat in ("mean", "median", "sd"):
            vals = sub[numeric].agg("std" if stat == "sd" else stat, numeric_only=True)
            row = {"slide": stat, **dict(zip(group, key, strict=True)), **vals.to_dict()}
            row["n_slides"] = int(len(sub))
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------
# Tile score files

#: Columns of a tile-scores CSV that describe the tile, not a score: the tile table's and the grid's own.
POSITION_COLUMNS = (*TILE_CSV_COLUMNS, "x", "y", "size")


def _header_facts(path: Any) -> dict[str, str]:
    """``key=value`` facts of a tile CSV: its sidecar ``<stem>.json``, or the old commented first line.

    ``exports.write_tile_scores_csv`` writes the sidecar; earlier versions wrote a ``# napari-he2rna tile
    scores ...; key=value; ...`` line above the table instead. Both are read.
    """
    import json
    from pathlib import Path

    facts: dict[str, str] = {}
    sidecar = Path(path).with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError):
            meta = None
        if isinstance(meta, dict):
            facts.update({str(k): str(v) for k, v in meta.items() if not isinstance(v, (dict, list))})
    with open(path, encoding="utf-8-sig") as fh:
        first = fh.readline()
    if not first.startswith("#"):
        return facts
    for part in first.lstrip("#").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            facts[key.strip()] = value.strip()
    return facts


def read_tile_scores(
    path: Any,
    *,
    slide_dimensions: tuple[int, int] | None = None,
    mpp: float | None = None,
) -> tuple[TileGrid, pd.DataFrame]:
    """Read a tile-scores CSV (``he2rna spatialize``) back as a grid and its score columns.

    Parameters
    ----------
    path
        CSV with ``tile_id, row, col`` and either ``x_px, y_px, size_px`` (the tile table of ``spatialize``
        and ``predict``, :data:`napari_he2rna.maps.exports.TILE_CSV_COLUMNS`) or ``x, y`` and maybe ``size``
        (earlier versions; then the tile size is the tiles' spacing), then one column per gene or set.
        Facts (``mpp``, ``slide_width`` ...) come from the sidecar ``<stem>.json`` or, in the old form, a
        first line starting with ``#`` holding ``key=value`` facts.
    slide_dimensions
        (width, height) of the slide in level-0 px (from the slide); else the header's ``slide_width`` /
        ``slide_height``, else the extent of the tiles (then truth outside the tiles cannot be checked).
    mpp
        µm per level-0 px; else the header's ``mpp``, else ``size_um / size_px``.

    Returns
    -------
    (TileGrid, pandas.DataFrame)
        The grid (:meth:`~napari_he2rna.slides.tiling.TileGrid.from_table`; its ``table`` has ``tile_id, row,
        col,
        x, y, size, tissue_fraction`` and its ``tile_um`` is the actual side) and the (N, k) score columns.
    """
    from pathlib import Path

    from ..errors import DataError

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"the tile-scores file {path} is missing or empty")
    facts = _header_facts(path)
    try:
        # the old form: skip only its header line (comment="#" would also cut a gene-set name holding "#")
        df = pd.read_csv(path, skiprows=1 if _starts_with_hash(path) else 0, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not a readable tile-scores CSV ({exc})") from None
    x_col = "x_px" if "x_px" in df.columns else "x"
    y_col = "y_px" if "y_px" in df.columns else "y"
    size_col = "size_px" if "size_px" in df.columns else "size"
    need = ["tile_id", "row", "col", x_col, y_col]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(
            f"{path.name} is not a tile-scores CSV: it lacks {', '.join(missing)} "
            "(write it with he2rna spatialize)"
        )
    scores = df[[c for c in df.columns if c not in POSITION_COLUMNS]].apply(pd.to_numeric, errors="coerce")
    if scores.shape[1] == 0:
        raise DataError(f"{path.name} has tile positions but no score column")
    tile_px: int | None = None
    if size_col in df.columns:
        tile_px = int(round(float(df[size_col].mode().iloc[0])))
    elif "tile_px" in facts:
        tile_px = int(float(facts["tile_px"]))
    if mpp is None:
        if facts.get("mpp") not in (None, "", "None"):
            mpp = float(facts["mpp"])
        elif "size_um" in df.columns and tile_px:
            mpp = float(df["size_um"].iloc[0]) / tile_px
        else:
            raise DataError(f"{path.name} does not say its µm/px: give the slide or --mpp")
    if slide_dimensions is None and "slide_width" in facts and "slide_height" in facts:
        slide_dimensions = (int(float(facts["slide_width"])), int(float(facts["slide_height"])))
    try:  # without a size column (earlier he2rna predict), the tile size is the spacing of the tiles
        grid = TileGrid.from_table(df, float(mpp), tile_px=tile_px, slide_dimensions=slide_dimensions)
    except ValueError:
        raise DataError(f"{path.name} does not give the tile size (no size_px/size column)") from None
    return grid, scores.reset_index(drop=True)


def _starts_with_hash(path: Any) -> bool:
    with open(path, encoding="utf-8-sig") as fh:
        return fh.read(1) == "#"
