"""Issue 23: does a model's T-cell map follow T cells or lymphoid aggregates?

Trains HE2RNA and the ridge baseline (README settings, same folds) on a planted-truth cohort, scores unseen
slides with each fold ensemble, and regresses each slide's T-cell-set tile score (CD3D, CD3E, CD3G, CD247;
z-scored within the slide) on the tile's T-cell and B-cell counts (z-scored within the slide). A map that
follows T cells loads on T; one that learnt "aggregate" (B core, T rim) loads on B.

    python benchmarks/t_map_loadings.py --cohort /tmp/c60n --features /tmp/f60n --held /tmp/held \
        --held-features /tmp/fheld --out benchmarks/results/t_map_loadings_c60n.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ablation_training import BASE, fold_tile_scores, load_cohort_features, slide_tiles

from napari_he2rna.cohorts.cohort import load_samples
from napari_he2rna.maps.gene_sets import GENE_SETS
from napari_he2rna.model.fitting import fit
from napari_he2rna.model.folds import cv_folds


def _z(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std() + 1e-9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--cohort", "--features", "--held", "--held-features", "--out"):
        ap.add_argument(name, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    samples, cohort = load_cohort_features(args.cohort, args.features)
    config = replace(BASE, ks=(50, 100), val_fraction=0.0)
    folds = cv_folds(cohort.samples.loc[cohort.sample_ids], config.n_folds, config.seed)
    held = load_samples(Path(args.held) / "samples.tsv")
    out = {}
    for model_type in ("he2rna", "ridge"):
        result = fit(cohort, model_type, config, folds=folds)
        idx = [list(result.genes).index(g) for g in GENE_SETS["T cells"]]
        rows = []
        for sid in held.index:
            tiles, truth = slide_tiles(sid, str(held.loc[sid, "slide"]), "hed-stats", args.held_features)
            score = fold_tile_scores(result.models, tiles).mean(axis=0)[:, idx].mean(axis=1)
            t, b = truth["t_cells"].to_numpy(float), truth["b_cells"].to_numpy(float)
            x = np.column_stack([_z(t), _z(b) if b.std() > 0 else np.zeros_like(b), np.ones_like(t)])
            coef, *_ = np.linalg.lstsq(x, _z(score), rcond=None)
            phenotype = str(held.loc[sid].get("immune_phenotype", "mixed"))
            rows.append({"slide": sid, "phenotype": phenotype, "loading_T": coef[0], "loading_B": coef[1]})
        table = pd.DataFrame(rows)
        means = table.groupby("phenotype")[["loading_T", "loading_B"]].mean().round(3)
        print(model_type, means.to_string(), sep="\n")
        out[model_type] = {
            "per_slide": table.round(3).to_dict("records"),
            "by_phenotype": means.to_dict("index"),
        }
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
