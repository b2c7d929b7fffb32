"""Issue 23: does the T-cell map's top-10 % AUC goal depend on the model, the number of slides or the draw?

Replicate cohorts of the README walkthrough's recipe (``he2rna make-sample --size 1344 1344 --phenotypes
mixed:0.5 t-only:0.25 aggregates:0.25``, 3 cancer types) at several sizes and seeds; for each one,
``he2rna extract --backbone hed-stats`` and ``benchmarks/ablation_rows23.py`` with the default (HE2RNA with
``--anchor 1`` averaged with ridge, ``ensemble-anchor-1``) and the ridge baseline on the same folds and null,
the unseen slides scored by the fold ensemble against the generator's per-tile counts. One row per cohort and
model in the CSV: the worst unseen top-10 % CD3+ AUC, how many unseen slides are under 0.9, the two slides
that miss most often (H-0, H-4), the worst T / B / epithelium tile R, and the planted genes and controls
called (BH, fold-mean and pooled R, summed over the types).

    python benchmarks/t_map_replicates.py --work /tmp/rep --held /tmp/i23/held \\
        --held-features /tmp/i23/fheld --cohorts 60:11 60:12 120:21 240:31 \\
        --out benchmarks/results/t_map_replicates.csv

A cohort whose JSON is already in ``--work`` is not recomputed (so the table can grow run by run). About 1
minute per 60-slide cohort, 2 per 120 and 4 per 240 on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
VARIANTS = ("ensemble-anchor-1", "ridge")
NAMES = {"ensemble-anchor-1": "default (HE2RNA --anchor 1 + ridge)", "ridge": "ridge baseline"}


def run_cohort(work: Path, n: int, seed: int, held: str, held_features: str, null_inits: int) -> Path:
    """Make, extract and score one replicate cohort; returns its ablation JSON."""
    name = f"r{n}_{seed}"
    cohort, feats, out = work / name, work / f"f_{name}", work / f"{name}.json"
    if out.exists():
        return out
    he2rna = [sys.executable, "-m", "napari_he2rna.cli"]
    quiet = {"check": True, "stdout": subprocess.DEVNULL}
    if not (cohort / "samples.tsv").exists():
        make = ["make-sample", str(cohort), "--n-slides", str(n), "--seed", str(seed)]
        recipe = ["--size", "1344", "1344", "--phenotypes", "mixed:0.5", "t-only:0.25", "aggregates:0.25"]
        subprocess.run([*he2rna, *make, *recipe], **quiet)
    extract = ["extract", str(cohort / "samples.tsv"), "--backbone", "hed-stats", "--cache-dir", str(feats)]
    subprocess.run([*he2rna, *extract], **quiet)
    ablation = [sys.executable, "ablation_rows23.py", "--cohort", str(cohort), "--features", str(feats)]
    ablation += ["--held", held, "--held-features", held_features, "--null-inits", str(null_inits)]
    ablation += ["--variants", *VARIANTS, "--out", str(out)]
    subprocess.run(ablation, cwd=HERE, **quiet)
    return out


def rows_of(path: Path, n: int, seed: int) -> list[dict]:
    doc = json.loads(path.read_text())
    rows = []
    for variant, x in doc["variants"].items():
        auc = {r["sample_id"]: r["T cells AUC top10%"] for r in x["unseen per slide"]}
        rows.append(
            {
                "slides": n,
                "seed": seed,
                "model": NAMES.get(variant, variant),
                "worst unseen T AUC top10%": x["unseen T cells AUC worst"],
                "unseen slides under 0.9": sum(a is not None and a < 0.9 for a in auc.values()),
                "H-0 AUC": auc.get("H-0"),
                "H-4 AUC": auc.get("H-4"),
                "worst T R": x["unseen T cells R worst"],
                "worst B R": x["unseen B cells R worst"],
                "worst epithelium R": x["unseen epithelium R worst"],
                "planted BH fold-mean": sum(v["planted"] for v in x["bh"].values()),
                "planted BH pooled": sum(v["planted"] for v in x["bh_pooled"].values()),
                "of planted": sum(v["of_planted"] for v in x["bh"].values()),
                "controls BH fold-mean": sum(v["controls"] for v in x["bh"].values()),
                "controls BH pooled": sum(v["controls"] for v in x["bh_pooled"].values()),
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="where the cohorts, feature caches and JSONs go")
    ap.add_argument("--held", required=True, help="the unseen slides (he2rna make-sample)")
    ap.add_argument("--held-features", required=True, help="their hed-stats feature cache")
    ap.add_argument("--cohorts", nargs="+", required=True, help="N:SEED per replicate, e.g. 60:11 120:21")
    ap.add_argument("--null-inits", type=int, default=10)
    ap.add_argument("--out", required=True, help="the summary CSV")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.cohorts:
        n, seed = (int(v) for v in spec.split(":"))
        path = run_cohort(work, n, seed, args.held, args.held_features, args.null_inits)
        rows += rows_of(path, n, seed)
        print(pd.DataFrame(rows[-len(VARIANTS) :]).to_string(index=False, header=len(rows) == len(VARIANTS)))
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    meets = table.assign(met=table["unseen slides under 0.9"] == 0).groupby(["slides", "model"])["met"]
    print("\ncohorts whose every unseen slide reaches AUC 0.9 (of cohorts):")
    print(pd.DataFrame({"met": meets.sum(), "of": meets.size()}).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
