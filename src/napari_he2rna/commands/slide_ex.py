"""``he2rna slide-ex``: SLIDE-EX, cell-type-specific expression and abundance from slides (nested CV)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import (
    add_cache_dir_argument,
    add_overwrite_argument,
    add_slide_column_argument,
    refuse_existing,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "slide-ex",
        help="SLIDE-EX: predict deconvolved cell-type expression and abundances from slides (nested CV)",
        description=(
            "Train, from cached slide features (supertiles), one HE2RNA regressor per cell type for its "
            "deconvolved expression (e.g. CODEFACS output: one samples x genes table per cell type), one for "
            "the cell-type abundances, and optionally the direct responder classifier baseline, each with "
            "nested cross-validation: outer patient-grouped folds only evaluate; inner patient-grouped folds "
            "choose the hidden width and the number of epochs. Writes per cell type the per-gene Pearson R "
            "on the outer test folds and the significant genes (untrained-network null, Holm-Sidak), the "
            "responder ROC AUC over patients, and model bundles whose genes are named '<cell type> <gene>' "
            '(paint them with `he2rna spatialize --genes "fibroblast COL1A1"` or the napari Model widget).'
        ),
    )
    p.add_argument(
        "--samples", required=True, help="sample sheet (TSV/CSV): sample_id, patient_id, cancer_type, slide"
    )
    add_slide_column_argument(p)
    p.add_argument(
        "--celltype-expression",
        default=None,
        metavar="DIR",
        help="folder with one table per cell type, <cell type>.tsv or .csv (samples x genes, first column "
        "the sample id)",
    )
    p.add_argument(
        "--abundance",
        default=None,
        metavar="FILE",
        help="cell-type abundances, samples x cell types (TSV/CSV)",
    )
    p.add_argument(
        "--responders",
        default=None,
        metavar="FILE",
        help="table with sample_id and a responder label: also train the direct responder classifier",
    )
    p.add_argument(
        "--label-column", default="responder", help="label column of --responders (default responder)"
    )
    p.add_argument("--positive", default=None, help="value of the label meaning responder (default 1/True)")
    p.add_argument(
        "--cell-types", nargs="+", default=None, help="only these cell types (default: every table)"
    )
    p.add_argument(
        "--expression-scale",
        choices=["auto", "raw", "log"],
        default="auto",
        help="raw FPKM (log10(1+x) applied), already log, or auto (raw if any value > 50), per table",
    )
    p.add_argument(
        "--keep-zero-median",
        action="store_true",
        help="keep genes whose median in a cell type is 0 (dropped by default)",
    )
    p.add_argument("--out", required=True, help="output folder (models/, tables, report.md)")
    add_overwrite_argument(p)
    add_cache_dir_argument(p)
    p.add_argument(
        "--backbone", default="resnet50-imagenet", help="feature backbone (resnet50-imagenet, hed-stats)"
    )
    p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    p.add_argument("--outer-folds", type=int, default=5, help="outer (evaluation) folds (default 5)")
    p.add_argument("--inner-folds", type=int, default=3, help="inner (model choice) folds (default 3)")
    p.add_argument(
        "--widths", type=int, nargs="+", default=[16, 64], help="hidden widths tried (default 16 64)"
    )
    p.add_argument("--layers", type=int, default=2, help="hidden layers of that width (default 2)")
    p.add_argument(
        "--epochs", type=int, nargs="+", default=[10, 30, 60], help="epoch counts tried (default 10 30 60)"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--dropout", type=float, default=0.25, help="dropout between layers (default 0.25)")
    p.add_argument("--batch-size", type=int, default=16, help="slides per minibatch (default 16)")
    p.add_argument(
        "--null-inits", type=int, default=100, help="untrained inits for the significance null (default 100)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after correction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the networks are tiny)"
    )
    p.add_argument(
        "--demo", action="store_true", help="flag the bundles as demo models (trained on synthetic slides)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_existing([out / "summary.csv", out / "per_gene.csv", out / "models"], args.overwrite)
    import torch

    from ..cohorts.cohort import cohort_features, dropped_genes_summary, load_samples
    from ..errors import DataError
    from ..jobs import TextProgress
    from ..slide_ex import NestedCVConfig, load_deconvolved, read_responders, run_slide_ex, write_slide_ex

    if args.celltype_expression is None and args.abundance is None:
        raise DataError("Give --celltype-expression and/or --abundance (the deconvolved targets).")
    targets = load_deconvolved(
        args.celltype_expression,
        args.abundance,
        cell_types=args.cell_types,
        transform=args.expression_scale,
        filter_zero_median=not args.keep_zero_median,
    )
    responders = (
        read_responders(args.responders, args.label_column, args.positive) if args.responders else None
    )
    samples = load_samples(args.samples, args.slide_column)
    for ct, tab in targets.expression.items():
        print(f"{ct}: {tab.shape[0]} samples x {tab.shape[1]} genes")
        dropped = dropped_genes_summary(tab)
        if dropped:
            print(f"he2rna: warning: {ct}: {dropped}", file=sys.stderr)
    if targets.abundance is not None:
        print(f"abundance: {targets.abundance.shape[0]} samples x {targets.abundance.shape[1]} cell types")
    for note in targets.notes:
        print(f"note: {note}")
    config = NestedCVConfig(
        outer_folds=args.outer_folds,
        inner_folds=args.inner_folds,
        widths=tuple(args.widths),
        layers=args.layers,
        epochs=tuple(args.epochs),
        dropout=args.dropout,
        lr=args.lr,
        batch_size=args.batch_size,
        null_inits=args.null_inits,
        alpha=args.alpha,
        seed=args.seed,
        device=args.device,
    )
    wanted = list(
        dict.fromkeys(targets.sample_ids + (list(responders.index) if responders is not None else []))
    )
    unknown = [s for s in wanted if s not in samples.index]
    if unknown:
        raise DataError(
            f"{len(unknown)} samples of the deconvolved/responder tables are not in "
            f"{Path(args.samples).name} (e.g. {unknown[:3]}); every sample needs a patient id."
        )
    feats, failed = cohort_features(
        samples.loc[wanted],
        args.backbone,
        args.tile_um,
        args.cache_dir,
        supertiles=True,
        device=args.device,
        progress=TextProgress("features"),
    )
    for sid, why in list(failed.items())[:10]:
        print(f"he2rna: warning: no features for {sid}: {why}", file=sys.stderr)
    n_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    try:
        result = run_slide_ex(feats, samples, targets, responders, config, progress=TextProgress("networks"))
    finally:
        torch.set_num_threads(n_threads)
    paths = write_slide_ex(result, args.out, args.backbone, args.tile_um, demo=args.demo)

    summary = result.summary()
    if not summary.empty:
        print("outer-test Pearson R per target and cancer type (significant: Holm-Sidak):")
        for _, row in summary.iterrows():
            sig = row.get("n_significant_holm_sidak")
            sig_txt = (
                f", {sig}/{row['n_outputs']} significant ({row['significant'] or 'none'})"
                if sig is not None
                else ""
            )
            print(f"  {row['target']} [{row['cancer_type']}]: mean R {row['mean_r']:.3f}{sig_txt}")
    if result.responder_evaluation:
        ev = result.responder_evaluation
        print(
            f"responder classifier: patient-level AUC {ev['auc_patients']} "
            f"(Mann-Whitney p {ev['p_mann_whitney']}, {ev['n_patients']} patients)"
        )
    for key, path in paths.items():
        if key.startswith("model:"):
            print(f"model bundle {key.split(':', 1)[1]}: {path}")
    print(f"report: {paths['report']}")
    return 0
