"""What a slide's map of one name shows: its values, raster, placement, colours and legend (no Qt).

:func:`map_view` is what the viewer paints (:mod:`napari_he2rna.napari._heatmap_layers`) and
:func:`png_options` what the heatmap PNGs say (:func:`napari_he2rna.maps.exports.render_png`), so both show
the same numbers under the same legend: a gene or set as the percentile of its tile scores within the slide
with the slide-level prediction in the target's unit beside it, the feature distance as is with its
training threshold marked, the fold spread in percentile points (see :mod:`.map_style`). During a
progressive run the tiles not extracted yet show their nearest extracted tile's value
(:func:`.progressive.nearest_fill`).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..model import ood
from ..model.mixed import model_of_genes
from . import heatmaps, map_style, progressive, readout
from .gene_sets import PartialGeneSetWarning, is_distance_name

if TYPE_CHECKING:
    from ..slides.slide import Slide
    from ..slides.tiling import TileGrid
    from .session import SlideSession


@dataclass
class MapView:
    """One name's map as displayed (``kind`` ``"heatmap"`` or ``"uncertainty"``, the fold spread)."""

    name: str
    kind: str
    raster: np.ndarray  # (n_rows*f, n_cols*f) float32, heatmaps.display_raster
    limits: tuple[float, float]
    scale: tuple[float, float]
    translate: tuple[float, float]
    units: str  # of the painted values
    legend: str  # the colour bar's label (map_style.legend_label)
    colormap: str  # the base colormap
    outside: bool  # the slide (or this name's prediction) is outside the training data: grey
    band: float | None = None  # where the colour range marks the training threshold (0-1)


#: The last few grids' tissue covers: ``id(grid) -> (weak reference to the grid, cover)``.
_COVERS: dict[int, tuple[weakref.ref, np.ndarray]] = {}
_COVERS_KEPT = 4
_COVERS_LOCK = threading.Lock()  # the viewer's run worker and the GUI thread both ask


def tissue_cover(slide: Slide, grid: TileGrid) -> np.ndarray:
    """The tissue pixels of a slide's maps (:func:`heatmaps.tissue_cover` at :func:`heatmaps.display_factor`)
    from the tissue mask the tiles were cut from (:func:`napari_he2rna.slides.tiling.tissue_mask`).

    Kept for the last few grids (a thumbnail read and its mask: the PNGs of one run share one).
    """
    from ..slides.tiling import mask_size_for, tissue_mask

    with _COVERS_LOCK:
        hit = _COVERS.get(id(grid))
    if hit is not None and hit[0]() is grid:
        return hit[1]
    dims = tuple(int(v) for v in grid.slide_dimensions)
    mask = tissue_mask(slide.thumbnail(mask_size_for(dims, int(grid.tile_px))))
    cover = heatmaps.tissue_cover(grid, mask, heatmaps.display_factor(grid))
    with _COVERS_LOCK:
        while len(_COVERS) >= _COVERS_KEPT:
            _COVERS.pop(next(iter(_COVERS)))
        _COVERS[id(grid)] = (weakref.ref(grid), cover)
    return cover


def distance_limits(session: SlideSession) -> tuple[float, float]:
    """Colour limits of the feature distance: from 0 to past the training threshold (its mark inside the
    colour bar) or to the slide's robust maximum when higher."""
    lo, hi = session.contrast_limits(ood.DISTANCE_COLUMN)
    thr = distance_threshold(session)
    return float(lo), float(max(hi, 1.25 * thr)) if thr is not None else float(hi)


def _genes_of(session: SlideSession, name: str) -> tuple[str, list[str]]:
    """(canonical name, model genes) of a gene or set, quietly: a partial set was reported when painted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialGeneSetWarning)
        canonical, genes = next(iter(session.resolve(name).items()))
    return canonical, list(genes)


def members(session: SlideSession, name: str) -> list[str] | None:
    """A gene set's genes (as scored), None for a gene or the distance."""
    if is_distance_name(name):
        return None
    canonical, genes = _genes_of(session, name)
    bundle = session.bundle
    return None if canonical in (getattr(bundle, "genes", None) or []) else list(genes)


def shown_values(session: SlideSession, name: str, kind: str = "heatmap") -> np.ndarray:
    """(N,) what the map of ``name`` paints on each tile (NaN where not scored yet): the tile score's
    percentile within the slide, the feature distance as is, or (``kind="uncertainty"``) the standard
    deviation across the fold models of the tile's percentile."""
    if kind == "uncertainty":
        folds = session.fold_scores(name)
        ranks = np.stack([map_style.percentile_within(v) for v in folds])
        return ranks.std(axis=0).astype(np.float32)
    values = session.scores(name)
    if is_distance_name(name):
        return np.asarray(values, dtype=np.float32)
    return map_style.percentile_within(values)


