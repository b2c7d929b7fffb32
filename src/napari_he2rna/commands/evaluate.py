"""``he2rna evaluate``: per-gene, per-cancer-type evaluation of a model bundle on its cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_overwrite_argument, refuse_existing


def register(subparsers) -> None:
    from .train import add_cohort_arguments

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle per gene and cancer type against the untrained null; write a report",
        description=(
            "Predict every sample of the cohort with the fold model that did not train on it, compute "
            "Pearson "
            "R per gene and per cancer type (averaged over folds), test it against the same architecture "
            "untrained (empirical p, Holm-Sidak and Benjamini-Hochberg per cancer type; Steiger test), test "
            "gene sets against random sets, and write CSV tables, plots and report.md into --out."
        ),
    )
    p.add_argument("--model", required=True, help="model bundle (.safetensors) written by he2rna train")
    add_cohort_arguments(p, backbone=False)
    p.add_argument("--out", required=True, help="report folder (created if needed)")
    add_overwrite_argument(p)
    p.add_argument(
        "--null-inits",
        type=int,
        default=25,
        help="random inits of the untrained model (default 25; the null pools them over genes)",
    )
    p.add_argument("--gene-sets", default=None, help="gene sets to test (.gmt, or TSV of set<TAB>gene)")
    p.add_argument(
        "--random-sets", type=int, default=10_000, help="random gene sets per test (default 10000)"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after correction")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing([Path(args.out) / "report.md", Path(args.out) / "per_gene.csv"], args.overwrite)
    from ..evaluation import evaluate, read_gmt, write_report
    from ..model import load_bundle
    from ..training import bundle_oof_predictions, untrained_predictions
    from .train import load_cohort

    bundle = load_bundle(args.model)
    mode = (bundle.metadata.get("training") or {}).get("mode", "supertiles")
    cohort = load_cohort(args, bundle.backbone, bundle.tile_um, mode == "supertiles", genes=bundle.genes)
    pred, folds = bundle_oof_predictions(bundle, cohort, device=args.device)
    if (folds < 0).any():
        print(
            f"he2rna: warning: {(folds < 0).sum()} samples were not in the training folds; the whole "
            "ensemble "
            "predicts them (they count as one extra fold)."
        )
    null = untrained_predictions(
        cohort,
        bundle.hidden,
        args.null_inits,
        bundle.ks,
        bundle.dropout,
        seed=args.seed + 12345,
        device=args.device,
    )
    types = cohort.samples.loc[cohort.sample_ids, "cancer_type"].to_numpy()
    gene_sets = read_gmt(args.gene_sets) if args.gene_sets else None
    ev = evaluate(
        cohort.expression,
        pred,
        types,
        folds,
        null,
        alpha=args.alpha,
        gene_sets=gene_sets,
        n_random_sets=args.random_sets,
        seed=args.seed,
    )
    title = "HE2RNA evaluation" + (" (DEMO model, synthetic slides)" if bundle.demo else "")
    report = write_report(ev, args.out, title=title)
    cols = [
        c
        for c in ("cancer_type", "n_samples", "mean_r", "n_significant_holm_sidak", "n_significant_bh")
        if c in ev.summary
    ]
    print(ev.summary[cols].to_string(index=False))
    print(f"report: {report}")
    return 0
