"""Benchmark of the HE2RNA model: training epoch time vs the paper's model written plainly, and inference.

Two figures, each measured in one run as a ratio (the machine is shared; absolute seconds move, ratios less):

1. **Seconds per training epoch** on a supertile cohort (default 1,000 slides x 100 supertiles x 2048
   features, 2,000 genes, hidden 1024-1024, batch 16, one k per batch from (1, 2, 5, 10, 20, 50, 100), Adam):

   * ``ours``: :class:`napari_he2rna.model.network.HE2RNA`, :func:`napari_he2rna.model.network.topk_mean` and
     the batches of
     :mod:`napari_he2rna.model.training` (padding + explicit tile mask);
   * ``plain``: the paper's model as one would write it plainly in PyTorch: ``nn.Sequential`` of
     ``Conv1d(kernel 1)``, ReLU and dropout, top-k by a full ``torch.sort`` of the tile scores, mean of the
     first k, padded tiles pushed down by a large negative fill.

   The two alternate for ``--rounds`` rounds over the same batches in the same process; the best epoch of
   each is kept.

2. **Slide inference at 8,000 tiles** with a 5-fold bundle (2,000 genes, hidden 1024-1024): one gene vs all
   genes (cold: hidden layers computed; warm: a second gene on the same slide, hidden layers cached, which is
   what picking genes one after the other in the viewer costs).

Run::

    python benchmarks/bench_train.py [--slides 1000] [--genes 2000] [--rounds 2]

Results go to ``benchmarks/results/train_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_extract import _cpu_name  # same folder: run as a script, benchmarks/ is on sys.path
from torch import nn

from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.cohort_prediction import SlideBatches
from napari_he2rna.model.network import HE2RNA, topk_mean

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 2, 5, 10, 20, 50, 100)


class PlainHE2RNA(nn.Module):
    """The paper's network written plainly: what a user would otherwise run."""

    def __init__(self, dim: int, genes: int, hidden=(1024, 1024), p: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [dim, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Conv1d(a, b, 1), nn.ReLU(), nn.Dropout(p)]
        layers.append(nn.Conv1d(sizes[-1], genes, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        scores = self.net(x)  # (B, G, N)
        scores = scores.masked_fill(~mask[:, None, :], -1e6)
        top = torch.sort(scores, dim=2, descending=True).values[:, :, :k]
        n = mask.sum(1).clamp(max=k).to(scores.dtype)  # slides with fewer than k tiles: only the real ones
        keep = torch.arange(k)[None, :] < n[:, None]
        return (top * keep[:, None, :]).sum(2) / n[:, None]


def make_cohort(n_slides: int, n_tiles: int, dim: int, n_genes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # A realistic spread of supertile counts: most slides have the full 100, some fewer (small biopsies).
    counts = np.where(rng.random(n_slides) < 0.8, n_tiles, rng.integers(20, n_tiles, n_slides))
    feats = {f"s{i}": rng.random((int(c), dim), dtype=np.float32) for i, c in enumerate(counts)}
    y = rng.random((n_slides, n_genes), dtype=np.float32)
    return feats, y


def epoch_seconds(step, slides: SlideBatches, n: int, batch: int, rng: np.random.Generator) -> float:
    order = rng.permutation(n)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        idx = order[start : start + batch]
        x, mask = slides.batch(idx, torch.device("cpu"))
        step(idx, x, mask, int(rng.choice(KS)))
    return time.perf_counter() - t0


def bench_training(args) -> dict:
    feats, y = make_cohort(args.slides, args.tiles, args.dim, args.genes)
    ids = list(feats)
    slides = SlideBatches(feats, ids, keep_in_memory=True)
    y_t = torch.from_numpy(y)
    torch.manual_seed(0)
    ours = HE2RNA(args.dim, args.genes, (1024, 1024))
    plain = PlainHE2RNA(args.dim, args.genes, (1024, 1024))
    opt_o = torch.optim.Adam(ours.parameters(), lr=3e-4)
    opt_p = torch.optim.Adam(plain.parameters(), lr=3e-4)
    ours.train()
    plain.train()

    def step_ours(idx, x, mask, k):
        loss = nn.functional.mse_loss(topk_mean(ours(x, mask), mask, k), y_t[idx])
        opt_o.zero_grad(set_to_none=True)
        loss.backward()
        opt_o.step()

    def step_plain(idx, x, mask, k):
        loss = nn.functional.mse_loss(plain(x, mask, k), y_t[idx])
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    best = {"ours": np.inf, "plain": np.inf}
    for r in range(args.rounds):
        for name, step in (("ours", step_ours), ("plain", step_plain)):
            s = epoch_seconds(step, slides, len(ids), 16, np.random.default_rng(r))
            best[name] = min(best[name], s)
            print(f"round {r + 1}: {name} {s:.1f} s/epoch", flush=True)
    return {
        "epoch_s_ours": round(best["ours"], 2),
        "epoch_s_plain": round(best["plain"], 2),
        "ours_speedup": round(best["plain"] / best["ours"], 2),
    }


def bench_inference(args) -> dict:
    torch.manual_seed(1)
    genes = [f"G{i}" for i in range(args.genes)]
    models = [HE2RNA(args.dim, args.genes, (1024, 1024)).eval() for _ in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_bundle(Path(tmp) / "b.safetensors", models, genes, "resnet50-imagenet", args.dim, 112, KS)
        bundle = load_bundle(path)
    feats = np.random.default_rng(2).random((8000, args.dim), dtype=np.float32)

    def timed(fn, reps=3):
        best = np.inf
        for _ in range(reps):
            bundle._hidden_cache = None if fn is not warm else bundle._hidden_cache
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def one():
        bundle.tile_scores(feats, [genes[0]])

    def all_genes():
        bundle.tile_scores(feats)

    def warm():
        bundle.tile_scores(feats, [genes[1]])

    cold_one, cold_all = timed(one), timed(all_genes)
    bundle.tile_scores(feats, [genes[0]])  # fill the hidden cache, then time another gene
    warm_one = timed(warm)
    return {
        "tiles": 8000,
        "infer_s_one_gene_cold": round(cold_one, 3),
        "infer_s_all_genes_cold": round(cold_all, 3),
        "infer_s_next_gene_warm": round(warm_one, 4),
        "all_over_one": round(cold_all / cold_one, 2),
        "cold_over_warm": round(cold_one / warm_one, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=100, help="supertiles per slide")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {
        "device": "cpu",
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "slides": args.slides,
        "supertiles": args.tiles,
        "dim": args.dim,
        "genes": args.genes,
        "rounds": args.rounds,
    }
    res.update(bench_training(args))
    res.update(bench_inference(args))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in res.items()),
    ]
    (out / "train_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
