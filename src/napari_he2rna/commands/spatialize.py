"""``he2rna spatialize``: the headless main job (tile scores CSV, one heatmap PNG per gene/set, slide CSV)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ._common import add_cache_dir_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "spatialize",
        help="run a model on a slide and write per-tile scores (CSV, GeoJSON) and heatmap PNGs",
        description=(
            "Run an HE2RNA model on a slide: tile it, extract (or reuse cached) features, score every "
            "tile for the chosen genes and gene sets, and write <slide>_tile_scores.csv (one row per tile), "
            "<slide>_tile_scores_slide.csv (slide-level predictions), <slide>_tile_scores.json (slide, mpp, "
            "tile size, model, units, ...), <slide>_tiles.h5ad (AnnData), <slide>_tiles.geojson (QuPath "
            "tiles with measurements) and one <slide>_<gene>.png heatmap per gene or set."
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
        help='comma-separated genes and/or gene sets, e.g. CD3D,MKI67,"T cells",CD19+MS4A1,T=CD3D+CD3E '
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
    add_cache_dir_argument(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the slide's existing output files (an earlier run's files this run does not write, "
        "such as other genes' heatmaps, are removed)",
    )
    p.add_argument("--no-geojson", action="store_true", help="do not write the QuPath GeoJSON tiles")
    p.set_defaults(func=run)


def planned_outputs(args: argparse.Namespace) -> list[Path]:
    """The files ``spatialize`` will write into ``--out`` (known from the model's genes, before any work)."""
    from ..maps.gene_sets import PartialGeneSetWarning, is_distance_name, parse_request
    from ..maps.session import SlideSession, load_model
    from ..maps.spatialize import output_paths

    bundle = load_model(args.model)
    # as spatialize reads them: a set named like a gene or defined twice is refused here, before any work
    names, sets = parse_request(args.genes, args.gene_sets, bundle.genes)
    with SlideSession.open(args.slide, mpp=args.mpp, model=bundle) as session:
        session.add_gene_sets(sets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialGeneSetWarning)  # the run itself reports them
            pictured = list(session.resolve([n for n in names if not is_distance_name(n)]))
    pictured += [n for n in names if is_distance_name(n)][:1]
    paths = output_paths(args.slide, pictured, args.out, geojson=not args.no_geojson)
    return [
        paths["csv"],
        paths["slide_csv"],
        paths["metadata"],
        paths["h5ad"],
        *paths["png"].values(),
        paths["geojson"],
    ]


def run(args: argparse.Namespace) -> int:
    from ..jobs import TextProgress
    from ..maps.gene_sets import PartialGeneSetWarning
    from ..maps.output_set import slide_outputs
    from ..maps.spatialize import spatialize
    from ..safe_output import refuse_existing, staged_folder

    refuse_existing(planned_outputs(args), args.overwrite)  # before any work
    out = Path(args.out)
    earlier = slide_outputs(args.slide, out) if args.overwrite else []
    # The run writes into a staging folder; its files replace the old ones together at the end (and the
    # earlier run's files it does not write go in the same step), so an interrupted run leaves the earlier
    # set or the new one, never a mix. Warnings (cache repairs, partial gene sets, waiting for another
    # process's lock) are said as they come, one line each.
    with staged_folder(out, overwrite=args.overwrite, replaces=earlier) as stage, warnings.catch_warnings():
        warnings.simplefilter("always", PartialGeneSetWarning)
        result = spatialize(
            args.slide,
            args.model,
            args.genes,
            stage,
            mpp=args.mpp,
            device=args.device,
            cache_dir=args.cache_dir,
            progress=TextProgress("features"),
            overwrite=True,  # the staging folder is new; --overwrite is checked when committing
            gene_sets=args.gene_sets,
            geojson=not args.no_geojson,
        )

    def final(path: Path) -> Path:
        return out / Path(path).relative_to(stage)

    if result.demo:
        print(
            "he2rna: warning: DEMO model trained on synthetic slides; its scores mean nothing on tissue.",
            file=sys.stderr,
        )
    if result.assessment is not None and result.assessment.outside:
        print(f"he2rna: warning: {result.assessment.message}", file=sys.stderr)
    print(f"{result.n_tiles} tiles scored for {', '.join(result.scores.columns)} on {result.slide_path.name}")
    print(f"tile scores:  {final(result.csv_path)}")
    print(f"slide-level:  {final(result.slide_csv_path)}")
    print(f"metadata:     {final(result.metadata_path)}")
    print(f"AnnData:      {final(result.h5ad_path)}")
    if result.geojson_path is not None:
        print(f"QuPath tiles: {final(result.geojson_path)}")
    for name, path in result.png_paths.items():
        print(f"heatmap {name}: {final(path)}")
    for name, value in result.predictions.items():
        print(f"slide prediction {name}: {value:.3f} (log10(1+FPKM-UQ))")
    removed = [p.name for p in earlier if not p.exists()]
    if removed:
        print(f"removed (the earlier run's, not written by this one): {', '.join(removed)}")
    return 0
