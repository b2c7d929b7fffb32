"""Ablation of HE2RNA's training settings on a synthetic cohort with planted truth (docs/training.md).

For each variant: 5-fold patient-grouped cross-validation through the library's one training path
(:func:`napari_he2rna.model.fitting.fit`), evaluation against the untrained null (the same null and folds for
every
variant), planted vs control genes significant per cancer type, and tile-level agreement on held-out slides:
each slide is scored by the fold model that did not train on it, the T-cell set (CD3D+CD3E+CD3G+CD247) against
the CD3+ count per tile, the B-cell set (CD19+MS4A1) against the CD20+ count, the epithelium set
(TP63+KRT8+KRT18) against the epithelium mask fraction, and the ROC-AUC of the T-cell score for the top 10 %
of CD3+ tiles.

    python benchmarks/ablation_training.py --cohort /tmp/cohort --features /tmp/features \
        --out benchmarks/results/ablation.json [--variants default ridge no-standardize ...]

The cohort is what ``he2rna make-sample`` writes; the features what ``he2rna extract --backbone hed-stats``
writes (or they are extracted into --features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_he2rna.cohorts.cohort import cohort_features, load_expression, load_samples, match_cohort
from napari_he2rna.features import backbones
from napari_he2rna.features import cache as feature_cache
from napari_he2rna.maps.gene_sets import GENE_SETS
from napari_he2rna.model.blend import Blend
from napari_he2rna.model.fitting import evaluate_result, fit, null_predictions
from napari_he2rna.model.folds import cv_folds
from napari_he2rna.model.network import topk_mean_multi
from napari_he2rna.model.training import TrainConfig
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.synthetic import GENE_PANEL
from napari_he2rna.validation.metrics import tile_metrics

#: The README walkthrough's settings (``he2rna train --supertiles --hidden 256 256``), the starting point.
BASE = TrainConfig(mode="supertiles", hidden=(256, 256))

VARIANTS: dict[str, dict] = {
    "default": {},
    "no-standardize": {"standardize": False},
    "no-validation": {"val_fraction": 0.0, "max_epochs": 100},
    "val-0.2": {"val_fraction": 0.2},
    "dropout-0": {"dropout": 0.0},
    "wd-1e-3": {"weight_decay": 1e-3},
    "wd-1e-2": {"weight_decay": 1e-2},
    "lr-1e-3": {"lr": 1e-3},
    "hidden-64": {"hidden": (64,)},
    "hidden-1024x2": {"hidden": (1024, 1024)},
    "k-large": {"ks": (10, 20, 50, 100)},
    "k-mean": {"ks": (100,)},
    "epochs-50": {"max_epochs": 50},
    "z-targets": {"standardize_targets": True},
    "z-targets-lr-1e-3": {"standardize_targets": True, "lr": 1e-3},
    "lr-1e-3-k-large": {"lr": 1e-3, "ks": (10, 20, 50, 100)},
    "k-mean-lr-1e-3": {"ks": (100,), "lr": 1e-3},
    "k-mean-val-0.2": {"ks": (100,), "val_fraction": 0.2},
    "k-mean-no-validation": {"ks": (100,), "val_fraction": 0.0, "max_epochs": 100},
    "k-mean-hidden-1024x2": {"ks": (100,), "hidden": (1024, 1024)},
    "k-mean-dropout-0.5": {"ks": (100,), "dropout": 0.5},
    "k-mean-wd-1e-2": {"ks": (100,), "weight_decay": 1e-2},
    "k-50-100": {"ks": (50, 100)},
    "k-50-100-no-validation": {"ks": (50, 100), "val_fraction": 0.0},
    "k-50-100-no-validation-100": {"ks": (50, 100), "val_fraction": 0.0, "max_epochs": 100},
    # issue 23: candidates to close the gap to the linear baseline (on top of the current defaults)
    "ensemble": {"ks": (50, 100), "val_fraction": 0.0},
    "ensemble-0.75": {"ks": (50, 100), "val_fraction": 0.0},  # the linear model's share 0.75
    "new-hidden-64": {"ks": (50, 100), "val_fraction": 0.0, "hidden": (64,)},
    "new-hidden-256x1": {"ks": (50, 100), "val_fraction": 0.0, "hidden": (256,)},
    "new-dropout-0.5": {"ks": (50, 100), "val_fraction": 0.0, "dropout": 0.5},
    "new-wd-1e-4": {"ks": (50, 100), "val_fraction": 0.0, "weight_decay": 1e-4},
    "new-lr-1e-4": {"ks": (50, 100), "val_fraction": 0.0, "lr": 1e-4},
    "new-epochs-50": {"ks": (50, 100), "val_fraction": 0.0, "max_epochs": 50},
    "new-k-100": {"ks": (100,), "val_fraction": 0.0},
}


def planted_counts(per_gene: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    out = {}
    for t, sub in per_gene.groupby("cancer_type"):
        sig = sub.set_index("gene")[column].astype(bool)
        planted = [g for g in sig.index if g in GENE_PANEL]
        controls = [g for g in sig.index if g not in GENE_PANEL]
        out[str(t)] = {
            "planted": int(sig[planted].sum()),
            "of_planted": len(planted),
            "controls": int(sig[controls].sum()),
            "of_controls": len(controls),
        }
    return out


SETS = {  # gene set -> (truth column of <id>_tiles.csv, the cell type a slide must have for its map to count)
    "T cells": "t_cells",
    "B cells": "b_cells",
    "epithelium": "epithelium_fraction",
}


def slide_tiles(sid: str, slide_path: str, backbone: str, cache_dir) -> tuple[np.ndarray, pd.DataFrame]:
    """A slide's cached tile features and its planted truth per tile, in the same order."""
    bb = backbones.get_backbone(backbone)
    with open_slide(slide_path) as slide:
        grid, tiles, _ = feature_cache.read_cache(feature_cache.cache_path(slide, bb, 112.0, cache_dir))
    truth = pd.read_csv(Path(slide_path).parent / f"{sid}_tiles.csv").set_index(["row", "col"])
    truth = truth.loc[list(zip(grid.table["row"], grid.table["col"], strict=True))]
    return tiles, truth


