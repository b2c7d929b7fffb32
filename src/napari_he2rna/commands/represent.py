"""``he2rna represent``: train the simple HE2RNA; export the 256-d transcriptomic representation of slides."""

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
        "represent",
        help="train the simple HE2RNA (slide mean -> 1024 -> 256 -> genes), export slide representations",
        description=(
            "The transcriptomic representation of the paper's MSI experiment. With --expression: train the "
            "simple HE2RNA (input: the mean feature over all tiles of a slide; hidden 1024 and 256, sigmoid; "
            "linear output over the genes) with patient-grouped cross-validation (3 folds, 50 epochs, no "
            "tuning), print the out-of-fold per-gene R and write the fold models to --model (.safetensors). "
            "Without --expression: read --model. Then export the representation (the 256 sigmoid units, "
            "averaged over the fold models) of every slide of --samples or --slides, by default as "
            "<model stem>.representation.tsv in the feature cache folder, beside the features."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--samples", help="sample sheet (TSV/CSV): sample_id, patient_id, cancer_type, slide (as for train)"
    )
    add_slide_column_argument(p)
    src.add_argument("--slides", nargs="+", help="export only: slide files (sample id = file stem)")
    p.add_argument(
        "--features",
        default=None,
        metavar="TABLE",
        help="slide-mean features per sample (TSV/CSV/npz, first column sample_id) instead of the cache",
    )
    p.add_argument(
        "--expression",
        default=None,
        help="expression table, samples x genes (TSV/CSV/parquet/h5ad): train a model (else --model is read)",
    )
    add_expression_format_arguments(p)
    p.add_argument(
        "--model",
        required=True,
        help="representation model (.safetensors): written when training, read otherwise",
    )
    p.add_argument(
        "--out",
        default=None,
        help="representation file (.tsv/.csv/.npz; default <features dir>/<model stem>.representation.tsv)",
    )
    p.add_argument("--no-export", action="store_true", help="train and save the model only")
    add_overwrite_argument(p)
    add_cache_dir_argument(p)
    p.add_argument(
        "--backbone",
        default="resnet50-imagenet",
        help="feature backbone when training (resnet50-imagenet, hed-stats, ...); export uses the model's",
    )
    p.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm when training (default 112)")
    p.add_argument("--folds", type=int, default=3, help="patient-grouped CV folds (default 3; 1 = no CV)")
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[1024, 256],
        help="sigmoid hidden sizes, the last is the representation (default 1024 256)",
    )
    p.add_argument("--epochs", type=int, default=50, help="epochs per fold (default 50, no early stopping)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="slides per batch (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (feature extraction and training)")
    p.set_defaults(func=run)


def _slides_sheet(paths: list[str]):
    import pandas as pd

    from ..errors import DataError

    ids = [Path(s).stem for s in paths]
    if len(set(ids)) != len(ids):
        raise DataError("Two --slides have the same file name; give a sample sheet (--samples) instead.")
    return pd.DataFrame({"slide": [str(Path(s)) for s in paths]}, index=pd.Index(ids, name="sample_id"))


def mean_features(samples, args: argparse.Namespace, backbone: str, tile_um: float):
    """Slide-mean features of the sheet's samples: from --features, or from the feature cache."""
    from ..jobs import TextProgress
    from ..transfer import load_slide_features, read_feature_table

    if args.features:
        table = read_feature_table(args.features)
        known = [s for s in samples.index if s in table.index]
        missing = [s for s in samples.index if s not in table.index]
        if missing:
            print(
                f"he2rna: warning: {len(missing)} samples not in {Path(args.features).name} "
                f"(e.g. {', '.join(missing[:3])})",
                file=sys.stderr,
            )
        return table.loc[known]
    feats = load_slide_features(
        samples, backbone, tile_um, args.cache_dir, device=args.device, progress=TextProgress("features")
    )
    for sid, why in list(feats.failed.items())[:10]:
        print(f"he2rna: warning: no features for {sid}: {why}", file=sys.stderr)
    if len(feats.failed) > 10:
        print(
            f"he2rna: warning: ... and {len(feats.failed) - 10} more samples without features",
            file=sys.stderr,
        )
    return feats.mean


def default_output(args: argparse.Namespace, model_path: Path) -> Path:
    """``<model stem>.representation.tsv`` beside the features: the feature table's folder, or the cache."""
    from .. import settings

    if args.out:
        return Path(args.out)
    if args.features:
        folder = Path(args.features).parent
    else:
        folder = Path(args.cache_dir) if args.cache_dir else settings.cache_dir()
    return folder / f"{model_path.stem}.representation.tsv"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..cohorts.cohort import dropped_genes_summary, genes_as_rows_hint, load_expression, load_samples
    from ..errors import DataError
    from ..jobs import TextProgress
    from ..model.evaluation import pearson_columns
    from ..transfer import (
        load_representation_model,
        oof_predictions,
        represent,
        representation_frame,
        save_representation_model,
        train_representation,
        write_representation,
    )

    model_path = Path(args.model)
    if args.expression and model_path.suffix.lower() != ".safetensors":
        model_path = model_path.with_suffix(".safetensors")
    if args.expression and args.slides:  # a wrong call is said before anything else
        raise DataError("Training needs a sample sheet with patient ids (--samples), not --slides.")
    refuse_existing(
        [
            model_path if args.expression else None,
            None if args.no_export else default_output(args, model_path),
        ],
        args.overwrite,
    )
    samples = load_samples(args.samples, args.slide_column) if args.samples else _slides_sheet(args.slides)

    if args.expression:
        expression = load_expression(
            args.expression, transform=args.expression_scale, genes_as_rows=args.genes_as_rows
        )
        print(
            f"expression: {expression.shape[0]} samples x {expression.shape[1]} genes "
            f"(transform: {expression.attrs.get('transform')})"
        )
        dropped = dropped_genes_summary(expression)
        if dropped:
            print(f"he2rna: warning: {dropped}", file=sys.stderr)
        means = mean_features(samples, args, args.backbone, args.tile_um)
        ids = [s for s in samples.index if s in expression.index and s in means.index]
        if not ids:
            raise DataError(
                "No sample is in the sample sheet, the expression table and the features at once; "
                "check the sample ids." + genes_as_rows_hint(expression, list(samples.index))
            )
        print(f"{len(ids)} samples ({samples.loc[ids, 'patient_id'].nunique()} patients) to train on.")
        x = means.loc[ids].to_numpy(np.float32)
        y = expression.loc[ids].to_numpy(np.float32)
        patients = samples.loc[ids, "patient_id"].astype(str).to_numpy()
        device = "cpu" if args.device == "auto" else args.device  # small dense nets: CPU is as fast
        models, folds = train_representation(
            x, y, patients, n_folds=args.folds, hidden=tuple(args.hidden), epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, seed=args.seed, device=device,
            progress=TextProgress("training (folds)"),
        )  # fmt: skip
        extra = {
            "n_samples": len(ids),
            "n_patients": int(len(set(patients))),
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "folds": {s: int(f) for s, f in zip(ids, folds, strict=True)},
            "expression_transform": expression.attrs.get("transform"),
        }
        if len(models) > 1:
            r = pearson_columns(y, oof_predictions(models, folds, x))
            extra["oof_r"] = {g: (None if not np.isfinite(v) else round(float(v), 4))
                              for g, v in zip(expression.columns, r, strict=True)}  # fmt: skip
            print(
                f"out-of-fold Pearson R per gene: median {np.nanmedian(r):.3f}, "
                f"{int(np.sum(r > 0.3))}/{len(r)} genes above 0.3"
            )
        save_representation_model(
            model_path, models, list(expression.columns), args.backbone, args.tile_um, metadata=extra
        )
        print(f"representation model: {model_path} ({len(models)} fold models, {args.hidden[-1]}-d)")
        if args.no_export:
            return 0
    elif args.no_export:
        raise DataError("--no-export without --expression leaves nothing to do.")

    models, doc = load_representation_model(model_path)
    means = mean_features(samples, args, doc["backbone"], float(doc["tile_um"]))
    if means.empty:
        raise DataError("No sample has features: nothing to represent.")
    rep = representation_frame(represent(models, means.to_numpy(np.float32)), list(means.index))
    out = write_representation(rep, default_output(args, model_path))
    print(
        f"representation: {out} ({rep.shape[0]} samples x {rep.shape[1]}, "
        f"mean over {len(models)} fold models)"
    )
    seen = [s for s in rep.index if s in (doc.get("extra", {}).get("folds") or {})]
    if seen:
        print(
            f"note: {len(seen)} of these samples trained the model (each seen by "
            f"{max(len(models) - 1, 1)} of the {len(models)} fold models): their representation is not "
            "out-of-sample."
        )
    return 0
