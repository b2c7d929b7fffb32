"""``he2rna spatialize``: the headless main job (tile scores CSV, one heatmap PNG per gene/set, slide CSV)."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "spatialize",
        help="run a model on a slide and write per-tile scores (CSV, GeoJSON) and heatmap PNGs",
        description=(
            "Run an HE2RNA model on a slide: tile it, extract (or reuse cached) features, score every "
            "tile for the chosen genes and gene sets, and write <slide>_tile_scores.csv (one row per tile), "
            "<slide>_tile_scores_slide.csv (slide-level predictions), <slide>_tiles.geojson (QuPath tiles "
            "with measurements) and one <slide>_<gene>.png heatmap per gene or set."
        ),
    )
    p.add_argument("slide", help="whole-slide image (.svs, .tiff, .ndpi, ...)")
    p.add_argument(
        "--model",
        default=None,
        help="model bundle (.safetensors); default: the bundled demo model (trained on synthetic slides)",
    )
    p.add_argument(
        "--genes",
        required=True,
        help='comma-separated genes and/or gene sets, e.g. CD3D,MKI67,"T cells" '
        "(built-in sets: T cells, B cells, epithelium, proliferation)",
    )
    p.add_argument(
        "--gene-sets",
        default=None,
        metavar="SPEC",
        help="extra gene sets: 'name=G1+G2;other=G3' or a .json / .gmt file",
    )
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel, if the slide does not say")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="feature device")
    p.add_argument("--cache-dir", default=None, help="feature cache folder ($HE2RNA_CACHE when not given)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-geojson", action="store_true", help="do not write the QuPath GeoJSON tiles")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs import TextProgress
    from ..pipeline import spatialize
    from ..spatial import PartialGeneSetWarning, split_names

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", PartialGeneSetWarning)
        result = spatialize(
            args.slide,
            args.model,
            split_names(args.genes),
            args.out,
            mpp=args.mpp,
            device=args.device,
            cache_dir=args.cache_dir,
            progress=TextProgress("features"),
            overwrite=args.overwrite,
            gene_sets=args.gene_sets,
            geojson=not args.no_geojson,
        )
    for w in seen:
        if issubclass(w.category, PartialGeneSetWarning):
            print(f"he2rna: warning: {w.message}", file=sys.stderr)
    if result.demo:
        print(
            "he2rna: warning: DEMO model trained on synthetic slides; its scores mean nothing on tissue.",
            file=sys.stderr,
        )
    if result.assessment is not None and result.assessment.outside:
        print(f"he2rna: warning: {result.assessment.message}", file=sys.stderr)
    print(f"{result.n_tiles} tiles scored for {', '.join(result.scores.columns)} on {result.slide_path.name}")
    print(f"tile scores:  {result.csv_path}")
    print(f"slide-level:  {result.slide_csv_path}")
    if result.geojson_path is not None:
        print(f"QuPath tiles: {result.geojson_path}")
    for name, path in result.png_paths.items():
        print(f"heatmap {name}: {path}")
    for name, value in result.predictions.items():
        print(f"slide prediction {name}: {value:.3f} (log10(1+FPKM-UQ))")
    return 0
