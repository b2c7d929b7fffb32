"""``he2rna transfer``: the paper's hospital A/B experiment (does the transcriptomic representation help?)."""

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
    from ..transfer.params import DEFAULT_RATIOS, METHODS

    p = subparsers.add_parser(
        "transfer",
        help="hospital A/B experiment: classify MSI-H from slides with vs without the representation",
        description=(
            "Split the patients at random between hospital A (expression, no label) and hospital B (label, "
            "no expression) at each A:B ratio, each class alike. A learns the simple HE2RNA (3-fold CV; B's "
            "slides get the mean representation of the 3 fold models); B trains, with 3-fold patient-grouped "
            "CV, sigmoid-MLP classifiers on (a) the slide-mean feature (direct; hidden 256 128), (b) the "
            "256-d representation (hidden 128), (c) 256-d autoencoder codes (1024-256-1024) learnt on A or "
            "on B's training folds. Patients' samples are averaged; one ROC AUC over B's patients per split; "
            "splits are bootstrapped; methods are compared per ratio with a two-tailed Wilcoxon signed-rank "
            "test. Writes aucs.csv, summary.csv, summary.md, tests.csv, splits.csv.gz, config.json and "
            "transfer.png (like the paper's figure 6d/e) into --out."
        ),
    )
    p.add_argument(
        "--samples",
        required=True,
        help="sample sheet (TSV/CSV): sample_id, patient_id, cancer_type, slide and the label column",
    )
    add_slide_column_argument(p)
    p.add_argument("--expression", required=True, help="expression table, samples x genes (TSV/CSV/...)")
    add_expression_format_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="results folder")
    add_overwrite_argument(p)
    p.add_argument(
        "--label-column", default="msi_status", help="label column of the sheet (default msi_status)"
    )
    p.add_argument("--positive", default="MSI-H", help="value of the positive class (default MSI-H)")
    p.add_argument(
        "--negative",
        nargs="+",
        default=None,
        help="values of the negative class (default: every other value; the paper: MSS, MSI-L left out)",
    )
    p.add_argument(
        "--ratios",
        nargs="+",
        default=None,
        help="fractions of the patients in hospital A, e.g. 3/4 1/2 1/4 0 "
        f"(default: the paper's {' '.join(_fraction(r) for r in DEFAULT_RATIOS)})",
    )
    p.add_argument("--bootstrap", type=int, default=50, help="random A/B splits per ratio (default 50)")
    p.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods (default all)"
    )
    p.add_argument(
        "--cv-repeats", type=int, default=1, help="3-fold CVs averaged per split (paper 10; default 1)"
    )
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds at A and B (default 3)")
    p.add_argument("--epochs", type=int, default=50, help="epochs of every network (default 50)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="slides per batch (default 16)")
    p.add_argument("--rep-hidden", type=int, nargs="+", default=[1024, 256], help="simple HE2RNA (1024 256)")
    p.add_argument(
        "--direct-hidden", type=int, nargs="+", default=[256, 128], help="direct classifier (256 128)"
    )
    p.add_argument(
        "--code-hidden", type=int, nargs="+", default=[128], help="classifier on 256-d inputs (128)"
    )
    p.add_argument(
        "--ae-hidden", type=int, nargs=3, default=[1024, 256, 1024], help="autoencoder (1024 256 1024)"
    )
    p.add_argument(
        "--focus-ratio",
        default="3/4",
        help="A fraction of the figure's boxplots (default 3/4, as in figure 6e)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--features",
        default=None,
        metavar="TABLE",
        help="slide-mean features per sample (TSV/CSV/npz, first column sample_id) instead of the cache",
    )
    add_cache_dir_argument(p)
    p.add_argument(
        "--backbone", default="resnet50-imagenet", help="feature backbone (resnet50-imagenet, hed-stats)"
    )
    p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm (default 112)")
    p.add_argument(
        "--device",
        default="auto",
        help="feature extraction device (auto, cpu, cuda); the networks train on CPU unless cuda is given",
    )
    p.set_defaults(func=run)


def _fraction(r: float) -> str:
    from fractions import Fraction

    f = Fraction(r).limit_denominator(12)
    return str(f) if f.denominator > 1 else str(f.numerator)


def run(args: argparse.Namespace) -> int:
    refuse_existing([Path(args.out) / "aucs.csv", Path(args.out) / "summary.md"], args.overwrite)
    import numpy as np

    from ..cohorts.cohort import (
        dropped_genes_summary,
        find_column,
        genes_as_rows_hint,
        load_expression,
        load_samples,
    )
    from ..errors import DataError
    from ..jobs import TextProgress
    from ..transfer import (
        DEFAULT_RATIOS,
        TransferConfig,
        binary_labels,
        parse_ratio,
        patient_labels,
        run_transfer_experiment,
        write_transfer_results,
    )
    from .represent import mean_features

    ratios = [parse_ratio(r) for r in args.ratios] if args.ratios else list(DEFAULT_RATIOS)
    focus = parse_ratio(args.focus_ratio)
    config = TransferConfig(
        rep_hidden=tuple(args.rep_hidden),
        direct_hidden=tuple(args.direct_hidden),
        code_hidden=tuple(args.code_hidden),
        ae_hidden=tuple(args.ae_hidden),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        n_folds=args.folds,
        n_cv_repeats=args.cv_repeats,
        device="cuda" if str(args.device).startswith("cuda") else "cpu",
    )
    samples = load_samples(args.samples, args.slide_column)
    # the column as written (else the one that matches ignoring case); the sheet keeps its column names
    col = find_column(samples.columns, args.label_column.strip(), "The sample sheet", "label column")
    labels = binary_labels(samples[col], args.positive, args.negative)
    kept = samples.loc[labels >= 0].copy()
    kept["_label"] = labels[labels >= 0]
    print(
        f"labels: {int((kept['_label'] == 1).sum())} positive ({args.positive}), "
        f"{int((kept['_label'] == 0).sum())} negative, {int((labels < 0).sum())} samples left out"
    )
    expression = load_expression(
        args.expression, transform=args.expression_scale, genes_as_rows=args.genes_as_rows
    )
    dropped = dropped_genes_summary(expression)
    if dropped:
        print(f"he2rna: warning: {dropped}", file=sys.stderr)
    means = mean_features(kept, args, args.backbone, args.tile_um)
    ids = [s for s in kept.index if s in expression.index and s in means.index]
    lost = len(kept) - len(ids)
    if lost:
        print(
            f"he2rna: warning: {lost} labelled samples lack expression or features and are left out",
            file=sys.stderr,
        )
    if not ids:
        raise DataError(
            "No labelled sample is in the expression table and the features at once; check the ids."
            + genes_as_rows_hint(expression, list(kept.index))
        )
    patients = kept.loc[ids, "patient_id"].astype(str).to_numpy()
    y, conflicting = patient_labels(kept.loc[ids, "_label"].to_numpy(), patients)
    if conflicting:
        print(
            f"he2rna: warning: {len(conflicting)} patients have samples with different labels "
            f"(e.g. {', '.join(conflicting[:3])}); they count as positive",
            file=sys.stderr,
        )
    n_pat = len(set(patients))
    n_pos = len(set(patients[y == 1]))
    print(
        f"{len(ids)} samples, {n_pat} patients ({n_pos} positive, {n_pat - n_pos} negative), "
        f"{expression.shape[1]} genes, {means.shape[1]}-d features; "
        f"{len(ratios)} ratios x {args.bootstrap} splits"
    )
    result = run_transfer_experiment(
        means.loc[ids].to_numpy(np.float32),
        expression.loc[ids].to_numpy(np.float32),
        y,
        patients,
        ratios=ratios,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        config=config,
        methods=args.methods,
        sample_ids=ids,
        progress=TextProgress("transfer (splits)"),
    )
    paths = write_transfer_results(result, Path(args.out), focus_ratio=focus)
    summ = result.summary()
    if len(summ):
        table = summ.pivot_table(index="ratio", columns="method", values="mean", sort=False)
        table = table.sort_index(ascending=False)
        table.index = [f"{_fraction(r)}:{_fraction(1 - r)}" for r in table.index]
        print("mean ROC AUC on hospital B (A:B split):")
        print(table.round(3).to_string())
    rep_vs_direct = result.tests[
        (result.tests["method_1"] == "representation") & (result.tests["method_2"] == "direct")
    ]
    for _, t in rep_vs_direct.sort_values("ratio", ascending=False).iterrows():
        print(
            f"A:B {_fraction(t['ratio'])}:{_fraction(1 - t['ratio'])}: representation {t['mean_1']:.3f} "
            f"vs direct {t['mean_2']:.3f}, two-tailed Wilcoxon p = {t['p']:.2g} (n = {int(t['n'])} splits)"
        )
    print(f"results: {paths['summary_md'].parent} (figure {paths['figure'].name})")
    return 0
