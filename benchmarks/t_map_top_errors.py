"""Issue 23: where a T-cell map's top-10 % AUC is lost on an unseen slide, and how much R it would need.

For each model bundle and each unseen slide of a ``he2rna make-sample`` cohort (with its hed-stats feature
cache), the bundle scores the slide's tiles with the public :func:`napari_he2rna.predict` (as ``he2rna
spatialize`` does) and the "T cells" set score is compared with the generator's per-tile CD3+ counts:

* tile R and the AUC of the top-10 % CD3+ tiles (:func:`napari_he2rna.validation.metrics.tile_metrics`);
* the AUC a map of the *same R* would get if its errors were random: truth + Gaussian noise scaled to that R,
  300 draws (median, and the share of draws >= 0.9). An AUC far below that median means the errors sit at
  the top of the map, not spread over it;
* the tiles that cause the loss: the negatives scored above the median positive (how many, their mean CD3+
  and CD20+ counts, epithelium fraction and stromal cells) against the positives themselves.

    python benchmarks/t_map_top_errors.py --held /tmp/i23/held --held-features /tmp/i23/fheld \\
        --bundle default=/tmp/i23/w_c60_ensA.safetensors --bundle ridge=/tmp/i23/w_c60_ridge.safetensors \\
        --out benchmarks/results/t_map_top_errors_c60.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from napari_he2rna import predict
from napari_he2rna.validation.metrics import tile_metrics

DRAWS = 300


def random_error_auc(t: np.ndarray, r: float, rng: np.random.Generator) -> tuple[float, float]:
    """Median top-10 % AUC of ``t + noise``, noise scaled so that R(map, t) ~= ``r``; and P(AUC >= 0.9)."""
    sd = t.std() * np.sqrt(max(1.0 / max(r, 1e-3) ** 2 - 1.0, 0.0))
    aucs = np.array(
        [tile_metrics(t + rng.normal(0.0, sd, t.size), t, percentiles=(90,)).auc["p90"] for _ in range(DRAWS)]
    )
    return float(np.median(aucs)), float(np.mean(aucs >= 0.9))


def slide_record(sid: str, phenotype: str, score: np.ndarray, truth: pd.DataFrame, rng) -> dict:
    t = truth["t_cells"].to_numpy(float)
    m = tile_metrics(score, t, percentiles=(90,))
    med, p90 = random_error_auc(t, float(m.pearson_r), rng)
    positive = t > np.percentile(t, 90)  # tile_metrics' definition of the top 10 %
    above = (~positive) & (score > np.median(score[positive]))
    missed = positive & (score < np.percentile(score[~positive], 90))

    def describe(mask):
        def mean(col, digits):
            return round(float(truth.loc[mask, col].mean()), digits) if mask.any() else None

        return {
            "tiles": int(mask.sum()),
            "CD3+ mean": mean("t_cells", 1),
            "CD20+ mean": mean("b_cells", 1),
            "epithelium fraction mean": mean("epithelium_fraction", 2),
            "stromal cells mean": mean("stromal_cells", 1),
        }

    return {
        "sample_id": sid,
        "phenotype": phenotype,
        "n_tiles": int(t.size),
        "top-10 % threshold (CD3+ per tile)": float(np.percentile(t, 90)),
        "R": round(float(m.pearson_r), 3),
        "AUC top10%": round(float(m.auc["p90"]), 3),
        "AUC if errors were random at this R (median)": round(med, 3),
        "P(AUC >= 0.9) if errors were random": round(p90, 2),
        "positives": describe(positive),
        "negatives above the median positive": describe(above),
        "positives below the 90th percentile of negatives": describe(missed),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", required=True, help="a he2rna make-sample cohort of unseen slides")
    ap.add_argument("--held-features", required=True, help="its hed-stats feature cache")
    ap.add_argument("--bundle", action="append", required=True, help="NAME=path.safetensors (repeatable)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    held = Path(args.held)
    sheet = pd.read_csv(held / "samples.tsv", sep="\t").set_index("sample_id")
    out = {"held": str(held), "models": {}}
    for spec in args.bundle:
        name, path = spec.split("=", 1)
        rng = np.random.default_rng(0)
        rows = []
        for sid in sheet.index:
            pred = predict(held / sheet.loc[sid, "slide"], path, ["T cells"], cache_dir=args.held_features)
            grid = pred.grid.table
            truth = pd.read_csv(held / f"{sid}_tiles.csv").set_index(["row", "col"])
            truth = truth.loc[list(zip(grid["row"], grid["col"], strict=True))]
            phenotype = str(sheet.loc[sid].get("immune_phenotype", "mixed"))
            rows.append(slide_record(sid, phenotype, pred.scores["T cells"].to_numpy(float), truth, rng))
            r = rows[-1]
            print(
                f"{name} {sid} ({phenotype}): R {r['R']}, AUC {r['AUC top10%']} "
                f"(random errors at this R: {r['AUC if errors were random at this R (median)']}, "
                f"P>=0.9 {r['P(AUC >= 0.9) if errors were random']}); above the median positive: "
                f"{r['negatives above the median positive']}"
            )
        out["models"][name] = {"bundle": path, "slides": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
