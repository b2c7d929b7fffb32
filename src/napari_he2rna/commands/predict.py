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
    from ..maps import spatial
    from ..maps.session import output_paths as spatialize_paths

    paths = spatialize_paths(slide, [], out, geojson=False)
    stem = Path(slide).stem
    return {
        "slide_csv": Path(out) / f"{stem}_prediction.csv",
        "csv": paths["csv"],
        "metadata": spatial.tile_metadata_path(paths["csv"]),
        "h5ad": paths["h5ad"],
    }


def run(args: argparse.Namespace) -> int:
    import sys

    import pandas as pd

    from ..maps import readout
    from ..maps import spatial
    from ..features.cache import load_or_extract
    from ..jobs import TextProgress
    from ..safe_output import atomic_write_text, prepare_folder, refuse_existing, staged_folder
    from ..maps.session import SlideSession, load_model
    from ..slides.slide import open_slide

    out = Path(args.out)
    paths = output_paths(args.slide, out)
    refuse_existing(paths.values(), args.overwrite)  # before any work
    bundle = load_model(args.model)
    gene_sets = spatial.parse_gene_sets(args.gene_sets) if args.gene_sets is not None else None
    # unknown genes fail before any feature extraction; the syntax of spatialize and the Model dock (a set
    # partly missing from the model warns, through the CLI's one-line warnings)
    resolved = (
        spatial.resolve_names(bundle.genes, spatial.split_names(args.genes), gene_sets)
        if args.genes
        else {g: [g] for g in bundle.genes}
    )
    names = list(resolved)
    genes = list(dict.fromkeys(g for members in resolved.values() for g in members))
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
        session = SlideSession(slide, bundle)  # for the tile exports' metadata, as spatialize writes it
        session.set_features(grid, feats, bundle.backbone)
        gene_preds = dict(zip(genes, (float(v) for v in bundle.slide_prediction(feats, genes)), strict=True))
        predictions = [float(pd.Series([gene_preds[g] for g in resolved[n]]).mean()) for n in names]
        slide_pred = pd.DataFrame({"gene": names, "prediction": predictions})
        if bundle.demo:
            print(
                "he2rna: warning: DEMO model trained on synthetic slides; its predictions mean nothing "
                "on tissue.",
                file=sys.stderr,
            )
        assessment = session.assessment(gene_preds)
        if assessment.outside:
            print(f"he2rna: warning: {assessment.message}", file=sys.stderr)
        tile_names = names if (args.genes or len(names) <= MAX_TILE_GENES_BY_DEFAULT) else None
        # The files are committed together: an interrupted run leaves the earlier set or the new one.
        with staged_folder(out, overwrite=args.overwrite) as stage:
            atomic_write_text(
                stage / paths["slide_csv"].name, slide_pred.to_csv(index=False, float_format="%.5f")
            )
            if tile_names is not None:
                scores = session.scores_with_distance(spatial.score_resolved(bundle, feats, resolved))
                units = readout.output_unit(bundle)
                preds = pd.Series(dict(zip(names, predictions, strict=True)), dtype=float)
                info = session.slide_info()
                spatial.write_tile_scores_csv(
                    stage / paths["csv"].name, grid, scores, info, preds, units=units, side_file=False
                )
                meta = spatial.tile_metadata(grid, list(scores.columns), info, preds, units)
                spatial.write_anndata(stage / paths["h5ad"].name, grid, scores, meta)
    print(f"{len(grid.table)} tiles; slide-level predictions: {paths['slide_csv']}")
    if tile_names is None:
        print(f"per-tile scores not written for {len(names)} genes; choose some with --genes")
        return 0
    print(f"per-tile scores: {paths['csv']} (metadata: {paths['metadata'].name}, AnnData: {paths['h5ad']})")
    if len(names) <= 20:
        print(slide_pred.to_string(index=False))
    return 0
