"""``he2rna train``: train an HE2RNA fold ensemble on a cohort and write one model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_expression_format_arguments, add_overwrite_argument, refuse_existing


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train HE2RNA on a cohort (cross-validated) and write a .safetensors model bundle",
        description=(
            "Train HE2RNA with patient-grouped, cancer-type-stratified cross-validation (one model per fold, "
            "early stopping on the per-gene, per-cancer-type validation R) on cached slide features, an "
            "expression table and a sample sheet (sample_id, patient_id, cancer_type, slide). Features "
            "missing "
            "from the cache are extracted first. Writes one model bundle with the fold ensemble and its "
            "out-of-fold validation R."
        ),
    )
    add_cohort_arguments(p)
    p.add_argument("--out", required=True, help="model bundle to write (.safetensors)")
    add_overwrite_argument(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--supertiles",
        dest="mode",
        action="store_const",
        const="supertiles",
        help="train on 100 supertiles per slide (default; the paper's first phase)",
    )
    mode.add_argument(
        "--tiles",
        dest="mode",
        action="store_const",
        const="tiles",
        help="train on all tiles of each slide (slower; batch 4, k up to 5000)",
    )
    p.set_defaults(mode="supertiles")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs per fold (default 200)")
    p.add_argument("--patience", type=int, default=50, help="early-stopping patience in epochs (default 50)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[1024, 1024],
        help="hidden layer sizes (default 1024 1024; the paper uses 256 256 for gene subsets)",
    )
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="slides per batch (default 16, or 4 with --tiles)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save each finished fold here; rerunning the same command resumes after the last one",
    )
    p.add_argument(
        "--init-model",
        default=None,
        help="fine-tune: start each fold from this bundle's fold model (e.g. supertiles -> --tiles)",
    )
    p.add_argument(
        "--demo", action="store_true", help="flag the bundle as a demo model (trained on synthetic slides)"
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="also evaluate (untrained null, corrections) and write the report into DIR",
    )
    p.add_argument("--null-inits", type=int, default=25, help="untrained inits for --report (default 25)")
    p.set_defaults(func=run)


def add_cohort_arguments(p: argparse.ArgumentParser, backbone: bool = True) -> None:
    """The cohort options shared by ``train`` and ``evaluate``."""
    p.add_argument(
        "--samples", required=True, help="sample sheet (TSV/CSV): sample_id, patient_id, cancer_type, slide"
    )
    p.add_argument(
        "--expression", required=True, help="expression table, samples x genes (TSV/CSV/parquet/h5ad)"
    )
    add_expression_format_arguments(p)
    p.add_argument("--features-dir", default=None, help="feature cache folder ($HE2RNA_CACHE when not given)")
    if backbone:
        p.add_argument(
            "--backbone",
            default="resnet50-imagenet",
            help="feature backbone (resnet50-imagenet, hed-stats, ...)",
        )
        p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def load_cohort(args: argparse.Namespace, backbone: str, tile_um: float, supertiles: bool, genes=None):
    """Expression + sample sheet + cached features, matched; prints what did not match."""
    from ..jobs import TextProgress
    from ..training import cohort_features, load_expression, load_samples, match_cohort

    expression = load_expression(
        args.expression, transform=args.expression_scale, genes_as_rows=args.genes_as_rows
    )
    samples = load_samples(args.samples)
    print(
        f"expression: {expression.shape[0]} samples x {expression.shape[1]} genes "
        f"(transform: {expression.attrs.get('transform')}; "
        f"{expression.attrs.get('n_genes_dropped_zero_median', 0)} genes with zero median dropped)"
    )
    feats, failed = cohort_features(
        samples,
        backbone,
        tile_um,
        args.features_dir,
        supertiles=supertiles,
        device=args.device,
        progress=TextProgress("features"),
    )
    for sid, why in list(failed.items())[:10]:
        print(f"he2rna: warning: no features for {sid}: {why}", file=sys.stderr)
    if len(failed) > 10:
        print(f"he2rna: warning: ... and {len(failed) - 10} more samples without features", file=sys.stderr)
    cohort, report = match_cohort(expression, samples, feats, genes=genes)
    print(report.summary())
    return cohort


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = Path(args.report) / "report.md" if args.report else None
    refuse_existing([out, out.with_suffix(".safetensors"), report], args.overwrite)
    import numpy as np

    from ..jobs import TextProgress
    from ..model import load_bundle, save_bundle
    from ..training import TrainConfig, bundle_metadata, cross_validate

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        out = out.with_suffix(".safetensors")
    init = load_bundle(args.init_model) if args.init_model else None
    backbone = init.backbone if init else args.backbone
    tile_um = init.tile_um if init else args.tile_um
    cohort = load_cohort(
        args, backbone, tile_um, args.mode == "supertiles", genes=init.genes if init else None
    )
    config = TrainConfig(
        mode=args.mode,
        hidden=tuple(init.hidden if init else args.hidden),
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience,
        n_folds=init.n_folds if init else args.folds,
        seed=args.seed,
        device=args.device,
    )
    folds = None
    if init is not None:
        fold_map = init.metadata.get("folds") or {}
        if all(s in fold_map for s in cohort.sample_ids):
            folds = np.array([fold_map[s] for s in cohort.sample_ids])  # keep each sample in its fold
    result = cross_validate(
        cohort,
        config,
        progress=TextProgress("training (epochs)"),
        checkpoint_dir=args.checkpoint_dir,
        initial_models=init.to_modules() if init else None,
        folds=folds,
    )
    dim = result.models[0].input_dim
    meta = bundle_metadata(result, cohort, {"fine_tuned_from": str(args.init_model)} if init else None)
    save_bundle(out, result.models, cohort.genes, backbone, dim, tile_um, config.k_list, meta, demo=args.demo)
    vals = [v for per in meta["validation_r"].values() for v in per.values() if v is not None]
    print(
        f"model bundle: {out} ({len(cohort.genes)} genes, {len(result.models)} folds; "
        f"median out-of-fold R per gene and cancer type {np.median(vals) if vals else float('nan'):.3f})"
    )
    if args.report:
        from ..evaluation import evaluate, write_report
        from ..training import untrained_predictions

        null = untrained_predictions(
            cohort, config.hidden, args.null_inits, config.k_list, device=args.device
        )
        ev = evaluate(cohort.expression, result.oof, result.cancer_types, result.folds, null)
        print(f"report: {write_report(ev, args.report)}")
    return 0