def _filled(session: SlideSession, grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """During a progressive run: the tiles not extracted yet take their nearest extracted tile's value."""
    if session.ready:
        return values
    live = session.live
    known = live.done.copy() if live is not None else np.isfinite(values)
    return progressive.nearest_fill(grid, values, known & np.isfinite(values))


def prediction_of(session: SlideSession, name: str) -> tuple[float | None, str]:
    """(slide-level prediction, note) of a gene or set after a run; the note says when a gene of it is
    outside the training targets' range. ``(None, "")`` during a run and for the distance."""
    if is_distance_name(name) or not session.ready:
        return None, ""
    canonical, genes = _genes_of(session, name)
    value = float(session.slide_predictions([canonical]).iloc[0])
    a = session.cached_assessment
    beyond = [g for g in genes if a is not None and g in a.out_of_range]
    return value, " (out of training range)" if beyond else ""


def is_outside(session: SlideSession, name: str) -> bool:
    """Whether the map of ``name`` is not a prediction: the slide's features are outside the training data,
    or a gene of the name has its slide prediction outside the training targets' range."""
    a = session.cached_assessment
    if a is None:
        return False
    if a.features_outside:
        return True
    if is_distance_name(name) or not a.out_of_range:
        return False
    return any(g in a.out_of_range for g in _genes_of(session, name)[1])


def distance_threshold(session: SlideSession) -> float | None:
    """The feature reference's tile threshold (None without a reference)."""
    ref = ood.bundle_reference(session.bundle) if session.bundle is not None else None
    try:
        value = float(ref["tile_threshold"]) if ref else math.nan
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def model_of(session: SlideSession, name: str) -> str | None:
    """Which model made the map of a gene or set (:func:`napari_he2rna.model.mixed.model_of_genes`: HE2RNA,
    the linear baseline or both); None for the feature distance."""
    if is_distance_name(name):
        return None
    return model_of_genes(session.bundle, _genes_of(session, name)[1])


def legend(session: SlideSession, name: str, kind: str = "heatmap", outside: bool = False) -> str:
    """The colour bar's label of a map (see :func:`.map_style.legend_label`)."""
    canonical = session.canonical(name)
    model = model_of(session, canonical)
    if kind == "uncertainty":
        return map_style.legend_label(
            f"{canonical} fold spread",
            map_style.SPREAD_UNITS,
            members=members(session, canonical),
            model=model,
        )
    if is_distance_name(canonical):
        return map_style.legend_label(canonical, ood.DISTANCE_UNITS, threshold=distance_threshold(session))
    prediction, note = prediction_of(session, canonical)
    return map_style.legend_label(
        canonical,
        map_style.PERCENTILE_UNITS,
        members=members(session, canonical),
        prediction=prediction,
        prediction_units=readout.output_unit(session.bundle),
        prediction_note=note,
        outside=outside,
        model=model,
    )


def map_view(
    session: SlideSession, name: str, kind: str = "heatmap", cover: np.ndarray | None = None
) -> MapView:
    """The map of ``name`` on the session's slide as displayed (``cover``: :func:`tissue_cover`)."""
    canonical = session.canonical(name)
    grid = session.current_grid()
    values = _filled(session, grid, shown_values(session, canonical, kind))
    f = heatmaps.display_factor(grid)
    raster = heatmaps.display_raster(grid, values, f, cover)
    scale, translate = heatmaps.display_transform(grid, f)
    distance = kind == "heatmap" and is_distance_name(canonical)
    band = None
    if kind == "uncertainty":
        hi = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        limits, units, cmap = (0.0, max(hi, 1e-6)), map_style.SPREAD_UNITS, map_style.SPREAD_COLORMAP
    elif distance:
        limits, units = distance_limits(session), ood.DISTANCE_UNITS
        cmap = map_style.DISTANCE_COLORMAP
        thr = distance_threshold(session)
        if thr is not None and limits[1] > limits[0]:
            band = (thr - limits[0]) / (limits[1] - limits[0])
    else:
        limits, units, cmap = (0.0, 100.0), map_style.PERCENTILE_UNITS, map_style.SCORE_COLORMAP
    outside = kind == "heatmap" and not distance and is_outside(session, canonical)
    return MapView(
        name=canonical,
        kind=kind,
        raster=raster,
        limits=(float(limits[0]), float(limits[1])),
        scale=scale,
        translate=translate,
        units=units,
        legend=legend(session, canonical, kind, outside),
        colormap=cmap,
        outside=outside,
        band=band,
    )


def png_options(session: SlideSession, name: str) -> dict[str, Any]:
    """The keywords of :func:`heatmaps.render_heatmap_png` for the map of ``name`` (warning, units, colour
    limits and map, gene-set members, slide prediction, training threshold), as the viewer shows it."""
    canonical = session.canonical(name)
    warning = session.warning()  # computes the assessment the first time
    _, grid, _ = session.require_ready()
    try:
        cover = tissue_cover(session.slide, grid)
    except Exception:  # noqa: BLE001 - a slide whose thumbnail fails is still drawn, clipped to its bounds
        cover = None
    if is_distance_name(canonical):
        return {
            "warning": warning,
            "relative": False,
            "units": ood.DISTANCE_UNITS,
            "limits": distance_limits(session),
            "cmap": map_style.DISTANCE_COLORMAP,
            "threshold": distance_threshold(session),
            "cover": cover,
            "outside": False,  # the distance is measured, not predicted: never greyed
        }
    prediction, note = prediction_of(session, canonical)
    return {
        "warning": warning,
        "cover": cover,
        "outside": is_outside(session, canonical),
        "relative": True,
        "units": map_style.PERCENTILE_UNITS,
        "members": members(session, canonical),
        "prediction": prediction,
        "prediction_units": readout.output_unit(session.bundle),
        "prediction_note": note,
        "model": model_of(session, canonical),
    }
