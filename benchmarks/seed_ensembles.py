"""Issue 23: is the gap between HE2RNA's maps and the linear baseline's variance (then averaging several inits
per fold closes it) or bias (then it does not)?

Trains HE2RNA ``--inits`` times on the same folds with different seeds (the README settings), averages the
members' tile scores and slide predictions, and scores the average as ``benchmarks/ablation_training.py``
scores a variant (significance counts, held-out and unseen maps).

    python benchmarks/seed_ensembles.py --cohort /tmp/c60n --features /tmp/f60n --held /tmp/held \
        --held-features /tmp/fheld --inits 5 --out benchmarks/results/seed_ensembles_c60n.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from ablation_training import (
    BASE,
    fold_agreement,
    load_cohort_features,
    map_records,
    planted_counts,
    summarise_maps,
)

from napari_he2rna.cohorts.cohort import load_samples
from napari_he2rna.model.fitting import evaluate_result, fit, null_predictions
from napari_he2rna.model.folds import cv_folds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--cohort", "--features", "--held", "--held-features", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--inits", type=int, default=5)
    ap.add_argument("--null-inits", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    samples, cohort = load_cohort_features(args.cohort, args.features)
    config = replace(BASE, ks=(50, 100), val_fraction=0.0)
    folds = cv_folds(cohort.samples.loc[cohort.sample_ids], config.n_folds, config.seed)
    null = null_predictions(cohort, config, args.null_inits)
    members = [fit(cohort, "he2rna", replace(config, seed=s), folds=folds) for s in range(args.inits)]
    oof = sum(m.oof for m in members) / len(members)
    ev = evaluate_result(cohort, oof, folds, null)
    row = {
        "bh": planted_counts(ev.per_gene, "significant_bh"),
        "bh_pooled": planted_counts(ev.per_gene, "significant_bh_pooled"),
    }
    pheno = samples.get("immune_phenotype", pd.Series("mixed", index=samples.index))
    oof_slides = [
        (sid, samples.loc[sid, "slide"], pheno.get(sid, "mixed"), [m.models[int(f)] for m in members])
        for sid, f in zip(cohort.sample_ids, folds, strict=True)
    ]
    row.update(
        summarise_maps(map_records(list(cohort.genes), oof_slides, "hed-stats", args.features), "oof ")
    )
    held = load_samples(Path(args.held) / "samples.tsv")
    every = [mm for m in members for mm in m.models]
    held_slides = [
        (sid, str(held.loc[sid, "slide"]), str(held.loc[sid].get("immune_phenotype", "mixed")), every)
        for sid in held.index
    ]
    row.update(
        summarise_maps(
            map_records(list(cohort.genes), held_slides, "hed-stats", args.held_features), "unseen "
        )
    )
    row.update(fold_agreement(type("R", (), {"oof": oof, "folds": folds})(), cohort))
    print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"variants": {f"{args.inits} inits per fold": row}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
