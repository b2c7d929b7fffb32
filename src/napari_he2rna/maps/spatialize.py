"""The spatialization job: slide -> model -> features (cache reused) -> tile scores -> files.

:func:`spatialize` is the headless main job, built on :class:`~napari_he2rna.maps.session.SlideSession`: it
writes the tile scores (CSV + metadata sidecar, AnnData, QuPath GeoJSON), one heatmap PNG per name and the
slide-level predictions. The CLI (``he2rna spatialize``) and the widgets run the same code, so they produce
the same scores. No Qt, no napari.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import jobs
from ..errors import ModelError
from ..jobs import CancelToken, ProgressCallback
from ..model import ood
from ..model.mixed import map_models
from . import exports, readout
from .exports import safe_name
from .gene_sets import DISTANCE_NAME, PartialGeneSetWarning, is_distance_name, parse_request, split_names
from .session import SlideSession, default_model_path, load_model

if TYPE_CHECKING:
    from ..slides.tiling import TileGrid


@dataclass
class SpatializeResult:
    """What :func:`spatialize` computed and wrote."""

    slide_path: Path
    model_path: Path
    grid: TileGrid
    scores: pd.DataFrame  # (N, k) float32, one column per canonical name, rows = grid.table rows
    predictions: pd.Series  # slide-level prediction per name
    resolved: dict[str, list[str]]  # name -> model genes it was scored with
    csv_path: Path
    slide_csv_path: Path
    metadata_path: Path
    h5ad_path: Path
    png_paths: dict[str, Path]
    geojson_path: Path | None
    demo: bool
    warnings: list[str] = field(default_factory=list)
    assessment: ood.OODAssessment | None = None  # the slide vs the model's training data

    @property
    def n_tiles(self) -> int:
        return len(self.grid.table)


def output_paths(
    slide_path: str | Path, names: Sequence[str], out_dir: str | Path, geojson: bool = True
) -> dict[str, Any]:
    """Where :func:`spatialize` writes: ``csv``, ``slide_csv``, ``metadata``, ``h5ad``, ``geojson``, ``png``
    (name -> path)."""
    out = Path(out_dir)
    stem = Path(slide_path).stem
    csv = out / f"{stem}_tile_scores.csv"
    pngs: dict[str, Path] = {}
    used: set[str] = set()
    for name in names:
        base = f"{stem}_{safe_name(name)}"
        fname, i = base, 1
        while fname.lower() in used:
            i += 1
            fname = f"{base}_{i}"
        used.add(fname.lower())
        pngs[name] = out / f"{fname}.png"
    return {
        "csv": csv,
        "slide_csv": exports.slide_csv_path(csv),
        "metadata": exports.tile_metadata_path(csv),
        "h5ad": out / f"{stem}_tiles.h5ad",
        "geojson": out / f"{stem}_tiles.geojson" if geojson else None,
        "png": pngs,
    }


def spatialize(
    slide_path: str | Path,
    model_path: str | Path | None,
    names: Sequence[str] | str,
    out_dir: str | Path,
    mpp: float | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    gene_sets: Mapping[str, Sequence[str]] | str | Path | None = None,
    geojson: bool = True,
) -> SpatializeResult:
    """Run a model on a slide and write its tile scores, heatmap PNGs and slide-level predictions.

    Parameters
    ----------
    slide_path
        The whole-slide image.
    model_path
        A model bundle (``.safetensors``); ``None`` = the bundled demo model.
    names
        Genes and/or gene sets (a list, or one comma-separated string), inline sets (``name=G1+G2``) too:
        read by :func:`~napari_he2rna.maps.gene_sets.parse_request`, as every command reads them.
    out_dir
        Output folder (created if needed). Writes ``<slide>_tile_scores.csv`` (one row per tile),
        ``<slide>_tile_scores_slide.csv`` (slide-level predictions), ``<slide>_tile_scores.json`` (the
        metadata), ``<slide>_tiles.h5ad`` (AnnData), ``<slide>_<name>.png`` per name and
        ``<slide>_tiles.geojson`` (QuPath tiles with the scores as measurements) unless ``geojson=False``.
    mpp
        µm per level-0 pixel, for slides that do not say it (overrides the file's).
    device
        Feature-extraction device: ``"auto"``, ``"cuda"``, ``"cpu"``.
    cache_dir
        Feature cache folder (default: the settings' cache).
    progress, cancel
        See :mod:`napari_he2rna.jobs`.
    overwrite
        Replace existing outputs (otherwise they are refused before any work is done).
    gene_sets
        User-defined sets (mapping, inline spec or file, see :func:`gene_sets.parse_gene_sets`); a set named
        like a gene of the model, or defined twice (here or inline in ``names``), is refused.

    Returns
    -------
    SpatializeResult

    Raises
    ------
    He2rnaError
        Any user-facing problem (slide, pixel size, model, gene, cache, no tissue, outputs exist / cannot be
        written, cancelled); no half-written file is left behind.
    """
    names = split_names(names) if isinstance(names, str) else [str(n) for n in names]
    want_distance = any(is_distance_name(n) for n in names)
    names = [n for n in names if not is_distance_name(n)]
    out_dir = Path(out_dir)
    model_file = Path(model_path) if model_path is not None else default_model_path()
    caught: list[str] = []
    with SlideSession.open(slide_path, mpp=mpp) as session:
        bundle = load_model(model_path)
        session.set_model(bundle)
        # the sets of gene_sets and the inline ones of names (name=G1+G2), read as every command reads them
        names, sets = parse_request(names, gene_sets, bundle.genes)
        session.add_gene_sets(sets)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", PartialGeneSetWarning)
            resolved = session.resolve(names)  # unknown genes fail here, before any long work
        caught = [str(w.message) for w in seen if issubclass(w.category, PartialGeneSetWarning)]
        for msg in caught:  # re-emit for callers that watch warnings
            warnings.warn(msg, PartialGeneSetWarning, stacklevel=2)
        canonical = list(resolved)
        if want_distance and ood.bundle_reference(bundle) is None:
            raise ModelError(
                f"{model_file.name} has no feature reference, so the feature distance cannot be painted."
            )
        pictured = [*canonical, *([DISTANCE_NAME] if want_distance else [])]
        paths = output_paths(slide_path, pictured, out_dir, geojson=geojson)
        planned = [paths["csv"], paths["slide_csv"], paths["metadata"], paths["h5ad"], *paths["png"].values()]
        if paths["geojson"] is not None:
            planned.append(paths["geojson"])
        if not overwrite:
            for p in planned:
                if p.exists():
                    raise exports.OutputExistsError(
                        f"{p} already exists; choose another output folder or pass --overwrite."
                    )
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise exports.ExportError(f"cannot create the output folder {out_dir}: {exc.strerror}.") from exc

        grid = session.compute_features(device=device, cache_dir=cache_dir, progress=progress, cancel=cancel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialGeneSetWarning)  # already reported above
            scores = session.scores_frame(canonical)
            predictions = session.slide_predictions(canonical)
            # Every gene scored (also those inside sets) is checked against the training targets' range.
            needed = list(dict.fromkeys(g for genes in resolved.values() for g in genes))
            gene_preds = session.gene_slide_predictions(needed)
            assessment = session.assessment(gene_preds)
            jobs.check_cancel(cancel)
            exported = session.scores_with_distance(scores)
            units = readout.output_unit(bundle)
            info = {**session.slide_info(), "map_models": map_models(bundle, resolved)}
            csv_path, slide_csv = exports.write_tile_scores_csv(
                paths["csv"],
                grid,
                exported,
                info,
                predictions,
                overwrite=overwrite,
                units=units,
            )
            meta = exports.tile_metadata(grid, list(exported.columns), info, predictions, units)
            h5ad = exports.write_anndata(paths["h5ad"], grid, exported, meta, overwrite=overwrite)
            geo = None
            if paths["geojson"] is not None:
                geo = exports.write_geojson_tiles(
                    paths["geojson"], grid, exported, overwrite=overwrite, metadata=meta
                )
            thumb = session.thumbnail(1024)
            pngs: dict[str, Path] = {}
            for name in pictured:
                jobs.check_cancel(cancel)
                pngs[name] = session.render_png(
                    paths["png"][name], name, thumbnail=thumb, overwrite=overwrite
                )
    return SpatializeResult(
        slide_path=Path(slide_path),
        model_path=model_file,
        grid=grid,
        scores=scores,
        predictions=predictions,
        resolved=resolved,
        csv_path=csv_path,
        slide_csv_path=slide_csv,
        metadata_path=exports.tile_metadata_path(csv_path),
        h5ad_path=h5ad,
        png_paths=pngs,
        geojson_path=geo,
        demo=bool(bundle.demo),
        warnings=caught,
        assessment=assessment,
    )
