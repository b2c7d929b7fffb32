"""What the viewer says about a model's genes and about one tile: units, validation R, hover text.

No Qt, no napari. A bundle's ``metadata`` carries ``output_unit`` (what its outputs are: log10(1+FPKM-UQ),
a fraction, a probability...; older bundles do not, and are gene models: :data:`spatial.SCORE_UNITS`) and
``validation_r`` (``{cancer_type: {gene: R}}``, out-of-fold). A gene is marked as *reliable* when its R
reaches the significance threshold of the bundle's evaluation (``metadata["evaluation"]["summary"]``: the
99th percentile of the null R per cancer type, when the bundle was evaluated) or else
:data:`RELIABLE_R` (a rule of thumb, not a test).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import spatial

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle

#: R from which a gene is marked reliable when the bundle has no evaluation of its own.
RELIABLE_R = 0.4
#: The "cancer type" that averages R over the bundle's cancer types.
ALL_TYPES = "all types (mean R)"
#: The mark of a reliable gene in the picker.
MARK = "★"


def output_unit(bundle: ModelBundle | None) -> str:
    """What the bundle's tile scores are in (``metadata["output_unit"]``), prefixed "predicted"."""
    unit = (getattr(bundle, "metadata", None) or {}).get("output_unit") if bundle is not None else None
    if not unit or not isinstance(unit, str):
        return spatial.SCORE_UNITS
    unit = unit.strip()
    return unit if unit.lower().startswith("predicted") else f"predicted {unit}"


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
    return {g: float(np.mean(v)) for g, v in sums.items()}


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
    """The status-bar readout of one tile: every painted name's score, then the truth value.

    ``scores`` maps a name to its (N,) tile scores (NaN: not scored yet); ``truth`` is
    ``(kind, label, (N,) values)`` from the Compare tab. ``""`` off the tiles.
    """
    if tile is None:
        return ""
    parts = [f"tile {tile_id if tile_id is not None else tile}"]
    for name, values in scores.items():
        v = float(values[tile]) if 0 <= tile < len(values) else float("nan")
        parts.append(f"{name} {_fmt(v)}" if math.isfinite(v) else f"{name} (not scored yet)")
    text = " · ".join(parts) + (f" [{units}]" if scores else "")
    if truth is not None:
        kind, label, values = truth
        if values is not None and 0 <= tile < len(values):
            text += " · truth " + truth_text(kind, label, float(values[tile]))
    return text
