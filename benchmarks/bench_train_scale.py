"""Benchmark of all-tile HE2RNA training streaming its features from disk vs holding them in memory.

Builds (or reuses) a simulated cohort on disk: ``--slides`` feature stores of ``--tiles x --dim`` random
features (``--dtype``, default float16), each a zarr group with a ``features`` array chunked as
``he2rna extract`` writes it, read back as float32 by :func:`napari_he2rna.features.cache.read_features` (the
read the trainer makes of a store checked when opened). Then trains all-tile HE2RNA (hidden 1024-1024, batch
4, one k per batch from the paper's all-tile list, Adam, MSE) for ``--batches`` batches twice, on the same
slides and batches in the same process:

* ``streaming``: :class:`napari_he2rna.model.cohort_prediction.SlideBatches` over the stores, read ahead by
  :func:`napari_he2rna.model.prefetch.iter_batches`, as :func:`napari_he2rna.model.training.train_one` reads;
* ``in_memory``: the same slides' float32 matrices already in memory (a subset when the cohort does not fit:
  ``--memory-slides``).

The page cache is dropped before the streaming run where the process may (root:
``echo 3 > /proc/sys/vm/drop_caches``); the JSON says whether it was (``page_cache``: ``cold`` or ``warm``).
JSON fields: per-batch seconds, the ratio in-memory / streaming of the best round of each (goal >= 0.9;
also over all rounds, by means and medians), read MB/s
(stored bytes over the streaming run's wall time, and a read-only pass), and the compute's busy share (the
share of the streaming run's wall time not spent waiting for a batch).

Run::

    python benchmarks/bench_train_scale.py [--slides 300 --tiles 8000 --dim 2048]   # ~10 GB float16
    python benchmarks/bench_train_scale.py --slides 60 --tiles 2000 --batches 15       # a 2-core CPU

Results go to ``benchmarks/results/train_scale_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from bench_extract import _cpu_name  # same folder: run as a script, benchmarks/ is on sys.path

from napari_he2rna.features.cache import read_features
from napari_he2rna.features.devices import resolve_device
from napari_he2rna.model.cohort_prediction import SlideBatches
from napari_he2rna.model.network import FULL_TILE_KS, HE2RNA, topk_mean
from napari_he2rna.model.prefetch import PREFETCH_DEPTH, iter_batches

HERE = Path(__file__).resolve().parent
CHUNK_ROWS = 256  # he2rna extract: batch size 32 x 8 rows per chunk


def build_cohort(root: Path, slides: int, tiles: int, dim: int, dtype: str, seed: int = 0) -> list[Path]:
    """``slides`` stores under ``root`` (kept: a rerun with the same sizes reuses them)."""
    import zarr

    root.mkdir(parents=True, exist_ok=True)
    spec = {"slides": slides, "tiles": tiles, "dim": dim, "dtype": dtype, "seed": seed}
    marker = root / "cohort.json"
    stores = [root / f"slide{i:04d}.zarr" for i in range(slides)]
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(s.is_dir() for s in stores):
        return stores
    shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for store in stores:
        group = zarr.open_group(str(store), mode="w")
        arr = group.create_array("features", shape=(tiles, dim), dtype=dtype, chunks=(CHUNK_ROWS, dim))
        arr[:] = rng.standard_normal((tiles, dim), dtype=np.float32).astype(dtype)
    marker.write_text(json.dumps(spec))
    return stores


class StoreFeatures(dict):
    """``sample_id -> store``, read on demand as the trainer reads a checked store (shape only)."""

    def __init__(self, stores: list[Path], shape: tuple[int, int]) -> None:
        super().__init__({s.stem: s for s in stores})
        self.shape = shape

    def __getitem__(self, key: str) -> np.ndarray:
        return read_features(dict.__getitem__(self, key), self.shape)


def drop_page_cache() -> str:
    """``cold`` when the page cache could be dropped, else ``warm (why)``."""
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold"
    except OSError as exc:
        return f"warm (could not drop the page cache: {exc.strerror or exc})"


def train_batches(
    features, ids: list[str], batches: list[np.ndarray], dim: int, n_genes: int, device: torch.device, depth
) -> dict:
    """All-tile training steps of :func:`napari_he2rna.model.training.train_one` over ``batches``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = HE2RNA(dim, n_genes, (1024, 1024), 0.25).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    y = torch.from_numpy(rng.normal(size=(len(ids), n_genes)).astype(np.float32))
    slides = SlideBatches(features, ids, keep_in_memory=False)
    stats: dict = {}
    times: list[float] = []
    t_start = t_prev = time.perf_counter()
    with closing(iter_batches(slides, batches, device, depth, stats)) as stream:
        for batch, (x, mask) in zip(batches, stream, strict=True):
            k = int(rng.choice(FULL_TILE_KS))
            loss = torch.nn.functional.mse_loss(topk_mean(model(x, mask), mask, k), y[batch].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss.detach())  # waits for the device
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
    wall = time.perf_counter() - t_start
    return {
        "batch_s": [round(t, 4) for t in times],
        "wall_s": round(wall, 3),
        "wait_s": round(stats["wait_s"], 4),
    }