def fold_tile_scores(models, tiles: np.ndarray) -> np.ndarray:
    """``(n_models, N, G)`` tile scores of each model (raw features in)."""
    x = torch.from_numpy(tiles.T[None].astype(np.float32))
    with torch.no_grad():
        return np.stack([m.eval()(x)[0].numpy().T for m in models])


def fold_models(result, fold: int | None = None) -> list:
    """The model(s) that score a slide: one fold's (``fold``) or every fold's; for the ensemble, each fold's
    :class:`~napari_he2rna.model.blend.Blend` of HE2RNA and the linear baseline."""
    folds = range(len(result.models)) if fold is None else [fold]
    if result.model_type == "ensemble":
        return [Blend(result.models[f], result.linear_models[f], result.linear_weight) for f in folds]
    return [result.models[f] for f in folds]


def map_records(genes, slides: list[tuple[str, str, str, list]], backbone, cache_dir) -> list[dict]:
    """Per slide: tile R of each gene set's score with its planted truth (and the T-cell AUC for the top 10 %
    CD3+ tiles), the slide scored by the mean of ``models`` (one fold model for an out-of-fold slide, the
    fold ensemble, as the bundle applies it, for an unseen one). ``slides``: (id, path, phenotype, models)."""
    recs = []
    for sid, path, phenotype, models in slides:
        tiles, truth = slide_tiles(sid, path, backbone, cache_dir)
        scores = fold_tile_scores(models, tiles).mean(axis=0)
        rec = {"sample_id": sid, "phenotype": phenotype, "n_tiles": len(tiles)}
        for name, col in SETS.items():
            idx = [genes.index(g) for g in GENE_SETS[name] if g in genes]
            sc, t = scores[:, idx].mean(axis=1), truth[col].to_numpy(dtype=float)
            has = float(t.sum()) >= (1.0 if col == "epithelium_fraction" else 20.0)
            m = tile_metrics(sc, t, percentiles=(90,))
            rec[f"{name} has"] = bool(has)
            rec[f"{name} R"] = round(float(m.pearson_r), 3) if np.isfinite(m.pearson_r) else None
            if name == "T cells":
                auc = m.auc.get("p90", float("nan"))
                rec["T cells AUC top10%"] = round(float(auc), 3) if np.isfinite(auc) else None
            rec[f"_{name} s"], rec[f"_{name} t"] = sc, t
        recs.append(rec)
    return recs


