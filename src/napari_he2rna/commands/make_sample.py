"""``he2rna make-sample OUT_DIR``: a synthetic H&E cohort with planted truth (see sample_data/README.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..jobs import TextProgress


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-sample",
        help="generate synthetic H&E slides with known truth (cells, masks, annotations, expression)",
        description=(
            "Write N synthetic H&E-like slides (tiled pyramidal TIFF, 0.5 µm/px) with their truth files "
            "(per-tile cell counts, QuPath CD3/CD20 tables, epithelium mask, tumour GeoJSON) and the cohort "
            "tables samples.tsv, expression.tsv (17 planted genes + --n-controls noise-only controls), "
            "cell_abundance.tsv and genes.tsv (each gene's role: planted with its driver, or control; what "
            "`he2rna evaluate --gene-roles` reads). Deterministic from --seed."
        ),
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write into (created)")
    parser.add_argument("--n-slides", type=int, default=30, help="number of slides (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(1792, 1792),
        metavar=("W", "H"),
        help="level-0 size of each slide in px (default 1792 1792 = 0.9 mm square)",
    )
    parser.add_argument(
        "--cancer-types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="cancer types to cycle through (default SYN-BRCA SYN-COAD SYN-LUAD)",
    )
    parser.add_argument(
        "--names",
        nargs="+",
        default=None,
        metavar="ID",
        help="sample ids to use instead of SYN-0000, SYN-0001, ... (one per slide)",
    )
    parser.add_argument(
        "--n-controls",
        type=int,
        default=20,
        metavar="N",
        help=(
            "noise-only control genes in expression.tsv (default 20: the housekeeping genes ACTB ... TUBB; "
            "more adds CTRL0001, CTRL0002, ...)"
        ),
    )
    parser.add_argument(
        "--phenotypes",
        nargs="+",
        default=None,
        metavar="NAME:SHARE",
        help=(
            "mix of immune phenotypes, each patient drawing one: mixed (aggregates with a B-cell core and "
            "a T-cell rim, stromal T cells, TILs), t-only (stromal and tumour-infiltrating T cells, no "
            "aggregate, no B cell), aggregates (aggregates, few T cells outside them); e.g. --phenotypes "
            "mixed:0.6 t-only:0.2 aggregates:0.2 (default: every patient mixed); samples.tsv then names each "
            "slide's phenotype"
        ),
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..model.planted_truth import read_gene_roles
    from ..synthetic import make_cohort  # numpy/scipy heavy: only when the command runs

    phenotypes = None
    if args.phenotypes:
        phenotypes = {}
        for item in args.phenotypes:
            name, _, share = item.partition(":")
            try:
                phenotypes[name] = float(share) if share else 1.0
            except ValueError:
                print(f"he2rna make-sample: error: --phenotypes {item!r} is not NAME:SHARE (e.g. t-only:1).")
                return 2
    progress = None if args.quiet else TextProgress("make-sample")
    info = make_cohort(
        args.out_dir,
        n_slides=args.n_slides,
        seed=args.seed,
        size_px=tuple(args.size),
        cancer_types=args.cancer_types,
        names=args.names,
        progress=progress,
        n_controls=args.n_controls,
        phenotypes=phenotypes,
    )
    n_patients = info.samples["patient_id"].nunique()
    print(f"wrote {len(info.samples)} slides of {n_patients} patients to {info.out_dir}")
    print(f"  samples.tsv, expression.tsv ({info.expression.shape[1]} genes), cell_abundance.tsv")
    roles = read_gene_roles(info.out_dir / "genes.tsv")
    print(f"  genes.tsv: {roles.describe()}")
    return 0
