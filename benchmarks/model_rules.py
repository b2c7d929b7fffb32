"""Issue 23: which rule should ``he2rna train`` apply by default on small cohorts? HE2RNA alone, the ridge
baseline alone, a per-gene choice between them (several rules), or their ensemble (the mean of both).

HE2RNA and ridge are trained once per fold draw on the same patient-grouped folds (``--fold-seeds``); every
rule then only recombines their out-of-fold predictions, so the rules are compared on exactly the same
models. A per-gene choice is scored honestly (nested): fold k's samples get, per gene, the model that won on
the other folds' out-of-fold predictions. Counts are planted genes and controls called by Benjamini–Hochberg
against the untrained null, on the R averaged over folds (``fm``) and on the pooled out-of-fold R
(``pooled``), per cancer type, as ``benchmarks/ablation_training.py`` counts them.

    python benchmarks/model_rules.py --cohort /tmp/c40 --features /tmp/f40 --fold-seeds 0 1 2 \\
        --out benchmarks/results/model_rules_c40.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ablation_training import BASE, planted_counts

from napari_he2rna.cohorts.cohort import cohort_features, load_expression, load_samples, match_cohort
from napari_he2rna.model.fitting import evaluate_result, fit, null_predictions
from napari_he2rna.model.folds import cv_folds
from napari_he2rna.model.gene_comparison import per_type_r

#: The README defaults (``--supertiles --hidden 256 256``, k list 50 100, no validation split on cohorts this
#: small).
CONFIG = replace(BASE, ks=(50, 100), val_fraction=0.0)


def _wins(a: np.ndarray, b: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """True where ``b`` beats ``a`` by more than ``margin`` (NaN loses)."""
    return np.nan_to_num(b, nan=-9.0) > np.nan_to_num(a, nan=-9.0) + margin


def rules(y: np.ndarray, ph: np.ndarray, pl: np.ndarray, types: np.ndarray, folds: np.ndarray) -> dict:
    """Out-of-fold predictions ``(n, G)`` of every rule."""

    def r(mask, p):
        return per_type_r(y[mask], p[mask], types[mask])

    def per_gene(margin: float) -> np.ndarray:  # linear for a gene when it beats HE2RNA by > margin
        out = ph.copy()
        for k in np.unique(folds):
            other = folds != k
            lin = _wins(r(other, ph), r(other, pl), margin)
            out[np.ix_(folds == k, lin)] = pl[np.ix_(folds == k, lin)]
        return out

    def unanimous(margin: float) -> np.ndarray:  # HE2RNA only where it wins on every inner split
        out = pl.copy()
        for k in np.unique(folds):
            ok = np.ones(y.shape[1], bool)
            for j in np.unique(folds):
                if j != k:
                    m = (folds != k) & (folds != j)
                    ok &= _wins(r(m, pl), r(m, ph), margin)
            out[np.ix_(folds == k, ok)] = ph[np.ix_(folds == k, ok)]
        return out

    return {
        "HE2RNA": ph,
        "ridge": pl,
        "per gene (ties HE2RNA)": per_gene(0.0),
        "per gene, linear unless HE2RNA better by 0.05": per_gene(-0.05),
        "per gene, HE2RNA only if better on every inner split by 0.02": unanimous(0.02),
        "ensemble (mean of both)": 0.5 * (ph + pl),
        "ensemble, linear weight 0.25": 0.75 * ph + 0.25 * pl,
        "ensemble, linear weight 0.75": 0.25 * ph + 0.75 * pl,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--fold-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--null-inits", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    samples = load_samples(Path(args.cohort) / "samples.tsv")
    expr = load_expression(Path(args.cohort) / "expression.tsv")
    feats, _ = cohort_features(samples, "hed-stats", 112.0, args.features, supertiles=True)
    cohort, _ = match_cohort(expr, samples, feats)
    null = null_predictions(cohort, CONFIG, args.null_inits)
    y = cohort.expression
    out = {}
    for fs in args.fold_seeds:
        folds = cv_folds(cohort.samples.loc[cohort.sample_ids], CONFIG.n_folds, fs)
        he2rna = fit(cohort, "he2rna", CONFIG, folds=folds)
        ridge = fit(cohort, "ridge", CONFIG, folds=folds)
        types = he2rna.cancer_types.astype(str)
        preds = rules(y.to_numpy(float), he2rna.oof.to_numpy(float), ridge.oof.to_numpy(float), types, folds)
        for name, p in preds.items():
            ev = evaluate_result(cohort, pd.DataFrame(p, index=y.index, columns=y.columns), folds, null)
            row = {
                "fm": planted_counts(ev.per_gene, "significant_bh"),
                "pooled": planted_counts(ev.per_gene, "significant_bh_pooled"),
            }
            out.setdefault(name, {})[str(fs)] = row
            print(fs, name, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"cohort": args.cohort, "rules": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
