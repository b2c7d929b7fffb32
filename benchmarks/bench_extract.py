"""Benchmark of feature extraction: the pipeline against the backbone alone on the same tensors, with where
the difference goes.

On a synthetic pyramidal TIFF (JPEG tiles, an H&E-like texture; ``gpu_check.make_slide``) of ``--tiles``
tissue tiles, ResNet50 with seeded random weights saved to a local file (timings do not depend on the
weights' values; nothing is downloaded), at the precision ``auto`` picks on this machine:

* ``pipeline``: :func:`napari_he2rna.features.extraction.extract_features` (reader threads decode the next
  batches while the model runs on the current one);
* ``backbone_alone``: the network's forward pass (under the same autocast) on the very input tensors the
  pipeline feeds it, made beforehand: the ceiling. ``pipeline_vs_backbone`` is the goal's ratio (>= 0.9);
* ``batch_runner``: :class:`~napari_he2rna.features.extraction.BatchRunner` on the same tiles already decoded
  in memory (normalisation + forward + copy out), the pipeline without its reads;
* ``ms_per_tile``: each step alone on the same tiles: the tile reads (``read_region``: decode and the
  RGBA->RGB copy; then the white canvas and any resize of ``read_tile_at``; each on a slide opened afresh,
  so OpenSlide's tile cache is empty, as in an extraction, which reads every tile once), ``preprocess``
  (uint8 -> normalised float), the forward pass, the copy of the features out; ``cpu_ms_per_tile``, the
  CPU time of each (on 2 cores every CPU second of the readers is taken from the model);
* ``input_layout``: the forward pass on the channels-last input ``preprocess`` makes against the same values
  made contiguous NCHW;
* ``passes_tiles_per_s``: pipeline and backbone alone alternate ``--repeats`` times, the best of each is kept;
* ``naive_loop``: read one tile, run it, repeat (``--naive-tiles``).

Run::

    python benchmarks/bench_extract.py [--tiles 300] [--precision auto] [--batch-size 32]

Results go to ``benchmarks/results/extract_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import make_slide, resnet50_backbone  # noqa: E402

from napari_he2rna.features.devices import resolve_device  # noqa: E402
from napari_he2rna.features.extraction import BatchRunner, effective_precision, extract_features  # noqa: E402
from napari_he2rna.features.precision import cpu_model  # noqa: E402
from napari_he2rna.slides.slide import open_slide  # noqa: E402
from napari_he2rna.slides.tiling import read_tile, read_tiles, tile_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    """The CPU's model name (``bench_train.py`` and ``bench_train_scale.py`` import it from here)."""
    return cpu_model() or platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    _sync(device)
    c, t = _cpu_s(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t, _cpu_s() - c


def _steal() -> float:
    """Cumulative steal ticks of all CPUs (/proc/stat), 0 where unknown."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return float(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])
    return 0.0


def bench(
    path: Path, backbone, batch_size: int, precision: str, workers: int, naive_tiles: int, repeats: int
) -> dict:
    """Every figure on the slide at ``path``, each step that reads tiles on a slide opened afresh (OpenSlide's
    tile cache empty: a slide's tiles are read once in an extraction)."""
    device = backbone.device
    with open_slide(path) as slide:
        grid = tile_grid(slide, tile_um=112.0, max_tiles=None, seed=0)
        tiles = read_tiles(slide, grid, None, backbone.input_px, workers)
    n = len(grid.table)
    batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    run = BatchRunner(backbone, batch_size, precision)
    side = backbone.input_px

    def autocast():
        if run.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=run.dtype)

    # Warm-up (thread pools, oneDNN primitives, allocator) on one batch through both paths.
    run(tiles[:batch_size])

    with torch.inference_mode():
        inputs = [backbone.preprocess(torch.from_numpy(tiles[b])) for b in batches]
        if run.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    outs: list = []

    def forward() -> None:
        with torch.inference_mode(), autocast():
            outs[:] = [backbone(x) for x in inputs]

    def pipeline() -> None:
        with open_slide(path) as slide:
            extract_features(
                slide, grid, backbone, batch_size=batch_size, precision=precision, num_workers=workers
            )

    # The pipeline and the backbone alone alternate ``repeats`` times; the best of each is kept (a shared
    # machine's other jobs slow single passes by up to 2x), all passes are listed.
    wall, cpu, passes = {}, {}, {"pipeline": [], "backbone_alone": []}
    for _ in range(max(repeats, 1)):
        for key, fn in (("pipeline", pipeline), ("backbone_alone", forward)):
            w, c = _timed(fn, device)
            passes[key].append(round(n / w, 2))
            if key not in wall or w < wall[key]:
                wall[key], cpu[key] = w, c
    wall["batch_runner"], cpu["batch_runner"] = _timed(lambda: [run(tiles[b]) for b in batches], device)

    with torch.inference_mode():
        wall["preprocess"], cpu["preprocess"] = _timed(
            lambda: [backbone.preprocess(torch.from_numpy(tiles[b])) for b in batches], device
        )
        wall["copy_out"], cpu["copy_out"] = _timed(lambda: [o.float().cpu().numpy() for o in outs], device)

    # The input's memory layout: preprocess permutes NHWC tiles, so its output is channels-last in memory;
    # the same values made contiguous NCHW, on the first batches (how much a plain .contiguous() would cost).
    few = inputs[: min(3, len(inputs))]
    k = sum(len(x) for x in few)
    with torch.inference_mode(), autocast():
        wall_cl, _ = _timed(lambda: [backbone(x) for x in few], device)
        nchw = [x.contiguous() for x in few]
        wall_nchw, _ = _timed(lambda: [backbone(x) for x in nchw], device)
    layout = {
        "preprocess_output_channels_last": bool(inputs[0].is_contiguous(memory_format=torch.channels_last)),
        "forward_channels_last_tiles_per_s": round(k / wall_cl, 2),
        "forward_contiguous_nchw_tiles_per_s": round(k / wall_nchw, 2),
    }

    # The reads alone, as the pipeline makes them (one read_tiles per batch), then their parts in one thread.

    def reads(slide) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda b: read_tiles(slide, grid, b, side, 1), batches))

    xs, ys = grid.table["x"].to_numpy(), grid.table["y"].to_numpy()
    with open_slide(path) as slide:
        wall["reads"], cpu["reads"] = _timed(lambda: reads(slide), device)
    with open_slide(path) as slide:
        level = slide.get_best_level_for_downsample(grid.tile_px / side)
        w = max(int(round(grid.tile_px / float(slide.level_downsamples[level]))), 1)
        wall["read_region_1thread"], cpu["read_region_1thread"] = _timed(
            lambda: [slide.read_region((int(x), int(y)), level, (w, w)) for x, y in zip(xs, ys, strict=True)],
            device,
        )
    with open_slide(path) as slide:
        wall["read_tiles_1thread"], cpu["read_tiles_1thread"] = _timed(
            lambda: read_tiles(slide, grid, None, side, 1), device
        )

    m = min(naive_tiles, n)
    with open_slide(path) as slide, torch.inference_mode(), autocast():
        t = time.perf_counter()
        for i in range(m):
            backbone(backbone.preprocess(read_tile(slide, grid, i, side)[None])).float().cpu()
        naive = m / (time.perf_counter() - t)

    def ms(key: str) -> float:
        return round(1000 * wall[key] / n, 2)

    pipeline, alone = n / wall["pipeline"], n / wall["backbone_alone"]
    return {
        "tiles": n,
        "tile_px_read": side,
        "level_read": level,
        "batch_size": batch_size,
        "reader_threads": workers,
        "precision": effective_precision(backbone, precision),
        "pipeline_tiles_per_s": round(pipeline, 2),
        "backbone_alone_tiles_per_s": round(alone, 2),
        "batch_runner_tiles_per_s": round(n / wall["batch_runner"], 2),
        "naive_loop_tiles_per_s": round(naive, 2),
        "pipeline_vs_backbone": round(pipeline / alone, 3),
        "passes_tiles_per_s": passes,
        "pipeline_vs_batch_runner": round(wall["batch_runner"] / wall["pipeline"], 3),
        "ms_per_tile": {
            "pipeline": ms("pipeline"),
            "backbone_alone": ms("backbone_alone"),
            "preprocess": ms("preprocess"),
            "copy_out": ms("copy_out"),
            "reads_in_reader_threads": ms("reads"),
            "read_region_1thread": ms("read_region_1thread"),
            "read_tiles_1thread": ms("read_tiles_1thread"),
            "canvas_and_resize_1thread": round(ms("read_tiles_1thread") - ms("read_region_1thread"), 2),
        },
        "cpu_ms_per_tile": {k: round(1000 * v / n, 2) for k, v in cpu.items()},
        "input_layout": layout,
        "pipeline_cpu_use": round(cpu["pipeline"] / wall["pipeline"], 2),
        "backbone_alone_cpu_use": round(cpu["backbone_alone"] / wall["backbone_alone"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=300, help="tissue tiles of the synthetic slide")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="reader threads (the package's default)")
    parser.add_argument("--naive-tiles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of pipeline and backbone")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    device = resolve_device(args.device)
    results: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__,
        "weights": "seeded random ResNet50 state dict, saved locally (same cost as ImageNet's)",
    }
    t0, steal0 = time.perf_counter(), _steal()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["slide"] = make_slide(tmp / "slide.tiff", args.tiles)
        backbone = resnet50_backbone(device, tmp / "resnet50-random.pth")
        r = bench(
            tmp / "slide.tiff",
            backbone,
            args.batch_size,
            args.precision,
            args.workers,
            args.naive_tiles,
            args.repeats,
        )
    results["resnet50"] = r
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    results["steal_s"] = round((_steal() - steal0) / ticks, 2)
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"extract_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    ms = r["ms_per_tile"]
    lines = [
        f"ResNet50 extraction, {r['tiles']} tiles of a synthetic slide, {results['device']} "
        f"({results['device_name']}, {results['cpu_count']} cores), precision {r['precision']}, batch "
        f"{r['batch_size']}, {r['reader_threads']} reader threads; load average "
        f"{results['load_average_at_start']} at start, {results['load_average_at_end']} at end; "
        f"steal {results['steal_s']} s.",
        "",
        "| pipeline | backbone alone | pipeline / backbone | BatchRunner on decoded tiles | naive loop |",
        "|---|---|---|---|---|",
        f"| {r['pipeline_tiles_per_s']} | {r['backbone_alone_tiles_per_s']} "
        f"| {r['pipeline_vs_backbone']:.0%} "
        f"| {r['batch_runner_tiles_per_s']} | {r['naive_loop_tiles_per_s']} |",
        "",
        "ms per tile: " + ", ".join(f"{k} {v}" for k, v in ms.items()),
        "CPU ms per tile: " + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_tile"].items()),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
