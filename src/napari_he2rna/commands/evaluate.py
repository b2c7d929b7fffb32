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
    p.add_argument(
        "--gene-roles",
        "--truth",
        dest="gene_roles",
        default=None,
        metavar="GENES_TSV",
        help=(
            "which genes are planted and which are controls (a table with `gene` and `role` columns, planted "
            "or control, and optionally `visible`: the genes.tsv of he2rna make-sample); prints per cancer "
            "type the planted genes and controls found significant and the median R of the planted genes, "
            "and writes planted_truth.csv and a section of report.md"
        ),
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not train the ridge baseline on the same folds for the side-by-side table",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_existing([Path(args.out) / "report.md", Path(args.out) / "per_gene.csv"], args.overwrite)
    import numpy as np

    from ..model.bundle import load_bundle
    from ..model.cohort_prediction import bundle_oof_predictions
    from ..model.evaluation import read_gmt, write_report
    from ..model.fitting import evaluate_result, fit, null_predictions
    from ..model.planted_truth import read_gene_roles
    from ..model.training import TrainConfig
    from .train import load_cohort, print_summary

    roles = read_gene_roles(args.gene_roles) if args.gene_roles else None  # a bad file stops before any work
    bundle = load_bundle(args.model)
    if roles is not None:
        roles = check_roles(roles, bundle.genes)
    training = bundle.metadata.get("training") or {}
    mode = training.get("mode", "supertiles")
    cohort = load_cohort(args, bundle.backbone, bundle.tile_um, mode == "supertiles", genes=bundle.genes)
    pred, folds = bundle_oof_predictions(bundle, cohort, device=args.device)
    if (folds < 0).any():
        print(
            f"he2rna: warning: {(folds < 0).sum()} samples were not in the training folds; the whole "
            "ensemble predicts them (they count as one extra fold)."
        )
    is_ridge = bundle.aggregation == "mean"
    # The null is the untrained HE2RNA (for a ridge bundle: of the paper's supertile architecture).
    config = TrainConfig(
        mode=mode,
        hidden=tuple(bundle.hidden) if not is_ridge else (1024, 1024),
        dropout=bundle.dropout if not is_ridge else 0.25,
        ks=tuple(bundle.ks) if not is_ridge else None,
        standardize=bool(training.get("standardize", "input_standardization" in bundle.metadata)),
        n_folds=max(2, int(folds.max()) + 1),
        seed=args.seed,
        device=args.device,
    )
    null = null_predictions(cohort, config, args.null_inits, seed=args.seed + 12345)
    gene_sets = read_gmt(args.gene_sets) if args.gene_sets else None
    ev = evaluate_result(cohort, pred, folds, null, gene_sets, args.random_sets, args.alpha, args.seed)
    baseline = None
    if not is_ridge and not args.no_baseline and (folds >= 0).all():
        base = fit(cohort, "ridge", config, folds=np.asarray(folds))
        baseline = evaluate_result(
            cohort, base.oof, base.folds, null, gene_sets, args.random_sets, args.alpha, args.seed
        )
    name = "ridge baseline" if is_ridge else "HE2RNA"
    if bundle.linear_genes:
        name = "ensemble (HE2RNA + linear)" if bundle.linear_weight < 1 else "HE2RNA with linear genes"
    title = f"{name} evaluation" + (" (DEMO model, synthetic slides)" if bundle.demo else "")
    report = write_report(ev, args.out, title=title, baseline=baseline, names=(name, "ridge baseline"))
    print_summary(ev, {"ridge": baseline} if baseline is not None else None, name)
    if roles is not None:
        from ..model.planted_truth import split_text, truth_split_table, write_truth_split

        table = truth_split_table({name: ev, "ridge baseline": baseline} if baseline else {name: ev}, roles)
        print(split_text(table, roles))
        write_truth_split(args.out, table, roles)
    print(f"report: {report}")
    return 0


def check_roles(roles, genes):
    """The gene roles restricted to the model's genes; a one-sentence error when they share none, a note
    when some of the model's genes have no role."""
    from ..errors import DataError

    kept = roles.restrict(genes)
    n = len(kept.planted) + len(kept.not_visible) + len(kept.controls)
    if n == 0:
        raise DataError(
            f"None of the model's {len(genes)} genes is in {roles.source}: is it the genes.tsv of this "
            "cohort?"
        )
    if n < len(genes):
        print(
            f"he2rna: note: {len(genes) - n} of the model's {len(genes)} genes have no role in "
            f"{roles.source}."
        )
    return kept
