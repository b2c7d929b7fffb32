"""Benchmark of feature extraction: the pipeline vs the backbone alone vs a naive loop, same run.

For each backbone, on the same tiles of one slide:

* ``pipeline``: :func:`napari_he2rna.features.extraction.extract_features` (reader threads decode the next batches while
  the model runs on the current one);
* ``backbone_only``: the same batches, already decoded into memory, through the backbone alone: the ceiling
  the pipeline should reach (goal: at least 90%, i.e. reading never starves the model);
* ``naive_loop``: read one tile, run it, repeat.

ResNet50 timings do not depend on the weights' values: without the ImageNet file a seeded random state dict
is used (saved to a temporary file, never downloaded). Run::

    python benchmarks/bench_extract.py [--slide PATH] [--tiles 64] [--device auto]

Results go to ``benchmarks/results/extract_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_he2rna.errors import WeightsError
from napari_he2rna.features.backbones import get_backbone
from napari_he2rna.features.devices import resolve_device
from napari_he2rna.features.extraction import BatchRunner, extract_features
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.slides.tiling import read_tile, read_tiles, tile_grid

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT / "sample_data" / "sample_slide.tiff"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _resnet(device: str, tmp: Path):
    try:
        return get_backbone("resnet50-imagenet", device=device, download=False), "imagenet"
    except WeightsError:
        from torchvision.models import resnet50

        torch.manual_seed(0)
        path = tmp / "resnet50-random.pth"
        torch.save(resnet50().state_dict(), path)
        return get_backbone("resnet50-imagenet", weights=path, device=device), "random (same cost)"


def bench_backbone(slide, grid, backbone, batch_size: int, precision: str, naive_tiles: int) -> dict:
    device = backbone.device
    n = len(grid.table)
    # Warm-up (cuDNN autotune, allocator, thread pools) on one batch.
    extract_features(
        slide,
        grid.__class__(
            grid.table.iloc[:batch_size].reset_index(drop=True),
            grid.tile_px,
            grid.tile_um,
            grid.mpp,
            grid.n_rows,
            grid.n_cols,
            grid.slide_dimensions,
        ),
        backbone,
        batch_size=batch_size,
        precision=precision,
    )

    t = time.perf_counter()
    extract_features(slide, grid, backbone, batch_size=batch_size, precision=precision)
    _sync(device)
    pipeline = n / (time.perf_counter() - t)

    tiles = read_tiles(slide, grid, num_workers=2)
    run = BatchRunner(backbone, batch_size, precision)
    t = time.perf_counter()
    for start in range(0, n, batch_size):
        run(tiles[start : start + batch_size])
    _sync(device)
    backbone_only = n / (time.perf_counter() - t)

    m = min(naive_tiles, n)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(m):
            x = backbone.preprocess(read_tile(slide, grid, i)[None])
            backbone(x).float().cpu()
    naive = m / (time.perf_counter() - t)
    return {
        "tiles": n,
        "batch_size": batch_size,
        "precision": precision,
        "pipeline_tiles_per_s": round(pipeline, 2),
        "backbone_only_tiles_per_s": round(backbone_only, 2),
        "naive_loop_tiles_per_s": round(naive, 2),
        "pipeline_vs_backbone_only": round(pipeline / backbone_only, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--tiles", type=int, default=64, help="ResNet50 tiles (all tiles for hed-stats)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    device = resolve_device(args.device)
    results: dict = {
        "slide": args.slide.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "backbones": {},
    }
    with open_slide(args.slide) as slide, tempfile.TemporaryDirectory() as tmp:
        full = tile_grid(slide, max_tiles=None)
        results["backbones"]["hed-stats"] = bench_backbone(
            slide, full, get_backbone("hed-stats", device=str(device)), args.batch_size, "fp32", 64
        )
        grid = tile_grid(slide, max_tiles=args.tiles, seed=0)
        resnet, weights = _resnet(str(device), Path(tmp))
        precisions = ["fp32", "bf16"] if device.type == "cpu" else ["auto"]
        for precision in precisions:
            r = bench_backbone(slide, grid, resnet, args.batch_size, precision, min(16, args.tiles))
            r["weights"] = weights
            results["backbones"][f"resnet50-imagenet ({precision})"] = r
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"extract_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Feature extraction on `{results['slide']}`, {results['device']} ({results['device_name']}), "
        f"{results['cpu_count']} CPU cores, load average {results['load_average_at_start']} at start.",
        "Timings on a shared machine vary from run to run; compare columns within one run.",
        "",
        "| backbone | tiles | pipeline (tiles/s) | backbone only (tiles/s) | pipeline / backbone "
        "| naive loop |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["backbones"].items():
        lines.append(
            f"| {name} | {r['tiles']} | {r['pipeline_tiles_per_s']} | {r['backbone_only_tiles_per_s']} | "
            f"{r['pipeline_vs_backbone_only']:.0%} | {r['naive_loop_tiles_per_s']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
