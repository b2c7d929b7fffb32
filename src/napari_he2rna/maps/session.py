"""The per-slide state the napari widgets, ``spatialize`` and ``predict`` share (no Qt, no napari).

:class:`SlideSession` holds what belongs to one open slide: the slide, the model bundle, the tile grid, the
tile features and the tile scores of the genes/sets picked so far (each computed on demand, from the cached
features, only for that name; dropped when its layer goes), and how the slide compares with the model's
training data (:mod:`napari_he2rna.model.ood`; the tile distance is painted like a gene under
:data:`DISTANCE_NAME`). Its exports are written by :mod:`napari_he2rna.maps.exports`; the headless job built
on it is :func:`napari_he2rna.maps.spatialize.spatialize`. The CLI and the widgets run the same code, so they
produce the same scores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import jobs
from ..errors import GeneError, ModelError
from ..jobs import CancelToken, ProgressCallback
from ..model import ood
from . import exports, gene_sets, heatmaps, progressive, readout
from .gene_sets import DISTANCE_NAME, is_distance_name
from .progressive import LiveFeatures, extraction_hooks

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle
    from ..slides.slide import Slide
    from ..slides.tiling import TileGrid


def default_model_path() -> Path:
    """The bundled demo model (trained on the synthetic sample slides)."""
    from .. import settings

    return settings.sample_data_dir() / "demo_model.safetensors"


def load_model(path: str | Path | None = None) -> ModelBundle:
    """Load a model bundle; ``None`` means the bundled demo model (a clear error if it is missing)."""
    from ..model.bundle import load_bundle

    p = Path(path) if path is not None else default_model_path()
    if path is None and not p.is_file():
        raise ModelError(
            f"the bundled demo model is missing ({p}); give a model bundle with --model, or create the demo "
            "model (see the README)."
        )
    return load_bundle(p)


def feature_key(bundle: ModelBundle) -> tuple:
    """What the features a model expects depend on: backbone, features per tile, tile size (µm, or pixels
    at a magnification) and input handling. Two models with the same key share a slide's features."""
    px = None if bundle.tile_px is None else (int(bundle.tile_px), float(bundle.tile_magnification))
    return (bundle.backbone, int(bundle.feature_dim), float(bundle.tile_um), px, bool(bundle.input_resize))