def summarise_maps(recs: list[dict], prefix: str) -> dict:
    """Pooled R over all tiles, median and worst per slide (slides that have the cell type), worst AUC."""
    out = {}
    for name in SETS:
        have = [r for r in recs if r[f"{name} has"]]
        if not have:
            continue
        s = np.concatenate([r[f"_{name} s"] for r in have])
        t = np.concatenate([r[f"_{name} t"] for r in have])
        rs = [r[f"{name} R"] for r in have if r[f"{name} R"] is not None]
        out[f"{prefix}{name} R pooled"] = round(float(np.corrcoef(s, t)[0, 1]), 3)
        out[f"{prefix}{name} R median"] = round(float(np.median(rs)), 3) if rs else None
        worst = min(have, key=lambda r: r[f"{name} R"] if r[f"{name} R"] is not None else -9)
        out[f"{prefix}{name} R worst"] = worst[f"{name} R"]
        out[f"{prefix}{name} worst slide"] = f"{worst['sample_id']} ({worst['phenotype']})"
        if name == "T cells":
            aucs = [r["T cells AUC top10%"] for r in have if r["T cells AUC top10%"] is not None]
            out[f"{prefix}T cells AUC worst"] = min(aucs) if aucs else None
            m = tile_metrics(s, t, percentiles=(90,))
            out[f"{prefix}T cells AUC pooled"] = round(float(m.auc["p90"]), 3)
        for ph in sorted({r["phenotype"] for r in have}):
            rs_ph = [r[f"{name} R"] for r in have if r["phenotype"] == ph and r[f"{name} R"] is not None]
            if rs_ph:
                out[f"{prefix}{name} R median {ph}"] = round(float(np.median(rs_ph)), 3)
    return out


def fold_agreement(result, cohort) -> dict:
    """Why pooled out-of-fold R can fall below the fold-mean R: per fold and planted gene, the slope and
    intercept of truth on prediction (a fold model off in level or scale), and the R of each model."""
    y = cohort.expression
    oof = result.oof.loc[y.index]
    types = cohort.samples.loc[y.index, "cancer_type"].astype(str).to_numpy()
    folds = np.asarray(result.folds)
    planted = [g for g in y.columns if g in GENE_PANEL]
    slopes, offsets, r_fold, r_pool = [], [], [], []
    for t in np.unique(types):
        for g in planted:
            yt, pt = y.loc[types == t, g].to_numpy(), oof.loc[types == t, g].to_numpy()
            ft = folds[types == t]
            if np.std(yt) == 0:
                continue
            r_pool.append(np.corrcoef(yt, pt)[0, 1] if np.std(pt) > 0 else np.nan)
            rf = []
            for f in np.unique(ft):
                a, b = yt[ft == f], pt[ft == f]
                if len(a) >= 3 and np.std(b) > 0 and np.std(a) > 0:
                    rf.append(np.corrcoef(a, b)[0, 1])
                    slope = np.polyfit(b, a, 1)
                    slopes.append(
                        slope[0] * np.std(b) / np.std(yt)
                    )  # truth SD per prediction SD, in units of SD
                    offsets.append((np.mean(b) - np.mean(a)) / np.std(yt))  # prediction level - truth, SD
            r_fold.append(np.nanmean(rf) if rf else np.nan)
    return {
        "planted R fold-mean (median)": round(float(np.nanmedian(r_fold)), 3),
        "planted R pooled (median)": round(float(np.nanmedian(r_pool)), 3),
        "fold offset SD of truth (median |.|)": round(float(np.nanmedian(np.abs(offsets))), 3),
        "fold offset spread (SD)": round(float(np.nanstd(offsets)), 3),
        "fold pred SD / truth SD (median)": round(float(np.nanmedian(np.abs(slopes))), 3),
    }


def ensemble_spread(result, cohort, held) -> dict:
    """Spread of the fold models' slide predictions on unseen slides: SD across folds / SD across slides,
    median over planted genes (0 = the folds agree; 1 = they disagree as much as slides differ)."""
    genes = list(result.genes)
    preds = []  # (n_slides, n_folds, G): per slide, each fold model's slide prediction
    agg = getattr(result, "aggregation", "topk")
    ks = result.config.k_list if isinstance(result.config, TrainConfig) else (1,)
    for sid, path, _ph, _m in held:
        tiles, _ = slide_tiles(sid, path, "hed-stats", HELD_CACHE[0])
        sc = torch.from_numpy(fold_tile_scores(fold_models(result), tiles))  # (F, N, G)
        if agg == "mean":
            preds.append(sc.mean(1).numpy())
        else:
            preds.append(np.stack([topk_mean_multi(s.T[None], None, ks)[0].numpy() for s in sc]))
    p = np.stack(preds)
    idx = [genes.index(g) for g in genes if g in GENE_PANEL]
    across_folds = p[:, :, idx].std(axis=1).mean(axis=0)
    across_slides = p[:, :, idx].mean(axis=1).std(axis=0)
    return {
        "fold spread / slide spread on unseen slides (median)": round(
            float(np.median(across_folds / np.maximum(across_slides, 1e-9))), 3
        )
    }


HELD_CACHE: list = [None]


