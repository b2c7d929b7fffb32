"""Issue 23: how well could a T-cell map do on the unseen slides with these features, given tile labels?

A ceiling for the weakly supervised maps, not a method a user has: for each unseen slide, a ridge
(scikit-learn ``RidgeCV``) is fitted on the *other* unseen slides' tiles, from their hed-stats features to
their planted CD3+ counts, and scores this slide's tiles. Reported per slide: the tile R and the AUC of the
top-10 % CD3+ tiles (:func:`napari_he2rna.validation.metrics.tile_metrics`, as the maps are scored), beside
the same figures for the lymphocyte count (T and B cells share their look: what a perfect "lymphocyte" map
would get).

    python benchmarks/t_map_ceiling.py --held /tmp/i23/held --held-features /tmp/i23/fheld \\
        --out benchmarks/results/t_map_ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from ablation_training import slide_tiles
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

from napari_he2rna.validation.metrics import tile_metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", required=True, help="a he2rna make-sample cohort of unseen slides")
    ap.add_argument("--held-features", required=True, help="its hed-stats feature cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sheet = pd.read_csv(Path(args.held) / "samples.tsv", sep="\t").set_index("sample_id")
    data = {
        sid: slide_tiles(sid, str(Path(args.held) / sheet.loc[sid, "slide"]), "hed-stats", args.held_features)
        for sid in sheet.index
    }
    rows = []
    for sid, (x, truth) in data.items():
        t = truth["t_cells"].to_numpy(float)
        others = [o for o in data if o != sid]
        xo = np.concatenate([data[o][0] for o in others])
        to = np.concatenate([data[o][1]["t_cells"].to_numpy(float) for o in others])
        scaler = StandardScaler().fit(xo)
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(scaler.transform(xo), to)
        m = tile_metrics(ridge.predict(scaler.transform(x)), t, percentiles=(90,))
        lym = tile_metrics(truth["lymphocytes"].to_numpy(float), t, percentiles=(90,))
        rows.append(
            {
                "sample_id": sid,
                "phenotype": str(sheet.loc[sid].get("immune_phenotype", "mixed")),
                "n_tiles": len(t),
                "tile-supervised ridge R": round(float(m.pearson_r), 3),
                "tile-supervised ridge AUC top10%": round(float(m.auc["p90"]), 3),
                "lymphocyte count R": round(float(lym.pearson_r), 3),
                "lymphocyte count AUC top10%": round(float(lym.auc["p90"]), 3),
            }
        )
        print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"slides": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
