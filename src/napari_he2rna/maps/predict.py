"""Predict a slide's expression in memory: slide-level predictions and per-tile scores (``he2rna predict``).

:func:`predict` tiles the slide, extracts (or reuses cached) features with the model's backbone and returns a
:class:`Prediction`: the slide-level prediction of every name (the model's aggregation, averaged over the
fold models; a gene set is the mean of its genes), the per-tile scores, the tile grid and how the slide
compares with the model's training data. The bundle's preprocessing is applied: its tile size (µm, or pixels
at a magnification), its backbone input handling, and its slide-level aggregation (the k-means of SEQUOIA's
re-trainings included; per-tile scores always come from every tile). It writes nothing: ``he2rna predict``
writes the result (:mod:`napari_he2rna.commands.predict`). No Qt, no napari.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..jobs import CancelToken, ProgressCallback
from ..model.mixed import map_models
from . import readout
from .gene_sets import parse_request, resolve_names
from .scoring import score_resolved
from .session import SlideSession, load_model

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle
    from ..model.ood import OODAssessment
    from ..slides.slide import Slide
    from ..slides.tiling import TileGrid

#: Above this many genes, per-tile scores are computed only for the genes asked for (``genes``).
MAX_TILE_GENES_BY_DEFAULT = 100


@dataclass
class Prediction:
    """What :func:`predict` computed for one slide."""

    #: Slide-level prediction per name (gene or set, in request order), in :attr:`units`.
    predictions: pd.Series
    #: Per-tile scores, rows aligned with ``grid.table`` rows: one float32 column per name, then
    #: ``feature_distance`` (the tile's distance to the model's training tiles) when the model has a feature
    #: reference; as the tile CSV holds them. ``None`` when no genes were named and the model has more than
    #: :data:`MAX_TILE_GENES_BY_DEFAULT`.
    scores: pd.DataFrame | None
    grid: TileGrid
    #: Name -> the model genes it was scored with.
    resolved: dict[str, list[str]]
    #: How the slide compares with the model's training data (every gene predicted is range-checked).
    assessment: OODAssessment
    #: The model is the demo model trained on synthetic slides: its predictions mean nothing on tissue.
    demo: bool
    #: What the predictions and scores are in (the bundle's output unit).
    units: str
    #: Facts for the metadata of exports: slide, mpp, tile size, model, backbone, the assessment's summary...
    slide_info: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return list(self.resolved)

    @property
    def n_tiles(self) -> int:
        return len(self.grid.table)


def predict(
    slide: str | os.PathLike | Slide,
    model: ModelBundle | str | os.PathLike | None = None,
    genes: Sequence[str] | str | None = None,
    *,
    gene_sets: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    mpp: float | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    before_features: Callable[[], None] | None = None,
) -> Prediction:
    """Predict a slide's expression: slide-level predictions and per-tile scores, in memory.

    Parameters
    ----------
    slide
        The whole-slide image: a path (opened and closed here) or an open
        :class:`~napari_he2rna.slides.slide.Slide`.
    model
        A model bundle or its path (``.safetensors``); ``None`` = the bundled demo model.
    genes
        Genes and/or gene sets (a list, or one comma-separated string; the syntax of
        :func:`~napari_he2rna.maps.gene_sets.resolve_names`); ``None`` or empty = every gene of the model.
    gene_sets
        User-defined sets (mapping, inline spec or file, see
        :func:`~napari_he2rna.maps.gene_sets.parse_gene_sets`).
    mpp, device, cache_dir, progress, cancel
        As for :func:`~napari_he2rna.maps.spatialize.spatialize` (``mpp`` only with a path).
    before_features
        Called once the model is loaded, the names resolved and the slide opened, just before the features:
        a caller that will write the result checks its output folder there, before the long work.

    Returns
    -------
    Prediction

    Raises
    ------
    He2rnaError
        Any user-facing problem (slide, pixel size, model, unknown gene, cache, no tissue, cancelled); a name
        is refused before any feature extraction. A set partly missing from the model warns
        (:class:`~napari_he2rna.maps.gene_sets.PartialGeneSetWarning`).
    """
    from ..features.cache import load_or_extract
    from ..features.extraction import ExtractOptions
    from ..slides.slide import open_slide

    is_path = isinstance(slide, str | os.PathLike)
    if mpp is not None and not is_path:
        raise ValueError("mpp is for a slide given by its path; open the slide with it instead.")
    bundle = load_model(model) if model is None or isinstance(model, str | os.PathLike) else model
    # unknown genes fail before any feature extraction; the syntax of spatialize and the Model dock (a set
    # partly missing from the model warns, through the CLI's one-line warnings; a set named like a gene or
    # defined twice is refused)
    requested, sets = parse_request(genes or [], gene_sets, bundle.genes)
    resolved = resolve_names(bundle.genes, requested, sets) if genes else {g: [g] for g in bundle.genes}
    names = list(resolved)
    needed = list(dict.fromkeys(g for members in resolved.values() for g in members))
    with open_slide(slide, mpp=mpp) if is_path else nullcontext(slide) as opened:
        if before_features is not None:
            before_features()
        grid, feats = load_or_extract(
            opened,
            bundle.backbone,
            ExtractOptions.for_model(bundle),  # its tile size (µm, or px at a magnification), input size
            cache_dir=cache_dir,
            device=device,
            progress=progress,
            cancel=cancel,
        )
        session = SlideSession(opened, bundle)  # for the tile exports' metadata, as spatialize writes it
        session.set_features(grid, feats, bundle.backbone)  # checked against the model there
        # genes in chunks from the session's cached hidden layers: all 20,820 genes of a SEQUOIA-size bundle
        # on an 8,000-tile slide took +3.9 GB at once through bundle.slide_prediction, +89 MB this way
        gene_preds = session.gene_slide_predictions(needed)
        # a gene is its own prediction; a pandas Series per name cost 0.4 s for 20,820 genes
        predictions = [
            gene_preds[resolved[n][0]]
            if len(resolved[n]) == 1
            else float(pd.Series([gene_preds[g] for g in resolved[n]]).mean())
            for n in names
        ]
        assessment = session.assessment(gene_preds)
        scores = None
        if genes or len(names) <= MAX_TILE_GENES_BY_DEFAULT:
            scores = session.scores_with_distance(score_resolved(bundle, feats, resolved))
        info = session.slide_info()
        if scores is not None:  # which model made each map column (HE2RNA, the linear baseline or both)
            info["map_models"] = map_models(bundle, resolved)
    return Prediction(
        predictions=pd.Series(
            dict(zip(names, predictions, strict=True)), dtype=float, name="slide_prediction"
        ),
        scores=scores,
        grid=grid,
        resolved=resolved,
        assessment=assessment,
        demo=bool(bundle.demo),
        units=readout.output_unit(bundle),
        slide_info=info,
    )
