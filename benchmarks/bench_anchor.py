"""What the default model costs to train: HE2RNA alone vs the ensemble with and without ``--anchor``.

``he2rna train``'s default trains the ridge baseline, then HE2RNA with its tile scores held near the ridge map
(each batch also runs the fold's linear map over its tiles, without gradients), and averages the two. This
measures, in one run, the wall time of the three ways on the same synthetic supertile cohort (random
features, genes linear in the slide-mean feature plus noise; what is learnt does not matter here, only the
work): ``he2rna`` (``--model-type he2rna``), ``ensemble, anchor 0`` (the previous default) and ``ensemble,
anchor 1`` (the default), as ratios to ``he2rna``. Each runs ``--epochs`` epochs per fold, 5 folds, no
validation split, hidden 1024 1024 (the CLI's default width), batch 16; after a warm-up the three alternate
for ``--rounds`` rounds and the best time of each is kept.

    python benchmarks/bench_anchor.py [--slides 300] [--genes 2000] [--dim 2048] [--epochs 2 6] [--rounds 1]

``--memory`` measures instead the peak memory (max RSS, each in its own process) of one epoch of the ensemble
with and without the anchor in tile mode (6 slides x 8,000 tiles x 2,048 features, 2,000 genes, batch 4: a
batch's tile scores are 4 x 2,000 x 8,000 floats, 256 MB), where the anchor's extra (G, N) tensors matter.

Results: ``benchmarks/results/anchor_cost_<device>.json`` (``anchor_memory_<device>.json`` with ``--memory``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_extract import _cpu_name  # same folder: run as a script, benchmarks/ is on sys.path

from napari_he2rna.cohorts.cohort import load_expression, load_samples, match_cohort
from napari_he2rna.model.fitting import fit
from napari_he2rna.model.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cohort(n_slides: int, n_tiles: int, dim: int, n_genes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {f"S{i:04d}": rng.random((n_tiles, dim), dtype=np.float32) for i in range(n_slides)}
    w = rng.normal(size=(dim, n_genes)).astype(np.float32) / np.sqrt(dim)
    means = np.stack([f.mean(axis=0) for f in feats.values()])
    y = 2.0 + means @ w + rng.normal(0, 0.05, size=(n_slides, n_genes))
    ids = list(feats)
    expression = load_expression(
        pd.DataFrame(10**y - 1, index=ids, columns=[f"G{g:05d}" for g in range(n_genes)]), transform="log"
    )
    samples = load_samples(
        pd.DataFrame(
            {
                "sample_id": ids,
                "patient_id": ids,
                "cancer_type": ["A" if i % 2 else "B" for i in range(n_slides)],
            }
        )
    )
    return match_cohort(expression, samples, feats)[0]


def memory_child(anchor: float) -> None:
    """One tile-mode epoch of the ensemble; prints the peak RSS in MB before and after."""
    cohort = synthetic_cohort(6, 8000, 2048, 2000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    config = TrainConfig(
        mode="tiles",
        hidden=(1024, 1024),
        max_epochs=1,
        n_folds=3,
        val_fraction=0.0,
        ks=(100, 1000),
        anchor=anchor,
    )
    fit(cohort, "ensemble", config)
    print(
        json.dumps(
            {"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        )
    )


def memory() -> int:
    out = {"device": _cpu_name(), "peak_rss_mb": {}}
    for anchor in (0.0, 1.0):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(anchor)],
            capture_output=True,
            text=True,
            check=True,
        )
        out["peak_rss_mb"][f"anchor {anchor:g}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(anchor, out["peak_rss_mb"][f"anchor {anchor:g}"], flush=True)
    peaks = out["peak_rss_mb"]
    out["anchor_extra_mb"] = peaks["anchor 1"]["peak_mb"] - peaks["anchor 0"]["peak_mb"]
    print(json.dumps(out, indent=1))
    (ROOT / "benchmarks" / "results" / "anchor_memory_cpu.json").write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=300)
    ap.add_argument("--tiles", type=int, default=100, help="supertiles per slide")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--epochs", type=int, nargs=2, default=[2, 6], help="two epoch counts (per-epoch slope)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="peak memory with and without the anchor instead")
    ap.add_argument("--memory-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return 0
    if args.memory:
        return memory()
    cohort = synthetic_cohort(args.slides, args.tiles, args.dim, args.genes)
    base = TrainConfig(hidden=(1024, 1024), max_epochs=max(args.epochs), val_fraction=0.0, ks=(50, 100))
    runs = {
        "he2rna": ("he2rna", base),
        "ensemble, anchor 0": ("ensemble", base),
        "ensemble, anchor 1 (default)": ("ensemble", TrainConfig(**{**base.__dict__, "anchor": 1.0})),
    }
    fit(cohort, "ensemble", TrainConfig(**{**base.__dict__, "max_epochs": 1, "anchor": 1.0}))  # warm-up
    seconds: dict[str, dict[int, float]] = {name: {} for name in runs}
    for _ in range(args.rounds):  # the three alternate; the best of each is kept
        for epochs in args.epochs:
            for name, (kind, config) in runs.items():
                t0 = time.perf_counter()
                fit(cohort, kind, TrainConfig(**{**config.__dict__, "max_epochs": epochs}))
                t = round(time.perf_counter() - t0, 1)
                seconds[name][epochs] = min(t, seconds[name].get(epochs, t))
                print(name, epochs, "epochs", t, "s", flush=True)
    lo, hi = min(args.epochs), max(args.epochs)
    # per epoch: the slope between the two epoch counts; once: what is left (the ridge fit, folds, setup)
    per_epoch = {k: round((v[hi] - v[lo]) / max(hi - lo, 1), 2) for k, v in seconds.items()}
    once = {k: round(v[lo] - lo * per_epoch[k], 1) for k, v in seconds.items()}
    out = {
        "device": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args),
        "seconds": {k: {str(e): t for e, t in v.items()} for k, v in seconds.items()},
        "seconds_per_epoch_all_folds": per_epoch,
        "seconds_once": once,
        "per_epoch_ratio_to_he2rna": {k: round(v / per_epoch["he2rna"], 2) for k, v in per_epoch.items()},
    }
    print(json.dumps(out, indent=1))
    path = ROOT / "benchmarks" / "results" / "anchor_cost_cpu.json"
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