def run(args: argparse.Namespace) -> dict:
    load_start = list(os.getloadavg())
    device = resolve_device(args.device)
    name = f"he2rna_train_scale_{args.slides}x{args.tiles}x{args.dim}_{args.dtype}"
    root = Path(args.root) if args.root else Path(tempfile.gettempdir()) / name
    t0 = time.perf_counter()
    stores = build_cohort(root, args.slides, args.tiles, args.dim, args.dtype)
    build_s = time.perf_counter() - t0
    stored = sum(f.stat().st_size for s in stores for f in s.rglob("*") if f.is_file())
    ids = [s.stem for s in stores]
    n_used = min(args.batches * args.batch_size, len(ids))
    mem_slides = min(args.memory_slides or n_used, n_used)
    rng = np.random.default_rng(1)
    order = rng.permutation(mem_slides)  # the in-memory subset; streaming reads the same slides
    reps = int(np.ceil(args.batches * args.batch_size / len(order)))
    flat = np.concatenate([rng.permutation(order) for _ in range(reps)])
    batches = [flat[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.batches)]
    shape = (args.tiles, args.dim)
    on_disk = StoreFeatures(stores, shape)
    state_read = drop_page_cache()
    t0 = time.perf_counter()
    in_mem = {ids[i]: on_disk[ids[i]] for i in order}  # the read-only pass, cold
    read_s = time.perf_counter() - t0
    used_bytes = stored / len(stores) * len(order)
    # Untimed warm-up (allocator, thread pools), then the two alternate, the page cache dropped each time.
    train_batches(in_mem, ids, batches[:2], args.dim, args.genes, device, PREFETCH_DEPTH)
    runs: dict[str, list[dict]] = {"streaming": [], "in_memory": []}
    states = []
    for _ in range(args.rounds):
        states.append(drop_page_cache())
        for kind, features in (("streaming", on_disk), ("in_memory", in_mem)):
            run_ = train_batches(features, ids, batches, args.dim, args.genes, device, PREFETCH_DEPTH)
            runs[kind].append(run_)
    state = states[0] if len(set(states)) == 1 else "; ".join(states)
    skip = 1 if args.batches > 2 else 0  # a run's first batch has no batch read ahead of it
    times = {k: [t for r in v for t in r["batch_s"][skip:]] for k, v in runs.items()}
    med_stream, med_mem = statistics.median(times["streaming"]), statistics.median(times["in_memory"])
    mean_stream, mean_mem = float(np.mean(times["streaming"])), float(np.mean(times["in_memory"]))
    # The machine is shared: the least disturbed round of each (as bench_train.py keeps its best epoch).
    best = {k: min(float(np.mean(r["batch_s"][skip:])) for r in v) for k, v in runs.items()}
    joined = {
        k: {"batch_s": [r["batch_s"] for r in v], **{x: sum(r[x] for r in v) for x in ("wall_s", "wait_s")}}
        for k, v in runs.items()
    }
    streaming, memory = joined["streaming"], joined["in_memory"]
    read_bytes = stored / len(stores) * args.batches * args.batch_size * args.rounds
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_start,
        "torch": torch.__version__,
        "cohort": {
            "root": str(root),
            "slides": args.slides,
            "tiles": args.tiles,
            "dim": args.dim,
            "dtype": args.dtype,
            "stored_mb": round(stored / 1e6, 1),
            "build_s": round(build_s, 1),
        },
        "training": {
            "hidden": [1024, 1024],
            "genes": args.genes,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "slides_used": int(len(order)),
            "prefetch_depth": PREFETCH_DEPTH,
            "ks": list(FULL_TILE_KS),
            "rounds": args.rounds,
            "first_batch_of_each_run_left_out": bool(skip),
            # with a subset smaller than batches x batch size, a round reads some slides twice (page cache)
            "slides_read_again_in_a_round": bool(len(order) < args.batches * args.batch_size),
        },
        "page_cache": state,
        "page_cache_read_pass": state_read,
        "read_only_mb_s": round(used_bytes / 1e6 / read_s, 1),
        "streaming": streaming,
        "in_memory": memory,
        "median_batch_s": {"streaming": round(med_stream, 4), "in_memory": round(med_mem, 4)},
        "mean_batch_s": {"streaming": round(mean_stream, 4), "in_memory": round(mean_mem, 4)},
        "best_round_mean_batch_s": {k: round(v, 4) for k, v in best.items()},
        "ratio_in_memory_over_streaming": round(best["in_memory"] / best["streaming"], 3),
        "ratio_of_means_all_rounds": round(mean_mem / mean_stream, 3),
        "ratio_of_medians_all_rounds": round(med_mem / med_stream, 3),
        "goal": ">= 0.9",
        "read_mb_s_streaming": round(read_bytes / 1e6 / streaming["wall_s"], 1),
        "busy_share_streaming": round(1 - streaming["wait_s"] / streaming["wall_s"], 3),
        "busy_share_in_memory": round(1 - memory["wait_s"] / memory["wall_s"], 3),
        "load_average_at_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=300)
    p.add_argument("--tiles", type=int, default=8000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="streaming and in-memory runs, alternating")
    p.add_argument("--memory-slides", type=int, default=None, help="in-memory subset (default: all used)")
    p.add_argument("--device", default="auto")
    p.add_argument("--root", default=None, help="cohort folder (default: in $TMPDIR)")
    p.add_argument("--out", default=None, help="JSON to write (default: results/train_scale_<device>.json)")
    args = p.parse_args(argv)
    result = run(args)
    kind = result["device"].split(":")[0]
    out = Path(args.out) if args.out else HERE / "results" / f"train_scale_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("streaming", "in_memory")}, indent=1))
    return result


if __name__ == "__main__":
    main()
