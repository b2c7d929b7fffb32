"""``he2rna predict``: slide-level expression predictions and per-tile scores for one slide."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_cache_dir_argument, add_overwrite_argument

# Above this many genes, per-tile scores are written only for the genes asked for with --genes.
MAX_TILE_GENES_BY_DEFAULT = 100


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict a slide's gene expression (slide-level CSV) and per-tile scores (CSV)",
        description=(
            "Tile the slide, extract (or reuse cached) features with the model's backbone, and write "
            "<slide>_prediction.csv (gene, predicted log10(1 + FPKM-UQ): the mean over k of the top-k tile "
            "mean, "
            "averaged over the fold models) and <slide>_tile_scores.csv (one row per tile: id, grid "
            "position, "
            "level-0 x/y, one column per gene, and feature_distance, the tile's distance to the model's "
            "training tiles, when the model has a feature reference). Warns when the slide is outside the "
            "model's training data or predictions leave the training targets' range."
        ),
    )
    p.add_argument("slide", help="whole-slide image (.svs, .tiff, .ndpi, ...)")
    p.add_argument(
        "--model",
        default=None,
        help="model bundle (.safetensors); default: the bundled demo model (synthetic slides)",
    )
    p.add_argument("--genes", default=None, help="comma-separated genes (default: all genes of the model)")
    p.add_argument("--out", default=".", help="output folder (default: current folder)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel, if the slide does not say")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_cache_dir_argument(p)
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import pandas as pd

    from .. import ood
    from ..feature_cache import load_or_extract
    from ..jobs import TextProgress
    from ..pipeline import load_model
    from ..safe_output import atomic_write_text, prepare_folder, refuse_existing, staged_folder
    from ..slide import open_slide

    out = Path(args.out)
    stem = Path(args.slide).stem
    slide_csv, tile_csv = out / f"{stem}_prediction.csv", out / f"{stem}_tile_scores.csv"
    refuse_existing([slide_csv, tile_csv], args.overwrite)  # before any work
    bundle = load_model(args.model)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    bundle.gene_index(genes)  # unknown genes fail before any feature extraction
    with open_slide(args.slide, mpp=args.mpp) as slide:
        prepare_folder(out)  # a read-only folder or a file of that name: said before the features
        grid, feats = load_or_extract(
            slide,
            bundle.backbone,
            tile_um=bundle.tile_um,
            cache_dir=args.cache_dir,
            device=args.device,
            progress=TextProgress("features"),
        )
    bundle.check_features(bundle.backbone, feats.shape[1], grid.tile_um)
    names = genes or bundle.genes
    slide_pred = pd.DataFrame({"gene": names, "prediction": bundle.slide_prediction(feats, names)})
    if bundle.demo:
        print(
            "he2rna: warning: DEMO model trained on synthetic slides; its predictions mean nothing "
            "on tissue.",
            file=sys.stderr,
        )
    assessment = ood.assess(bundle, feats, dict(zip(names, slide_pred["prediction"], strict=True)))
    if assessment.outside:
        print(f"he2rna: warning: {assessment.message}", file=sys.stderr)
    tile_genes = names if (genes or len(names) <= MAX_TILE_GENES_BY_DEFAULT) else None
    # Both files are committed together: an interrupted run leaves the earlier pair or the new one.
    with staged_folder(out, overwrite=args.overwrite) as stage:
        atomic_write_text(stage / slide_csv.name, slide_pred.to_csv(index=False, float_format="%.5f"))
        if tile_genes is not None:
            table = grid.table[["tile_id", "row", "col", "x", "y"]].reset_index(drop=True)
            scores = pd.DataFrame(bundle.tile_scores(feats, tile_genes), columns=tile_genes)
            if assessment.tile_distances is not None and ood.DISTANCE_COLUMN not in scores.columns:
                scores[ood.DISTANCE_COLUMN] = assessment.tile_distances
            tiles = pd.concat([table, scores], axis=1)
            atomic_write_text(stage / tile_csv.name, tiles.to_csv(index=False, float_format="%.5f"))
    print(f"{len(grid.table)} tiles; slide-level predictions: {slide_csv}")
    if tile_genes is None:
        print(f"per-tile scores not written for {len(names)} genes; choose some with --genes")
        return 0
    print(f"per-tile scores: {tile_csv}")
    if len(names) <= 20:
        print(slide_pred.to_string(index=False))
    return 0
