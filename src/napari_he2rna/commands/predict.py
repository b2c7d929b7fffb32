"""``he2rna predict``: slide-level expression predictions and per-tile scores for one slide."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_cache_dir_argument, add_overwrite_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict a slide's gene expression (slide-level CSV) and per-tile scores (CSV, AnnData)",
        description=(
            "Tile the slide, extract (or reuse cached) features with the model's backbone, and write "
            "<slide>_prediction.csv (gene, predicted log10(1 + FPKM-UQ): the mean over k of the top-k tile "
            "mean, averaged over the fold models; a gene set is the mean of its genes) and the per-tile "
            "scores as spatialize writes them: <slide>_tile_scores.csv (one row per tile: id, grid "
            "position, level-0 px and µm, size, tissue fraction, one column per gene or set, and "
            "feature_distance, the tile's distance to the model's training tiles, when the model has a "
            "feature reference), <slide>_tile_scores.json (slide, mpp, tile size, model, units, ...) and "
            "<slide>_tiles.h5ad (AnnData). Warns when the slide is outside the model's training data or "
            "predictions leave the training targets' range."
        ),
    )
    p.add_argument("slide", help="whole-slide image (.svs, .tiff, .ndpi, ...)")
    p.add_argument(
        "--model",
        default=None,
        help="model bundle (.safetensors); default: the bundled demo model (synthetic slides)",
    )
    p.add_argument(
        "--genes",
        default=None,
        help='comma-separated genes and/or gene sets, e.g. CD3D,MKI67,"T cells",CD19+MS4A1,T=CD3D+CD3E '
        "(built-in sets: T cells, B cells, epithelium, proliferation; default: all genes of the model)",
    )
    p.add_argument(
        "--gene-sets",
        default=None,
        metavar="SPEC",
        help="extra gene sets: 'name=G1+G2;other=G3' or a .json / .gmt file",
    )
    p.add_argument("--out", default=".", help="output folder (default: current folder)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel, if the slide does not say")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_cache_dir_argument(p)
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def output_paths(slide: str | Path, out: str | Path) -> dict[str, Path]:
    """Where ``predict`` writes: ``slide_csv``, ``csv`` (tile scores), ``metadata`` (sidecar), ``h5ad``."""
    from ..maps import exports
    from ..maps.output_set import prediction_path
    from ..maps.spatialize import output_paths as spatialize_paths

    paths = spatialize_paths(slide, [], out, geojson=False)
    return {
        "slide_csv": prediction_path(slide, out),
        "csv": paths["csv"],
        "metadata": exports.tile_metadata_path(paths["csv"]),
        "h5ad": paths["h5ad"],
    }


def run(args: argparse.Namespace) -> int:
    from ..jobs import TextProgress
    from ..maps.output_set import slide_outputs
    from ..maps.predict import predict
    from ..safe_output import prepare_folder, refuse_existing, undo_new_folder

    out = Path(args.out)
    paths = output_paths(args.slide, out)
    refuse_existing(paths.values(), args.overwrite)  # before any work
    earlier = slide_outputs(args.slide, out) if args.overwrite else []
    with undo_new_folder(out):  # a failed run leaves no output folder it made
        result = predict(
            args.slide,
            args.model,
            args.genes,
            gene_sets=args.gene_sets,
            mpp=args.mpp,
            device=args.device,
            cache_dir=args.cache_dir,
            progress=TextProgress("features"),
            # a read-only folder or a file of that name: said before the features
            before_features=lambda: prepare_folder(out),
        )
        write(args, result, paths, earlier)
    removed = [p.name for p in earlier if not p.exists()]
    if removed:
        print(f"removed (the earlier run's, not written by this one): {', '.join(removed)}")
    return 0


def write(args: argparse.Namespace, result, paths: dict[str, Path], earlier: list[Path]) -> None:
    """Write ``predict``'s files together (replacing the slide's ``earlier`` files with ``--overwrite``) and
    say what was written."""
    import sys

    import pandas as pd

    from ..maps import exports
    from ..safe_output import atomic_write_text, staged_folder

    out = Path(args.out)
    names, grid, scores = result.names, result.grid, result.scores
    slide_pred = pd.DataFrame({"gene": names, "prediction": result.predictions.to_numpy()})
    if result.demo:
        print(
            "he2rna: warning: DEMO model trained on synthetic slides; its predictions mean nothing "
            "on tissue.",
            file=sys.stderr,
        )
    if result.assessment.outside:
        print(f"he2rna: warning: {result.assessment.message}", file=sys.stderr)
    # The files are committed together: an interrupted run leaves the earlier set or the new one, and the
    # earlier run's files that this one does not write go in the same step.
    with staged_folder(out, overwrite=args.overwrite, replaces=earlier) as stage:
        atomic_write_text(
            stage / paths["slide_csv"].name, slide_pred.to_csv(index=False, float_format="%.5f")
        )
        if scores is not None:
            info, preds, units = result.slide_info, result.predictions, result.units
            exports.write_tile_scores_csv(
                stage / paths["csv"].name, grid, scores, info, preds, units=units, side_file=False
            )
            meta = exports.tile_metadata(grid, list(scores.columns), info, preds, units)
            exports.write_anndata(stage / paths["h5ad"].name, grid, scores, meta)
    print(f"{len(grid.table)} tiles; slide-level predictions: {paths['slide_csv']}")
    if scores is None:
        print(f"per-tile scores not written for {len(names)} genes; choose some with --genes")
        return
    print(f"per-tile scores: {paths['csv']} (metadata: {paths['metadata'].name}, AnnData: {paths['h5ad']})")
    if len(names) <= 20:
        print(slide_pred.to_string(index=False))
