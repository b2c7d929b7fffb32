"""What a heatmap's number is and how it is drawn: the percentile within the slide, the fade, the legend.

**What a tile's number is.** The model's output for one tile (a *tile score*, what the tile CSV holds) is in
the training target's unit only through the slide's aggregate: the mean of the slide's top-k tile scores is
the slide-level prediction (``log10(1 + FPKM-UQ)`` for the HE2RNA genes). A single tile's score is not an
expression value (single tiles of the sample slide run from -0.16 to 7.9, and to -3000 on a real slide
outside the training data). So the maps (the viewer's layers and the PNGs) paint the tile score's
**percentile within the slide** (:func:`percentile_within`: 0 = the slide's lowest tile, 100 its highest),
and say the slide-level prediction, in its unit, beside the colour bar (:func:`legend_label`). The feature
distance to the training data is the exception: its number means something on its own (an RMS z-score with
a training threshold), so it is painted as is.

**Fade.** Low values fade to transparent so that the tissue stays visible under a map: a colour's alpha
ramps from 0 at the low end of the colour range to 1 at the fraction :func:`heatmap_fade` of it (the
setting ``HE2RNA_HEATMAP_FADE``, default 0.5: the lowest half of a slide's tiles fade out; 0 turns the fade
off). The layer's opacity (napari's layer controls) scales the whole map on top of that. Maps of a slide
outside the model's training data are drawn in grey (:func:`styled_colors` with ``grey``).

Plain NumPy: no Qt, no napari, no matplotlib (each renderer brings its colormap's colours).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

#: What the maps paint for a gene or set (the colour bar's unit).
PERCENTILE_UNITS = "percentile of this slide's tiles (100 = highest)"
#: What the fold spread layer paints.
SPREAD_UNITS = "std across folds of the tile's percentile (percentile points)"
#: Environment variable of the fade (a fraction of the colour range, 0 to 1).
FADE_ENV = "HE2RNA_HEATMAP_FADE"
#: The fade when :data:`FADE_ENV` is not set.
DEFAULT_FADE = 0.5
#: Colormaps: a gene or set, the fold spread, the feature distance.
SCORE_COLORMAP = "magma"
SPREAD_COLORMAP = "viridis"
DISTANCE_COLORMAP = "plasma"
#: How many gene names a legend lists before "… (+n more)".
MAX_LISTED_GENES = 6


def heatmap_fade() -> float:
    """The fade of the maps: ``$HE2RNA_HEATMAP_FADE`` (0 to 1), else :data:`DEFAULT_FADE`.

    The fraction of the colour range, from its low end, over which a colour goes from transparent to
    opaque; 0 draws every tile opaque (then only the layer's opacity shows the tissue through).
    """
    text = os.environ.get(FADE_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_FADE
    except ValueError:
        return DEFAULT_FADE
    return float(min(max(value, 0.0), 1.0)) if math.isfinite(value) else DEFAULT_FADE


def percentile_within(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """(N,) float32 percentile of each value among the finite ones: 0 the lowest, 100 the highest.

    ``100 * (rank - 1) / (n - 1)`` with the average rank of ties (a constant map is 50 everywhere, one
    finite value is 50); NaN stays NaN.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.full(v.shape, np.nan, dtype=np.float32)
    finite = np.isfinite(v)
    n = int(finite.sum())
    if n == 0:
        return out
    if n == 1:
        out[finite] = 50.0
        return out
    x = v[finite]
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]  # where each run of equal values starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends - 1) / 2.0  # 0-based average rank of each run
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    out[finite] = (100.0 * ranks / (n - 1)).astype(np.float32)
    return out


def percentile_of(values: np.ndarray | Sequence[float], i: int) -> float:
    """The percentile of ``values[i]`` among the finite values (as :func:`percentile_within`), in O(N)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    x = float(v[i])
    if not math.isfinite(x):
        return math.nan
    finite = v[np.isfinite(v)]
    n = finite.size
    if n == 1:
        return 50.0
    rank = float((finite < x).sum()) + (float((finite == x).sum()) + 1.0) / 2.0
    return 100.0 * (rank - 1.0) / (n - 1)


def fade_alpha(n: int, fade: float) -> np.ndarray:
    """(n,) alpha of a colormap's ``n`` colours (low to high) for a fade (see :func:`heatmap_fade`)."""
    t = np.linspace(0.0, 1.0, int(n))
    if fade <= 0:
        return np.ones_like(t)
    return np.clip(t / float(fade), 0.0, 1.0)


