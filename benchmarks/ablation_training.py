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
from napari_he2rna.model.fitting import evaluate_result, fit, null_predictions
from napari_he2rna.model.folds import cv_folds
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


def tile_level(result, cohort, samples, backbone, cache_dir) -> dict[str, float]:
    """Held-out tile-level R of the gene sets with the planted truth, pooled and median per slide."""
    sets = {
        "T cells": ("t_cells", "T"),
        "B cells": ("b_cells", "B"),
        "epithelium": ("epithelium_fraction", "epi"),
    }
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in sets}
    truth_all: dict[str, list[np.ndarray]] = {k: [] for k in sets}
    per_slide: dict[str, list[float]] = {k: [] for k in sets}
    bb = backbones.get_backbone(backbone)
    genes = list(result.genes)
    for i, sid in enumerate(result.sample_ids):
        model = result.models[int(result.folds[i])]
        slide_path = samples.loc[sid, "slide"]
        with open_slide(slide_path) as slide:
            grid, tiles, _ = feature_cache.read_cache(feature_cache.cache_path(slide, bb, 112.0, cache_dir))
        truth = pd.read_csv(Path(slide_path).parent / f"{sid}_tiles.csv").set_index(["row", "col"])
        truth = truth.loc[list(zip(grid.table["row"], grid.table["col"], strict=True))]
        with torch.no_grad():
            x = torch.from_numpy(tiles.T[None].astype(np.float32))
            scores = model.eval()(x)[0].numpy().T  # (N, G)
        for name, (col, _) in sets.items():
            idx = [genes.index(g) for g in GENE_SETS[name] if g in genes]
            s = scores[:, idx].mean(axis=1)
            t = truth[col].to_numpy(dtype=float)
            pooled[name].append(s)
            truth_all[name].append(t)
            if len(s) >= 5 and np.std(t) > 0 and np.std(s) > 0:
                per_slide[name].append(float(np.corrcoef(s, t)[0, 1]))
    out = {}
    for name in sets:
        s, t = np.concatenate(pooled[name]), np.concatenate(truth_all[name])
        m = tile_metrics(s, t, percentiles=(90,))
        out[f"{name} R pooled"] = round(float(m.pearson_r), 3)
        out[f"{name} R median per slide"] = (
            round(float(np.median(per_slide[name])), 3) if per_slide[name] else None
        )
        if name == "T cells":
            out["T cells AUC top10%"] = round(float(m.auc["p90"]), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="+", default=["ridge", *VARIANTS])
    ap.add_argument("--null-inits", type=int, default=25)
    ap.add_argument("--hidden", type=int, nargs="+", default=list(BASE.hidden))
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
    results = {}
    for name in args.variants:
        t0 = time.perf_counter()
        if name == "ridge":
            result = fit(cohort, "ridge", base, folds=folds)
        else:
            result = fit(cohort, "he2rna", replace(base, **VARIANTS[name]), folds=folds)
        ev = evaluate_result(cohort, result.oof, folds, null)
        row = {
            "seconds": round(time.perf_counter() - t0, 1),
            "bh": planted_counts(ev.per_gene, "significant_bh"),
            "holm_sidak": planted_counts(ev.per_gene, "significant"),
            "bh_pooled": planted_counts(ev.per_gene, "significant_bh_pooled"),
            "mean_r": {r.cancer_type: round(float(r.mean_r), 3) for r in ev.summary.itertuples()},
            "mean_r_pooled": {
                r.cancer_type: round(float(r.mean_r_pooled), 3) for r in ev.summary.itertuples()
            },
            "planted_r_pooled_median": {
                t: round(float(sub.loc[sub["gene"].isin(list(GENE_PANEL)), "r_pooled_folds"].median()), 3)
                for t, sub in ev.per_gene.groupby("cancer_type")
            },
            "best_epochs": [h.get("best_epoch") for h in result.histories],
            "criteria": sorted({str(h.get("criterion")) for h in result.histories}),
            **tile_level(result, cohort, samples, "hed-stats", args.features),
        }
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
