"""What the viewer says about a model's genes and about one tile: units, validation R, hover text.

No Qt, no napari. A bundle's ``metadata`` carries ``output_unit`` (what its outputs are: log10(1+FPKM-UQ),
a fraction, a probability...; older bundles do not, and are gene models: :data:`scoring.SCORE_UNITS`) and
``validation_r`` (``{cancer_type: {gene: R}}``, out-of-fold). A gene is marked as *reliable* when its R
reaches the significance threshold of the bundle's evaluation (``metadata["evaluation"]["summary"]``: the
99th percentile of the null R per cancer type, when the bundle was evaluated) or else
:data:`RELIABLE_R` (a rule of thumb, not a test). A tile's score is in that unit only through the slide's
aggregate (:func:`tile_score_units`); the maps paint its percentile within the slide (:mod:`.map_style`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import scoring

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle

#: R from which a gene is marked reliable when the bundle has no evaluation of its own.
RELIABLE_R = 0.4
#: The "cancer type" that averages R over the bundle's cancer types.
ALL_TYPES = "all types (mean R)"
#: The mark of a reliable gene in the picker.
MARK = "★"


def output_unit(bundle: ModelBundle | None) -> str:
    """What the bundle's slide-level predictions are in (``metadata["output_unit"]``), prefixed "predicted"
    (its tile scores are in it only through the slide's aggregate: :func:`tile_score_units`)."""
    unit = (getattr(bundle, "metadata", None) or {}).get("output_unit") if bundle is not None else None
    if not unit or not isinstance(unit, str):
        return scoring.SCORE_UNITS
    unit = unit.strip()
    return unit if unit.lower().startswith("predicted") else f"predicted {unit}"


def tile_score_units(unit: str) -> str:
    """What one tile's score is, for a model whose slide predictions are in ``unit`` (:func:`output_unit`):
    relative, on that scale only through the slide's aggregate (HE2RNA: the mean of its top-k tiles)."""
    plain = str(unit).strip()
    plain = plain[len("predicted ") :] if plain.lower().startswith("predicted ") else plain
    return (
        "tile score (relative: the model's output for one tile; only the slide's aggregate of its tile "
        f"scores, the slide prediction, is in {plain})"
    )


def column_units(columns: Sequence[str], unit: str) -> dict[str, str]:
    """``{column: unit}`` of a tile table's score columns: the feature distance's own, the others'
    :func:`tile_score_units` of the model's output ``unit``."""
    from ..model.ood import DISTANCE_UNITS
    from .gene_sets import is_distance_name

    tile = tile_score_units(unit)
    return {str(c): DISTANCE_UNITS if is_distance_name(str(c)) else tile for c in columns}


def percent_done(done: int, total: int) -> int:
    """The whole percentage of tiles done (the Run bar and the layer names say the same number)."""
    return int(100 * int(done) // int(total)) if total else 0


def uncertainty_unit(bundle: ModelBundle | None) -> str:
    """Units of the fold spread layer: the outputs' own unit, as a standard deviation across folds."""
    unit = output_unit(bundle)
    return "std across folds of " + unit


def cancer_types(bundle: ModelBundle | None) -> list[str]:
    """The cancer types the bundle has validation R for (:data:`ALL_TYPES` first when there are any)."""
    vr = _validation_r(bundle)
    return [ALL_TYPES, *vr] if vr else []


def _validation_r(bundle: ModelBundle | None) -> dict[str, dict[str, float]]:
    vr = (getattr(bundle, "metadata", None) or {}).get("validation_r") if bundle is not None else None
    if not isinstance(vr, Mapping):
        return {}
    return {str(k): dict(v) for k, v in vr.items() if isinstance(v, Mapping)}


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def gene_r(bundle: ModelBundle | None, cancer_type: str | None = None) -> dict[str, float]:
    """``{gene: R}`` in one cancer type (or averaged over them, :data:`ALL_TYPES` / None); genes without
    an R are left out."""
    vr = _validation_r(bundle)
    if not vr:
        return {}
    if cancer_type in vr:
        return {g: f for g, v in vr[cancer_type].items() if (f := _finite(v)) is not None}
    sums: dict[str, list[float]] = {}
    for per in vr.values():
        for g, v in per.items():
            f = _finite(v)
            if f is not None:
                sums.setdefault(g, []).append(f)
    return {g: sum(v) / len(v) for g, v in sums.items()}  # np.mean per gene: 0.1 s for 20,820 genes


def reliable_threshold(bundle: ModelBundle | None, cancer_type: str | None = None) -> tuple[float, str]:
    """(R threshold, how it was chosen): the evaluation's null 99th percentile R when the bundle has one
    for the type (the highest over types for :data:`ALL_TYPES`), else :data:`RELIABLE_R`."""
    ev = (getattr(bundle, "metadata", None) or {}).get("evaluation") if bundle is not None else None
    summary = ev.get("summary") if isinstance(ev, Mapping) else None
    nulls: dict[str, float] = {}
    if isinstance(summary, Sequence):
        for row in summary:
            if isinstance(row, Mapping) and (q := _finite(row.get("null_r_q99"))) is not None:
                nulls[str(row.get("cancer_type"))] = q
    if cancer_type in nulls:
        return nulls[cancer_type], "above the 99th percentile of R under the null (bundle evaluation)"
    if nulls and cancer_type in (None, ALL_TYPES):
        return max(nulls.values()), "above the 99th percentile of R under the null (bundle evaluation)"
    return RELIABLE_R, f"R ≥ {RELIABLE_R:g} (rule of thumb; the bundle has no significance test)"


def r_summary(bundle: ModelBundle | None, cancer_type: str | None = None) -> str:
    """The model's validation R in one sentence: the median R of its reliable (marked) genes with their
    count, and of all its genes (control genes drag that one down), or ``""`` without validation R."""
    rs = gene_r(bundle, cancer_type)
    if not rs:
        return ""
    thr, how = reliable_threshold(bundle, cancer_type)
    where = "averaged over cancer types" if cancer_type in (None, ALL_TYPES) else cancer_type
    good = [r for r in rs.values() if r >= thr]
    every = f"all {len(rs)} genes: {np.median(list(rs.values())):.2f}"
    if good:
        return (
            f"Validation R ({where}): median {np.median(good):.2f} over the {len(good)} {MARK} genes "
            f"({every})."
        )
    return f"Validation R ({where}): no gene is {MARK} ({how}); median over {every}."


def gene_label(gene: str, r: float | None, threshold: float) -> str:
    """Picker text of a gene: ``"CD3D   R 0.87 ★"`` (the mark when R reaches the threshold)."""
    if r is None:
        return gene
    mark = f" {MARK}" if r >= threshold else ""
    return f"{gene}   R {r:.2f}{mark}"


def name_from_label(label: str) -> str:
    """The gene (or set) name of a picker text made by :func:`gene_label`."""
    text = str(label).strip()
    head, sep, tail = text.partition("   R ")
    if sep and tail.replace(MARK, "").strip().lstrip("-").replace(".", "", 1).isdigit():
        return head.strip()
    return text


def picker_entries(
    bundle: ModelBundle | None,
    names: Sequence[str],
    cancer_type: str | None = None,
    sort_by_r: bool = False,
    min_r: float | None = None,
) -> list[tuple[str, str]]:
    """``(label, name)`` of the picker: names in order (or genes by R, best first, after the non-genes),
    genes with R under ``min_r`` left out (names without an R stay)."""
    rs = gene_r(bundle, cancer_type)
    thr, _ = reliable_threshold(bundle, cancer_type)
    genes = set(getattr(bundle, "genes", []) or [])
    items = []
    for n in names:
        r = rs.get(n) if n in genes else None
        if min_r is not None and r is not None and r < min_r:
            continue
        items.append((gene_label(n, r, thr), n, r))
    if sort_by_r:
        others = [t for t in items if t[2] is None]
        ranked = sorted((t for t in items if t[2] is not None), key=lambda t: -t[2])
        items = others + ranked
    return [(label, n) for label, n, _ in items]


def r_caption(bundle: ModelBundle | None, name: str, cancer_type: str | None = None) -> str:
    """``"R 0.87 ★ (all types)"`` for a gene with a validation R, else ``""`` (sets, distances)."""
    r = gene_r(bundle, cancer_type).get(name)
    if r is None:
        return ""
    thr, _ = reliable_threshold(bundle, cancer_type)
    where = "all types" if cancer_type in (None, ALL_TYPES) else cancer_type
    return f"R {r:.2f}{' ' + MARK if r >= thr else ''} ({where})"


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def truth_text(kind: str | None, label: str, value: float) -> str:
    """One tile's ground truth: a count, a mask fraction, or inside/outside an annotation."""
    if value is None or not math.isfinite(float(value)):
        return f"{label}: —"
    if kind == "annotations":
        return f"{label}: {'inside' if float(value) >= 0.5 else 'outside'}"
    if kind == "mask":
        return f"{label}: {100 * float(value):.0f}% of the tile"
    if kind == "cells":
        v = float(value)
        return f"{label}: {v:.0f}" if v == round(v) else f"{label}: {v:.2f}"
    return f"{label}: {_fmt(float(value))}"


def hover_text(
    tile: int | None,
    scores: Mapping[str, np.ndarray],
    units: str,
    truth: tuple[str | None, str, np.ndarray] | None = None,
    tile_id: Any = None,
) -> str:
    """The status-bar readout of one tile: every painted name's value, then the truth value.

    ``scores`` maps a name to its (N,) tile scores (NaN: not scored yet). A gene or set reads as what its map
    paints, the tile's percentile within the slide, with the tile score beside it
    (``"T cells 92nd percentile (tile score 3.1)"``); the feature distance as is, in ``units`` when it is
    the only name. ``truth`` is ``(kind, label, (N,) values)`` from the Compare tab. ``""`` off the tiles.
    """
    from .gene_sets import is_distance_name
    from .map_style import percentile_of

    if tile is None:
        return ""
    parts = [f"tile {tile_id if tile_id is not None else tile}"]
    for name, values in scores.items():
        v = float(values[tile]) if 0 <= tile < len(values) else float("nan")
        if not math.isfinite(v):
            parts.append(f"{name} (not scored yet)")
        elif is_distance_name(name):
            parts.append(f"{name} {_fmt(v)}")
        else:
            parts.append(f"{name} {ordinal(percentile_of(values, tile))} percentile (tile score {_fmt(v)})")
    text = " · ".join(parts)
    if units and scores and all(is_distance_name(n) for n in scores):
        text += f" [{units}]"
    if truth is not None:
        kind, label, values = truth
        if values is not None and 0 <= tile < len(values):
            text += " · truth " + truth_text(kind, label, float(values[tile]))
    return text


def ordinal(value: float) -> str:
    """``92`` -> ``"92nd"`` (rounded to a whole number)."""
    n = int(round(float(value)))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