class SlideSession:
    """What the widgets share for one open slide: slide, model, grid, features and per-name tile scores.

    Thread-safe for one worker computing while the GUI thread reads: every state change holds a lock.
    Several slides open at once are several sessions.

    Parameters
    ----------
    slide
        An open slide (:func:`napari_he2rna.slides.slide.open_slide`); the session closes it in :meth:`close`.
    bundle
        The model, or None until one is chosen (:meth:`set_model`).
    """

    def __init__(self, slide: Slide, bundle: ModelBundle | None = None) -> None:
        self.slide = slide
        self.bundle: ModelBundle | None = None
        self.grid: TileGrid | None = None
        self.features: np.ndarray | None = None
        self.gene_sets: dict[str, list[str]] = {}
        self._feature_key: tuple | None = None
        self._scores: dict[str, np.ndarray] = {}
        self._resolved: dict[str, list[str]] = {}
        self._alias: dict[str, str] = {}
        self._assessment: ood.OODAssessment | None = None
        # The last hidden layer's activations per fold, for ``_hidden_of`` (the features object they were
        # computed from: the session's own feature identity, no hashing): a gene costs one dot product.
        self._hidden: list | None = None
        self._hidden_of: np.ndarray | None = None
        self._spread: dict[str, np.ndarray] = {}
        self._lookup: tuple[ModelBundle, gene_sets.GeneLookup] | None = None  # (model, its gene index)
        self.live: LiveFeatures | None = None  # a run's features so far (progressive painting)
        self._lock = threading.RLock()
        if bundle is not None:
            self.set_model(bundle)

    @classmethod
    def open(cls, path: str | Path, mpp: float | None = None, model: ModelBundle | str | Path | None = None):
        """Open a slide (and optionally a model: a bundle or its path) into a new session."""
        from ..slides.slide import open_slide

        bundle = load_model(model) if isinstance(model, str | Path) else model
        return cls(open_slide(path, mpp=mpp), bundle)

    # ------------------------------------------------------------------------------------------ model
    def set_model(self, bundle: ModelBundle | str | Path | None) -> None:
        """Use another model: scores are dropped; features too when it wants another backbone or tile size."""
        if bundle is None or isinstance(bundle, str | Path):
            bundle = load_model(bundle)
        with self._lock:
            self.bundle = bundle
            self._assessment = None
            self._scores.clear()
            self._spread.clear()
            self._resolved.clear()
            self._alias.clear()
            self._hidden, self._hidden_of, self.live = None, None, None
            self._lookup = None  # the old model's gene index would keep the old model (GBs) alive
            if self._feature_key is not None and self._feature_key != feature_key(bundle):
                self.grid, self.features, self._feature_key = None, None, None

    def _require_bundle(self) -> ModelBundle:
        if self.bundle is None:
            raise ModelError("no model is loaded; choose a model bundle first.")
        return self.bundle

    @property
    def ready(self) -> bool:
        """True once a model is loaded and the slide's features for it are computed."""
        return self.bundle is not None and self.features is not None and self.grid is not None

    # ------------------------------------------------------------------------------------------ features
    def compute_features(
        self,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        grid_ready: Callable[[TileGrid], None] | None = None,
        batch_ready: Callable[[int, int], None] | None = None,
        progressive: bool = False,
        batch_size: int = 32,
    ) -> TileGrid:
        """Tile the slide and extract (or load from the cache) the features the model expects: its backbone,
        tile size (µm, or pixels at a magnification: 256 px at 20x is 512 level-0 px on a 40x slide) and
        input handling (:meth:`~napari_he2rna.features.extraction.ExtractOptions.for_model`).

        ``grid_ready(grid)`` is called as soon as the tile grid is known, before the long extraction.

        ``progressive=True`` extracts the tiles in a spatially spread order
        (:func:`progressive.spread_order`: a coarse lattice first) and keeps each batch in :attr:`live`, so
        that :meth:`scores` / :meth:`raster` work on the tiles done so far while the run goes on;
        ``batch_ready(n_done, n_total)`` is called (in the worker thread) after each batch. The features
        still go to the cache (resumable); a cancelled run keeps :attr:`live`.

        Returns the tile grid. Raises ``ModelError`` when the backbone does not produce what the model
        expects, ``TissueError`` for a slide without tissue, ``Cancelled`` when ``cancel`` is set (the
        session keeps its previous state).
        """
        from ..features.backbones import get_backbone
        from ..features.cache import load_or_extract
        from ..features.extraction import ExtractOptions

        bundle = self._require_bundle()
        self.slide.require_mpp()
        backbone = get_backbone(bundle.backbone, device=device)
        # Fail before the long extraction when the backbone cannot feed this model.
        bundle.check_features(backbone.name, backbone.dim)
        jobs.check_cancel(cancel)
        extra: dict[str, Any] = {}
        if progressive:
            extra = extraction_hooks(self, bundle, backbone, batch_size, cache_dir, grid_ready, batch_ready)
        grid, features = load_or_extract(
            self.slide,
            backbone,
            ExtractOptions.for_model(bundle),
            cache_dir=cache_dir,
            device=device,
            progress=progress,
            cancel=cancel,
            batch_size=batch_size,
            **{"grid_ready": grid_ready, **extra},
        )
        jobs.check_cancel(cancel)
        self.set_features(grid, features, backbone.name, bundle=bundle)
        return grid

    def start_live(self, grid: TileGrid, bundle: ModelBundle, dim: int) -> None:
        """Start the :attr:`live` features of a progressive run on ``grid`` (if ``bundle`` is the model)."""
        import torch

        n = len(grid.table)
        width = int(bundle.layers[0][-1][0].shape[1]) if bundle.layers else 0
        live = LiveFeatures(
            grid=grid,
            bundle=bundle,
            features=np.zeros((n, int(dim)), dtype=np.float32),
            hidden=[torch.zeros((n, width)) for _ in range(bundle.n_folds)],
            done=np.zeros(n, dtype=bool),
        )
        with self._lock:
            if self.bundle is bundle:
                self.live = live

    def take_batch(self, bundle: ModelBundle, rows: np.ndarray, feats: np.ndarray) -> LiveFeatures | None:
        """Keep one batch of a progressive run: its features, hidden activations and done flags."""
        import torch

        live = self.live
        if live is None or live.bundle is not bundle:
            return None
        hidden = bundle.hidden_activations(feats)
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        with self._lock:
            live.features[rows] = feats
            for buf, h in zip(live.hidden, hidden, strict=True):
                buf[idx] = h
            live.done[rows] = True  # last: a reader only uses rows marked done
        return live

    def set_features(self, grid: TileGrid, features: np.ndarray, backbone: str, bundle=None) -> None:
        """Use a tile grid and its (N, dim) features computed elsewhere (checked against the model)."""
        bundle = bundle if bundle is not None else self._require_bundle()
        features = np.asarray(features, dtype=np.float32)
        # A tile in px at a magnification is checked in level-0 px: its µm follow the slide's own mpp.
        bundle.check_features(backbone, features.shape[1], grid.tile_um if bundle.tile_px is None else None)
        if bundle.tile_px is not None:
            from ..slides.tiling import tile_side_px

            side = tile_side_px(self.slide, bundle.tile_px, bundle.tile_magnification, warn=False)
            if int(grid.tile_px) != side:
                raise ModelError(
                    f"The model expects tiles of {bundle.tile_px} px at {bundle.tile_magnification:g}x, "
                    f"{side} level-0 px on this slide, got {grid.tile_px}."
                )
        if features.shape[0] != len(grid.table):
            raise ModelError(
                f"{features.shape[0]} feature rows for {len(grid.table)} tiles; clear the feature cache."
            )
        with self._lock:
            if self.bundle is not bundle:  # the model changed while we worked: these features may not fit
                raise ModelError("the model was changed while it ran; press Run again.")
            live, self.live = self.live, None
            self.grid, self.features = grid, features
            self._feature_key = feature_key(bundle)
            self._assessment = None
            self._scores.clear()
            self._spread.clear()
            self._resolved.clear()
            self._alias.clear()
            self._hidden, self._hidden_of = None, None
            # A progressive run computed the hidden layers already, batch by batch: keep them when they are
            # of these very features (the cache returns what the run wrote).
            if (
                live is not None
                and live.bundle is bundle
                and live.done.all()
                and live.features.shape == features.shape
                and np.array_equal(live.features, features)
            ):
                self._hidden, self._hidden_of = live.hidden, features

    def require_ready(self) -> tuple[ModelBundle, TileGrid, np.ndarray]:
        """(model, tile grid, features) of the last run; ``ModelError`` before one."""
        bundle = self._require_bundle()
        if self.features is None or self.grid is None:
            raise ModelError("the model has not been run on this slide yet; press Run first.")
        return bundle, self.grid, self.features

    # ------------------------------------------------------------------------------------------ names
    def add_gene_sets(self, sets: Mapping[str, Sequence[str]] | str | Path) -> dict[str, list[str]]:
        """Add user-defined sets (a mapping, an inline spec ``name=G1+G2;...`` or a file); returns them.

        A spec or file is read by :func:`gene_sets.parse_gene_sets`: a set defined twice in it, or named like
        a gene of the model (when one is loaded), is refused (``GeneError``). A mapping is taken as it is
        (the viewer's sets, already read); :meth:`resolve` refuses a name that is both a gene and a set."""
        genes = self.bundle.genes if self.bundle is not None else None
        parsed = (
            gene_sets.parse_gene_sets(sets, genes)
            if isinstance(sets, str | Path)
            else {k: list(v) for k, v in sets.items()}
        )
        with self._lock:
            self.gene_sets.update(parsed)
        for name in parsed:  # a redefined set must be recomputed
            self.drop(name)
        return parsed

    def choices(self) -> list[str]:
        """What the gene picker offers: the feature distance (when the model has a feature reference),
        the gene sets, then the model's genes."""
        bundle = self._require_bundle()
        first = [DISTANCE_NAME] if ood.bundle_reference(bundle) is not None else []
        sets = [*gene_sets.GENE_SETS, *[s for s in self.gene_sets if s not in gene_sets.GENE_SETS]]
        return [*first, *sets, *bundle.genes]

    def resolve(self, names: Iterable[str] | str) -> dict[str, list[str]]:
        """Canonical name -> model genes (see :func:`gene_sets.resolve_names`); warns for partial sets."""
        bundle = self._require_bundle()
        names = [names] if isinstance(names, str) else list(names)
        with self._lock:
            lookup = self._lookup[1] if self._lookup is not None and self._lookup[0] is bundle else None
        if lookup is None:  # once per model: the case-insensitive index of 30,000 genes costs ~10 ms
            lookup = gene_sets.GeneLookup(bundle.genes)
            with self._lock:
                self._lookup = (bundle, lookup)
        return gene_sets.resolve_names(lookup, names, self.gene_sets)

    # ------------------------------------------------------------------------------------------ scores
    @property
    def painted(self) -> bool:
        """True when names can be scored: after a run, or during / after a cancelled progressive run."""
        live = self.live
        return self.ready or (live is not None and live.bundle is self.bundle and bool(live.done.any()))

    def hidden(self) -> list:
        """The last hidden layer's activations per fold for the session's features (computed once per run).

        Cached on the features object itself (the session's feature identity), so a gene costs one dot
        product per fold; call it in a worker after a run so that the first pick is instant too.
        """
        bundle, _, features = self.require_ready()
        with self._lock:
            if self._hidden is not None and self._hidden_of is features:
                return self._hidden
        hidden = bundle.hidden_activations(features)
        with self._lock:
            if self.bundle is bundle and self.features is features:
                self._hidden, self._hidden_of = hidden, features
        return hidden

    def _scoring(self) -> tuple[ModelBundle, TileGrid, list, np.ndarray | None]:
        """(bundle, grid, hidden per fold, rows done or None when all are): what scores are computed from."""
        if self.ready:
            bundle, grid, _ = self.require_ready()
            return bundle, grid, self.hidden(), None
        live = self.live
        if live is not None and live.bundle is self.bundle and self.bundle is not None:
            with self._lock:
                known = np.flatnonzero(live.done)
            return live.bundle, live.grid, live.hidden, known
        self.require_ready()  # raises the "press Run first" error
        raise AssertionError("unreachable")

    def fold_scores(self, name: str) -> np.ndarray:
        """(n_folds, N) float32 tile scores of a gene or set by each fold model (NaN: not extracted yet).

        A set's fold score is the mean of its genes' fold scores.
        """
        import torch

        bundle, grid, hidden, known = self._scoring()
        canonical, genes = next(iter(self.resolve(name).items()))
        n = len(grid.table)
        if known is not None:
            idx = torch.as_tensor(known)
            hidden = [h.index_select(0, idx) for h in hidden]
        per_fold = bundle.scores_from_hidden(hidden, list(dict.fromkeys(genes)))
        col = {g: i for i, g in enumerate(dict.fromkeys(genes))}
        cols = [col[g] for g in genes]
        vals = torch.stack(per_fold)[:, :, cols].mean(dim=2).numpy().astype(np.float32)  # (F, n_known)
        if known is None:
            return vals
        out = np.full((vals.shape[0], n), np.nan, dtype=np.float32)
        out[:, known] = vals
        return out

    def scores(self, name: str) -> np.ndarray:
        """(N,) float32 tile scores of one gene or set, computed on first use and cached.

        Only that name's genes go through the model's last layer, from the cached hidden activations (one
        dot product per fold). A name is cached under its canonical spelling (``"mki67"`` and ``"MKI67"``
        share one entry). During a progressive run the tiles not extracted yet are NaN (not cached).
        """
        if is_distance_name(name):
            return self.tile_distances()
        if not self.ready:
            return self.fold_scores(name).mean(axis=0)
        bundle, _, features = self.require_ready()
        with self._lock:
            key = self._alias.get(name, name)
            hit = self._scores.get(key)
        if hit is not None:
            return hit
        canonical, genes = next(iter(self.resolve(name).items()))
        with self._lock:
            hit = self._scores.get(canonical)
        if hit is None:
            hit = self.fold_scores(canonical).mean(axis=0)
        with self._lock:
            if self.bundle is bundle and self.features is features:  # not stale (model/features unchanged)
                self._scores[canonical] = hit
                self._resolved[canonical] = list(genes)
                self._alias[name] = canonical
        return hit

    def uncertainty(self, name: str) -> np.ndarray:
        """(N,) float32 spread of the fold models' tile scores (standard deviation across folds, ddof 0):
        zero everywhere for a one-fold bundle; NaN for tiles not extracted yet."""
        if is_distance_name(name):
            raise GeneError("the feature distance has no fold models; pick a gene or a gene set.")
        canonical = self.canonical(name)
        with self._lock:
            hit = self._spread.get(canonical) if self.ready else None
        if hit is not None:
            return hit
        spread = self.fold_scores(canonical).std(axis=0).astype(np.float32)
        if self.ready:
            with self._lock:
                self._spread[canonical] = spread
        return spread

    def canonical(self, name: str) -> str:
        """The name a layer should carry (the model's spelling of a gene, the set's own name)."""
        if is_distance_name(name):
            return DISTANCE_NAME
        with self._lock:
            if name in self._alias:
                return self._alias[name]
        return next(iter(self.resolve(name)))

    def scores_frame(self, names: Iterable[str]) -> pd.DataFrame:
        """(N, k) float32 tile scores of several names (as :func:`scoring.score_tiles`), via the cache."""
        names = list(names)
        return pd.DataFrame({self.canonical(n): self.scores(n) for n in names})

    def slide_predictions(self, names: Iterable[str]) -> pd.Series:
        """Slide-level predictions (the model's aggregation) of genes/sets (not of the feature distance)."""
        names = [n for n in names if not is_distance_name(n)]
        resolved = self.resolve(names)
        needed = list(dict.fromkeys(g for genes in resolved.values() for g in genes))
        raw = self.gene_slide_predictions(needed)
        return pd.Series(
            {name: float(np.mean([raw[g] for g in genes])) for name, genes in resolved.items()},
            name="slide_prediction",
            dtype=np.float64,
        )

    def gene_slide_predictions(self, genes: Sequence[str], chunk: int = 512) -> dict[str, float]:
        """``{gene: slide prediction}`` from the cached hidden layers (bounded memory: genes in chunks).

        For a bundle that predicts from its slide inputs (k-means cluster means, supertiles) from those
        (:meth:`~napari_he2rna.model.bundle.ModelBundle.slide_inputs`, computed once per feature matrix)."""
        bundle, grid, features = self.require_ready()
        if bundle.uses_slide_inputs:  # the slide input it was trained on
            hidden = bundle.hidden_activations(bundle.slide_inputs(features, grid.centers()))
        else:
            hidden = self.hidden()
        out: dict[str, float] = {}
        genes = list(genes)
        for start in range(0, len(genes), chunk):
            part = genes[start : start + chunk]
            values = bundle.aggregate_fold_scores(bundle.scores_from_hidden(hidden, part), part)
            out.update(zip(part, (float(v) for v in np.asarray(values).reshape(-1)), strict=True))
        return out

    def units(self, name: str) -> str:
        """Units of a name's tile values: the distance's, or a tile score's (:func:`readout.tile_score_units`:
        only the slide's aggregate is in the bundle's ``output_unit``)."""
        if is_distance_name(name):
            return ood.DISTANCE_UNITS
        return readout.tile_score_units(readout.output_unit(self.bundle))

    # ------------------------------------------------------------------------------------------ training data
    def assessment(self, predictions: Mapping[str, float] | None = None) -> ood.OODAssessment:
        """How this slide compares with the model's training data (:func:`ood.assess`), cached.

        ``predictions`` (slide-level ``{gene: value}``) are checked against the training targets' range;
        ``None`` checks every gene of the model the first time (then the cached assessment is returned).
        Giving predictions always recomputes and replaces the cached assessment.
        """
        bundle, _, features = self.require_ready()
        with self._lock:
            if predictions is None and self._assessment is not None:
                return self._assessment
        if predictions is None:
            # The training-range check of every gene, from the session's hidden layers (no re-hashing).
            ranges = ood.bundle_target_range(bundle) or {}
            genes = [g for g in bundle.genes if g in ranges]
            predictions = self.gene_slide_predictions(genes) if genes and len(features) else {}
        result = ood.assess(bundle, features, predictions)
        with self._lock:
            if self.bundle is bundle and self.features is features:
                self._assessment = result
        return result

    @property
    def cached_assessment(self) -> ood.OODAssessment | None:
        """The assessment computed since the last run (None before one); never computes."""
        with self._lock:
            return self._assessment

    def tile_distances(self) -> np.ndarray:
        """(N,) float32 distance of every tile to the model's training tiles (:func:`ood.tile_distance`).

        Raises :class:`ModelError` when the model carries no feature reference.
        """
        bundle, _, features = self.require_ready()
        ref = ood.bundle_reference(bundle)
        if ref is None:
            raise ModelError(
                "this model bundle has no feature reference, so tile distances to its training data are "
                "unavailable."
            )
        with self._lock:
            cached = self._assessment
        if cached is not None and cached.tile_distances is not None:
            return cached.tile_distances
        return ood.tile_distance(ref, features)

    def warning(self) -> str | None:
        """The assessment's sentence when the slide is outside the training data (or predictions out of
        range), else None. Uses the cached assessment (computes it on first use)."""
        a = self.assessment()
        return a.message if a.outside else None

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._scores)

    def drop(self, name: str) -> None:
        """Forget a name's scores (its layer was closed)."""
        with self._lock:
            key = self._alias.get(name, name)
            self._scores.pop(key, None)
            self._resolved.pop(key, None)
            self._alias = {a: c for a, c in self._alias.items() if c != key}

    def clear_scores(self) -> None:
        with self._lock:
            self._scores.clear()
            self._spread.clear()
            self._resolved.clear()
            self._alias.clear()

    def release(self) -> None:
        """Free the scores, features and hidden activations (keep the slide open)."""
        with self._lock:
            self.clear_scores()
            self.features, self.grid, self.live = None, None, None
            self._hidden, self._hidden_of = None, None
            self._assessment = None
            self._lookup = None

    # ------------------------------------------------------------------------------------------ heatmaps
    def current_grid(self) -> TileGrid:
        """The tile grid of the last run, or of the run in flight (progressive)."""
        if self.grid is not None and self.ready:
            return self.grid
        live = self.live
        if live is not None and live.bundle is self.bundle:
            return live.grid
        return self.require_ready()[1]

    def n_scored(self) -> tuple[int, int]:
        """(tiles with features, tiles of the grid): equal after a run; during a progressive run, so far."""
        if self.ready:
            n = len(self.grid.table)
            return n, n
        live = self.live
        if live is not None and live.bundle is self.bundle:
            return live.n_done, len(live.done)
        return 0, 0

    def raster(self, name: str, kind: str = "score") -> np.ndarray:
        """(n_rows, n_cols) float32 heatmap of a name (``kind`` ``"score"`` or ``"uncertainty"``), NaN off
        tissue. During a progressive run the tiles not extracted yet take the value of their nearest
        extracted tile (:func:`progressive.nearest_fill`): a coarse map of the whole slide."""
        values = self.uncertainty(name) if kind == "uncertainty" else self.scores(name)
        grid = self.current_grid()
        if not self.ready:
            live = self.live
            known = live.done.copy() if live is not None else np.isfinite(values)
            values = progressive.nearest_fill(grid, values, known & np.isfinite(values))
        return heatmaps.heatmap_raster(grid, values)

    def heatmap_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, translate) in µm for a heatmap layer over the slide layer (``scale = mpp``)."""
        return heatmaps.heatmap_transform(self.current_grid())

    def contrast_limits(
        self, name: str, percentiles: tuple[float, float] = (1.0, 99.0), kind: str = "score"
    ) -> tuple[float, float]:
        """Robust colour limits; the feature distance runs from 0 to at least the tile threshold, so that
        a slide like the training slides looks dark and one outside them bright; the fold spread from 0."""
        if kind == "uncertainty":
            spread = self.uncertainty(name)
            hi = float(np.nanmax(spread)) if np.isfinite(spread).any() else 0.0
            return 0.0, max(hi, 1e-6)
        lo, hi = heatmaps.robust_limits(self.scores(name), percentiles)
        if is_distance_name(name):
            ref = ood.bundle_reference(self._require_bundle()) or {}
            return 0.0, max(hi, float(ref.get("tile_threshold", hi)))
        return lo, hi

    def tile_at(self, x_um: float, y_um: float) -> int | None:
        """Row of ``grid.table`` under a point in µm (world coordinates), or None off the kept tiles."""
        grid = self.current_grid()
        size = grid.tile_side_um
        row, col = int(np.floor(y_um / size)), int(np.floor(x_um / size))
        hit = np.flatnonzero((grid.table["row"].to_numpy() == row) & (grid.table["col"].to_numpy() == col))
        return int(hit[0]) if hit.size else None

    # ------------------------------------------------------------------------------------------ exports
    def slide_info(self) -> dict[str, Any]:
        """Facts written in export headers."""
        bundle = self.bundle
        info: dict[str, Any] = {"slide": Path(self.slide.path).name, "mpp": self.slide.mpp}
        if self.grid is not None:
            info.update(
                tile_px=self.grid.tile_px,
                tile_um=round(self.grid.tile_side_um, 4),
                n_tiles=len(self.grid.table),
            )
            if bundle is not None and bundle.tile_px is not None:
                from ..slides.tiling import slide_magnification

                power, source = slide_magnification(self.slide)
                info.update(
                    model_tile_px=int(bundle.tile_px),
                    model_tile_magnification=float(bundle.tile_magnification),
                    slide_magnification=power,
                    slide_magnification_from=source,
                )
        if bundle is not None:
            info.update(
                model=Path(bundle.path).name if getattr(bundle, "path", None) else "",
                backbone=bundle.backbone,
                demo=bool(bundle.demo),
            )
            if not bundle.input_resize and bundle.tile_px is not None:
                info["backbone_input_px"] = int(bundle.tile_px)  # tiles fed as read, not resized
            if bundle.aggregation != "topk":
                info["slide_aggregation"] = bundle.aggregation
        with self._lock:
            assessment = self._assessment
        if assessment is not None:
            info.update(assessment.summary())
        return info

    def scores_with_distance(self, scores: pd.DataFrame) -> pd.DataFrame:
        """``scores`` plus a :data:`ood.DISTANCE_COLUMN` column when the model has a feature reference."""
        bundle = self._require_bundle()
        if ood.bundle_reference(bundle) is None:
            return scores
        if ood.DISTANCE_COLUMN in scores.columns:
            raise GeneError(f"the name {ood.DISTANCE_COLUMN!r} is taken by the feature distance column.")
        out = scores.copy()
        out[ood.DISTANCE_COLUMN] = self.tile_distances()
        return out

    def export_csv(self, path: str | Path, names: Iterable[str], overwrite: bool = False):
        """Tile CSV + ``<stem>_slide.csv`` (see :func:`exports.export_csv`); returns both paths."""
        return exports.export_csv(self, path, names, overwrite)

    def export_metadata(self, names: Iterable[str]) -> dict[str, Any]:
        """The metadata of an export of ``names`` (see :func:`exports.export_metadata`)."""
        return exports.export_metadata(self, names)

    def export_geojson(self, path: str | Path, names: Iterable[str], overwrite: bool = False) -> Path:
        """QuPath tiles with the scores as measurements (see :func:`exports.export_geojson`)."""
        return exports.export_geojson(self, path, names, overwrite)

    def export_h5ad(self, path: str | Path, names: Iterable[str], overwrite: bool = False) -> Path:
        """The tiles as AnnData (see :func:`exports.export_h5ad`)."""
        return exports.export_h5ad(self, path, names, overwrite)

    def export_heatmap_tiff(self, path: str | Path, name: str, overwrite: bool = False) -> Path:
        """A name's heatmap as a georeferenced TIFF (see :func:`exports.export_heatmap_tiff`)."""
        return exports.export_heatmap_tiff(self, path, name, overwrite)

    def render_png(self, path: str | Path, name: str, thumbnail=None, overwrite: bool = False, **kw) -> Path:
        """PNG of a name's heatmap over the thumbnail (see :func:`exports.render_png`)."""
        return exports.render_png(self, path, name, thumbnail, overwrite, **kw)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
        """The slide thumbnail and its level-0 downsample (x, y)."""
        thumb = self.slide.thumbnail(max_size)
        width, height = self.slide.dimensions
        return thumb, (width / thumb.shape[1], height / thumb.shape[0])

    # ------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the scores and features and close the slide."""
        self.release()
        self.slide.close()

    def __enter__(self) -> SlideSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
