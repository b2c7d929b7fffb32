"""``he2rna train``: train an HE2RNA fold ensemble on a cohort and write one model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import (
    add_cache_dir_argument,
    add_expression_format_arguments,
    add_overwrite_argument,
    add_slide_column_argument,
    refuse_existing,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train HE2RNA (or the linear baseline) on a cohort, cross-validated; write a model bundle",
        description=(
            "Train HE2RNA with patient-grouped, cancer-type-stratified cross-validation (one model per fold; "
            "inputs standardised on each fold's training samples; early stopping on a validation split of "
            "the training patients) on cached slide features, an expression table and a sample sheet "
            "(sample_id, patient_id, cancer_type, slide). Features missing from the cache are extracted "
            "first. By default (--model-type ensemble) the linear baseline (ridge on the slide-mean "
            "feature) is trained on the same folds, HE2RNA's tile scores are held near its map (--anchor 1), "
            "and the two are averaged tile by tile, and the command "
            "says for how many genes the linear baseline alone would be better; --model-type he2rna or ridge "
            "trains one of them alone. Writes one model bundle with the fold ensemble and its out-of-fold R."
        ),
    )
    add_cohort_arguments(p)
    p.add_argument("--out", required=True, help="model bundle to write (.safetensors)")
    add_overwrite_argument(p)
    p.add_argument(
        "--model-type",
        choices=["ensemble", "he2rna", "ridge"],
        default="ensemble",
        help="ensemble (default: the linear baseline and HE2RNA, held near its map by --anchor, trained on "
        "the same folds, each tile scored by their mean, aggregated as HE2RNA's; the best of the rules "
        "measured on small cohorts, see docs/training.md), he2rna (per-tile MLP, top-k aggregation: the "
        "paper's model alone) or ridge "
        "(linear baseline on the slide-mean feature, applied to every tile for heatmaps)",
    )
    p.add_argument(
        "--linear-weight",
        type=float,
        default=0.5,
        help="the linear baseline's share of each tile score in the ensemble, in (0, 1) (default 0.5; 0.75 "
        "found more planted genes on the 40-60-slide cohorts of docs/training.md, chosen after the fact)",
    )
    p.add_argument(
        "--anchor",
        type=float,
        default=None,
        help="hold HE2RNA's tile scores near the linear baseline's map while training: this weight times "
        "their mean squared difference per tile and gene is added to the loss (the linear baseline is "
        "trained first, on the same folds). Default 1 with --model-type ensemble (measured better than 0 "
        "on the small cohorts of docs/training.md), 0 with --model-type he2rna (the paper's model)",
    )
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
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of each fold's training patients kept for early stopping (default: 0.1 when every "
        "cancer type then gets at least 5 validation samples, else 0; 0: no early stopping, all epochs run)",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help="the k list of the top-k aggregation (default 50 100 with --supertiles, the paper's "
        "10 20 50 100 200 500 1000 2000 5000 with --tiles; the paper's supertile list: 1 2 5 10 20 50 100)",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[1024, 1024],
        help="hidden layer sizes (default 1024 1024; the paper uses 256 256 for gene subsets)",
    )
    p.add_argument("--dropout", type=float, default=0.25, help="dropout between layers (default 0.25)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (default 0)")
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
        help="also evaluate (untrained null, corrections, the ridge baseline on the same folds) into DIR",
    )
    p.add_argument("--null-inits", type=int, default=25, help="untrained inits for --report (default 25)")
    p.set_defaults(func=run)


def add_cohort_arguments(p: argparse.ArgumentParser, backbone: bool = True) -> None:
    """The cohort options shared by ``train`` and ``evaluate``."""
    p.add_argument(
        "--samples", required=True, help="sample sheet (TSV/CSV): sample_id, patient_id, cancer_type, slide"
    )
    add_slide_column_argument(p)
    p.add_argument(
        "--expression", required=True, help="expression table, samples x genes (TSV/CSV/parquet/h5ad)"
    )
    add_expression_format_arguments(p)
    add_cache_dir_argument(p)
    if backbone:
        p.add_argument(
            "--backbone",
            default="resnet50-imagenet",
            help="feature backbone (resnet50-imagenet, hed-stats, ...)",
        )
        p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def load_cohort(args: argparse.Namespace, backbone: str, tile_um: float, supertiles: bool, genes=None):
    """Expression + sample sheet + cached features, matched; prints what did not match or was left out."""
    from ..cohorts.cohort import (
        cohort_features,
        dropped_genes_summary,
        load_expression,
        load_samples,
        match_cohort,
    )
    from ..jobs import TextProgress

    expression = load_expression(
        args.expression, transform=args.expression_scale, genes_as_rows=args.genes_as_rows
    )
    samples = load_samples(args.samples, args.slide_column)
    print(
        f"expression: {expression.shape[0]} samples x {expression.shape[1]} genes "
        f"(transform: {expression.attrs.get('transform')})"
    )
    dropped = dropped_genes_summary(expression)
    if dropped:
        print(f"he2rna: warning: {dropped}", file=sys.stderr)
    feats, failed = cohort_features(
        samples,
        backbone,
        tile_um,
        args.cache_dir,
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
    from ..model.bundle import load_bundle
    from ..model.fitting import fit, save_result
    from ..model.training import TrainConfig

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        out = out.with_suffix(".safetensors")
    init = load_bundle(args.init_model) if args.init_model else None
    if init is not None and init.aggregation != "topk":
        from ..errors import DataError

        raise DataError(
            f"{args.init_model} is a {init.aggregation}-aggregation baseline; "
            "only HE2RNA bundles can be fine-tuned."
        )
    if not 0.0 < args.linear_weight < 1.0:
        from ..errors import DataError

        raise DataError(
            f"--linear-weight must lie between 0 and 1 (not {args.linear_weight:g}); --model-type ridge or "
            "he2rna trains one model alone."
        )
    if args.anchor is None:
        args.anchor = 1.0 if args.model_type == "ensemble" else 0.0
    if args.anchor and args.model_type == "ridge":
        from ..errors import DataError

        raise DataError("--anchor holds HE2RNA near the linear baseline; the ridge baseline has no anchor.")
    backbone = init.backbone if init else args.backbone
    tile_um = init.tile_um if init else args.tile_um
    cohort = load_cohort(
        args, backbone, tile_um, args.mode == "supertiles", genes=init.genes if init else None
    )
    config = TrainConfig(
        mode=args.mode,
        hidden=tuple(init.hidden if init else args.hidden),
        dropout=args.dropout,
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience,
        val_fraction=args.val_fraction,
        ks=tuple(args.ks) if args.ks else (tuple(init.ks) if init else None),
        n_folds=init.n_folds if init else args.folds,
        seed=args.seed,
        weight_decay=args.weight_decay,
        anchor=args.anchor,
        device=args.device,
    )
    folds = None
    if init is not None:
        fold_map = init.metadata.get("folds") or {}
        if all(s in fold_map for s in cohort.sample_ids):
            folds = np.array([fold_map[s] for s in cohort.sample_ids])  # keep each sample in its fold
    result = fit(
        cohort,
        args.model_type,
        config,
        folds=folds,
        progress=TextProgress("training (epochs)" if args.model_type != "ridge" else "ridge (folds)"),
        checkpoint_dir=args.checkpoint_dir,
        initial_models=init.fold_modules()[0] if init else None,  # an ensemble: its HE2RNA part
        log=print,
        linear_weight=args.linear_weight,
    )
    extra = {"fine_tuned_from": str(args.init_model)} if init else None
    save_result(result, cohort, out, backbone, tile_um, extra, demo=args.demo)
    from ..model.evaluation import pearson_by_type

    r = pearson_by_type(cohort.expression.to_numpy(), result.oof.to_numpy(), result.cancer_types).to_numpy()
    print(
        f"model bundle: {out} ({args.model_type}, {len(cohort.genes)} genes, {len(result.models)} folds; "
        f"median out-of-fold R per gene and cancer type "
        f"{np.nanmedian(r) if np.isfinite(r).any() else float('nan'):.3f})"
    )
    if args.report:
        write_train_report(args, cohort, config, result)
    return 0


MODEL_NAMES = {"ensemble": "ensemble (HE2RNA + linear)", "he2rna": "HE2RNA", "ridge": "ridge baseline"}


def write_train_report(args: argparse.Namespace, cohort, config, result) -> None:
    """``--report``: the evaluation of the trained model beside the ridge baseline on the same folds (and, for
    the ensemble, beside HE2RNA alone, with every gene's R for the three models)."""
    from ..model.evaluation import comparison_table, write_report
    from ..model.fitting import evaluate_result, fit, null_predictions
    from ..model.gene_comparison import comparison_markdown, null_strength_notes
    from ..safe_output import atomic_write_text

    null = null_predictions(cohort, config, args.null_inits)
    ev = evaluate_result(cohort, result.oof, result.folds, null)
    others = {}
    if args.model_type == "ensemble":
        both = result.comparison
        he2rna_name = f"HE2RNA (--anchor {both.anchor:g})" if both.anchor else "HE2RNA"
        others[he2rna_name] = evaluate_result(cohort, both.oof_he2rna, result.folds, null)
        others["ridge"] = evaluate_result(cohort, both.oof_linear, result.folds, null)
    elif args.model_type == "he2rna":
        base = fit(cohort, "ridge", config, folds=result.folds)
        others["ridge"] = evaluate_result(cohort, base.oof, base.folds, null)
    name = MODEL_NAMES[args.model_type]
    baseline = others.get("ridge")
    names = (name, "ridge baseline" if baseline is not None else "")
    path = write_report(ev, args.report, title=f"{name} evaluation", baseline=baseline, names=names)
    extra = [f"- {note}" for note in null_strength_notes(ev.summary)]
    if extra:
        extra = ["## How strong the untrained null is", "", *extra, ""]
    if args.model_type == "ensemble":
        table = comparison_table({name: ev, **others})
        atomic_write_text(Path(args.report) / "comparison_all.csv", table.to_csv(index=False))
        genes_csv = result.comparison.table().to_csv(index=False)
        atomic_write_text(Path(args.report) / "gene_models.csv", genes_csv)
        extra += [
            comparison_markdown(result.comparison),
            "The three models side by side, same folds, same null (comparison_all.csv):",
            "",
            _markdown_table(table),
            "",
        ]
    if extra:
        text = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + "\n".join(extra)
        atomic_write_text(path, text)
    print_summary(ev, {**others} if others else None, name)
    for note in null_strength_notes(ev.summary):
        print(f"he2rna: note: {note}", file=sys.stderr)
    print(f"report: {path}")


def _markdown_table(df) -> str:
    cols = list(df.columns)
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in df.itertuples(index=False):
        rows.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rec) + " |")
    return "\n".join(rows)


def print_summary(ev, others=None, name: str = "HE2RNA") -> None:
    """The per-type figures on stdout (side by side with the other models when there are some)."""
    from ..model.evaluation import SUMMARY_COLUMNS, comparison_table, small_fold_warning

    if others:
        print(comparison_table({name: ev, **others}).to_string(index=False))
    else:
        cols = [c for c in SUMMARY_COLUMNS if c in ev.summary]
        print(ev.summary[cols].to_string(index=False))
    warning = small_fold_warning(ev)
    if warning:
        print(f"he2rna: warning: {warning}", file=sys.stderr)