def styled_colors(rgba: np.ndarray, fade: float, grey: bool = False, band: float | None = None) -> np.ndarray:
    """A colormap's (n, 4) RGBA colours (0-1, low to high) with the fade, optionally in grey, with a mark.

    Parameters
    ----------
    rgba
        The base colormap's colours.
    fade
        See :func:`heatmap_fade`.
    grey
        Desaturate (luminance): the map of a slide outside the model's training data.
    band
        Where (0-1 of the colour range) to draw a white opaque band, e.g. the feature distance's training
        threshold: it marks the colour bar and the map alike.
    """
    out = np.array(rgba, dtype=np.float64, copy=True)
    if grey:
        lum = out[:, :3] @ np.array([0.2126, 0.7152, 0.0722])
        out[:, :3] = lum[:, None]
    out[:, 3] = out[:, 3] * fade_alpha(len(out), fade)
    if band is not None and 0.0 <= band <= 1.0:
        n = len(out)
        at = int(round(band * (n - 1)))
        half = max(n // 128, 1)
        out[max(at - half, 0) : min(at + half + 1, n)] = (1.0, 1.0, 1.0, 1.0)
    return out


def colormap_name(base: str, fade: float, grey: bool = False, band: float | None = None) -> str:
    """The short name of a styled colormap (``"magma fade"``, ``"magma fade grey"``, ``"plasma fade 0.77"``):
    viewers list every colormap by name, and a long one widens their layer controls."""
    name = f"{base} fade" if fade > 0 else base
    if grey:
        name += " grey"
    if band is not None:
        name += f" {band:.2f}"
    return name


def listed_genes(genes: Sequence[str], limit: int = MAX_LISTED_GENES) -> str:
    """``"CD3D, CD3E, CD3G"`` (at most ``limit`` names, then ``"… (+n more)"``)."""
    genes = list(genes)
    text = ", ".join(genes[:limit])
    return text + (f", … (+{len(genes) - limit} more)" if len(genes) > limit else "")


def number(value: float) -> str:
    """A value as people read it: 3 significant digits, whole numbers from 1000 (``-1162``, not 1.16e+03)."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def plain_unit(unit: str | None) -> str:
    """A unit without the word "predicted" (``"predicted log10(1+FPKM-UQ)"`` -> ``"log10(1+FPKM-UQ)"``)."""
    text = str(unit or "").strip()
    return text[len("predicted ") :] if text.lower().startswith("predicted ") else text


def legend_label(
    name: str,
    units: str,
    *,
    members: Sequence[str] | None = None,
    prediction: float | None = None,
    prediction_units: str | None = None,
    prediction_note: str = "",
    threshold: float | None = None,
    outside: bool = False,
    model: str | None = None,
) -> str:
    """The colour bar's label, one fact a line: name (a set: the mean of its listed genes), unit, the
    slide-level prediction in its unit (or the training threshold), and the warning when outside.

    ``model`` is which model made the map (``ModelBundle.model_of``), said after the name unless it is
    HE2RNA's alone: ``"CD3D (linear baseline)"``."""
    lines = []
    if outside:
        lines.append("NOT A PREDICTION (outside training data)")
    lines.append(f"{name} ({model})" if model and model != "HE2RNA" else name)
    if members:
        lines.append(f"mean of {listed_genes(members)}")
    lines.append(units)
    if prediction is not None and math.isfinite(prediction):
        unit = f" {plain_unit(prediction_units)}" if prediction_units else ""
        lines.append(f"slide prediction {number(prediction)}{unit}{prediction_note}")
    if threshold is not None and math.isfinite(threshold):
        lines.append(f"tile threshold of the training data {threshold:.3g} (white mark)")
    return "\n".join(lines)