def score_variant(result, cohort, samples, folds, null, args, held, t0: float) -> dict:
    """What is recorded per variant: significance counts (fold-mean and pooled R), fold agreement, and the
    maps of the out-of-fold slides and (``held``: (id, path, phenotype) of unseen slides, with
    ``args.held_features``) of the unseen ones; ``seconds`` since ``t0``."""
    ev = evaluate_result(cohort, result.oof, folds, null)
    row = {
        "seconds": round(time.perf_counter() - t0, 1),
        "bh": planted_counts(ev.per_gene, "significant_bh"),
        "holm_sidak": planted_counts(ev.per_gene, "significant"),
        "bh_pooled": planted_counts(ev.per_gene, "significant_bh_pooled"),
        "mean_r": {r.cancer_type: round(float(r.mean_r), 3) for r in ev.summary.itertuples()},
        "mean_r_pooled": {r.cancer_type: round(float(r.mean_r_pooled), 3) for r in ev.summary.itertuples()},
        "planted_r_pooled_median": {
            t: round(float(sub.loc[sub["gene"].isin(list(GENE_PANEL)), "r_pooled_folds"].median()), 3)
            for t, sub in ev.per_gene.groupby("cancer_type")
        },
        "best_epochs": [h.get("best_epoch") for h in result.histories],
        "criteria": sorted({str(h.get("criterion")) for h in result.histories}),
        **fold_agreement(result, cohort),
    }
    pheno = samples.get("immune_phenotype", pd.Series("mixed", index=samples.index))
    oof_slides = [
        (sid, samples.loc[sid, "slide"], pheno.get(sid, "mixed"), fold_models(result, int(result.folds[i])))
        for i, sid in enumerate(result.sample_ids)
    ]
    recs = map_records(list(result.genes), oof_slides, "hed-stats", args.features)
    row.update(summarise_maps(recs, "oof "))
    if held is not None:
        held_slides = [(sid, path, ph, fold_models(result)) for sid, path, ph in held]
        recs_h = map_records(list(result.genes), held_slides, "hed-stats", args.held_features)
        row.update(summarise_maps(recs_h, "unseen "))
        row.update(ensemble_spread(result, cohort, held_slides))
        row["unseen per slide"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs_h]
    return row


def load_cohort_features(cohort_dir, features_dir):
    """(sample sheet, matched cohort with hed-stats supertile features) of a ``he2rna make-sample`` cohort."""
    samples = load_samples(Path(cohort_dir) / "samples.tsv")
    feats, _ = cohort_features(samples, "hed-stats", 112.0, features_dir, supertiles=True)
    cohort, _ = match_cohort(load_expression(Path(cohort_dir) / "expression.tsv"), samples, feats)
    return samples, cohort


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=["ridge", *VARIANTS])
    ap.add_argument("--null-inits", type=int, default=25)
    ap.add_argument("--hidden", type=int, nargs="+", default=list(BASE.hidden))
    ap.add_argument(
        "--held", help="a cohort of unseen slides (he2rna make-sample), scored by the fold ensemble"
    )
    ap.add_argument("--held-features", help="its feature cache (he2rna extract --backbone hed-stats)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cohort_dir = Path(args.cohort)
    samples = load_samples(cohort_dir / "samples.tsv")
    expression = load_expression(cohort_dir / "expression.tsv")
    feats, failed = cohort_features(samples, "hed-stats", 112.0, args.features, supertiles=True)
    if failed:
        print(f"{len(failed)} slides without features", file=sys.stderr)
    cohort, _ = match_cohort(expression, samples, feats)
    base = replace(BASE, hidden=tuple(args.hidden))
    folds = cv_folds(cohort.samples.loc[cohort.sample_ids], base.n_folds, base.seed)
    null = null_predictions(cohort, base, args.null_inits)
    held = None
    if args.held:
        hs = load_samples(Path(args.held) / "samples.tsv")
        HELD_CACHE[0] = args.held_features
        held = [
            (sid, str(hs.loc[sid, "slide"]), str(hs.loc[sid].get("immune_phenotype", "mixed")))
            for sid in hs.index
        ]
    results = {}
    for name in args.variants:
        t0 = time.perf_counter()
        if name == "ridge":
            result = fit(cohort, "ridge", base, folds=folds)
        elif name.startswith("ensemble"):
            weight = float(name.split("-")[1]) if "-" in name else 0.5
            result = fit(
                cohort, "ensemble", replace(base, **VARIANTS[name]), folds=folds, linear_weight=weight
            )
        else:
            result = fit(cohort, "he2rna", replace(base, **VARIANTS[name]), folds=folds)
        row = score_variant(result, cohort, samples, folds, null, args, held, t0)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"cohort": str(cohort_dir), "n_samples": len(cohort.sample_ids), "variants": results}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
