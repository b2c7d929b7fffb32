"""``he2rna make-demo-model``: rebuild the bundled demo model from the synthetic sample cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_overwrite_argument, refuse_existing


def register(subparsers) -> None:
    from ..model.demo import (
        DEFAULT_EPOCHS,
        DEFAULT_HIDDEN,
        DEFAULT_LR,
        DEFAULT_N_SLIDES,
        DEFAULT_NULL_INITS,
        DEFAULT_PATIENCE,
        DEFAULT_SIZE_PX,
    )

    p = subparsers.add_parser(
        "make-demo-model",
        help="generate the synthetic cohort, train and evaluate the demo model (flagged demo)",
        description=(
            "Rebuild the bundled demo model with the package's own pipeline: generate a synthetic cohort "
            "with planted truth (make-sample), extract hed-stats features, train HE2RNA with patient-grouped "
            "5-fold cross-validation, test every gene against the untrained architecture (Holm-Sidak and "
            "Benjamini-Hochberg per cancer type) and write a model bundle flagged 'demo' plus its report. "
            "Deterministic from --seed; about ten minutes on two CPU cores with the defaults. The model "
            "means nothing on real tissue."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="model bundle to write (.safetensors)")
    add_overwrite_argument(p)
    p.add_argument(
        "--work",
        required=True,
        type=Path,
        metavar="DIR",
        help="scratch folder for the cohort, the feature cache and fold checkpoints (reused by a rerun)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="evaluation report folder (default: <out stem>_report next to the bundle)",
    )
    p.add_argument(
        "--n-slides", type=int, default=DEFAULT_N_SLIDES, help=f"cohort size (default {DEFAULT_N_SLIDES})"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of cohort and training (default 0)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=DEFAULT_SIZE_PX,
        metavar=("W", "H"),
        help=f"slide size in px at 0.5 µm/px (default {DEFAULT_SIZE_PX[0]} {DEFAULT_SIZE_PX[1]})",
    )
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(DEFAULT_HIDDEN),
        help="hidden layer sizes (default 256 256)",
    )
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"max epochs per fold (default {DEFAULT_EPOCHS})"
    )
    p.add_argument(
        "--patience", type=int, default=DEFAULT_PATIENCE, help=f"early stopping (default {DEFAULT_PATIENCE})"
    )
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR})")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--null-inits",
        type=int,
        default=DEFAULT_NULL_INITS,
        help=f"untrained inits for the significance test (default {DEFAULT_NULL_INITS})",
    )
    p.add_argument("--device", default="cpu", help="cpu (default: reproducible bytes), cuda or auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out.with_suffix(".safetensors")
    report = args.report or out.with_name(f"{out.stem}_report")
    refuse_existing([out, Path(report) / "report.md"], args.overwrite)
    from ..jobs import TextProgress
    from ..model.demo import build_demo_model, significance_counts

    out, ev = build_demo_model(
        args.out,
        args.work,
        n_slides=args.n_slides,
        seed=args.seed,
        size_px=tuple(args.size),
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        n_folds=args.folds,
        null_inits=args.null_inits,
        report_dir=args.report,
        device=args.device,
        progress=TextProgress("demo model"),
    )
    cols = [
        c
        for c in ("cancer_type", "n_samples", "mean_r", "n_significant_holm_sidak", "n_significant_bh")
        if c in ev.summary
    ]
    print(ev.summary[cols].to_string(index=False))
    for ctype, c in significance_counts(ev.per_gene).items():
        print(
            f"{ctype}: {c['planted_significant']}/{c['planted']} planted genes and "
            f"{c['controls_significant']}/{c['controls']} housekeeping controls significant (Holm-Sidak)"
        )
    report = args.report or out.with_name(f"{out.stem}_report")
    print(f"demo model bundle: {out}\nreport: {Path(report) / 'report.md'}")
    return 0
