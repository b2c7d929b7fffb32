"""Feature stores in float16 vs float32: their size on disk and how long a read takes.

Writes one store of each dtype through :func:`napari_he2rna.features.cache.load_or_extract` (the writer of
``he2rna extract``, its chunks and checksums) for ``--tiles`` tiles of a synthetic slide, with a stand-in
``--dim``-d backbone (seeded random 1x1 convolutions, ReLU, global average pool: non-negative, mostly
non-zero features shaped like a CNN's, at a cost that lets the benchmark run in a minute; a real ResNet50
would take minutes on a CPU and write the same kind of array). Then reads each store ``--repeats`` times:

* ``read_features``: what all-tile training reads every epoch (float32 out, shape checked only);
* ``read_cache``: what opening a store costs once (every array, checksums, finiteness);
* ``zarr_read_as_stored``: the features array read in its own dtype, no cast (what the cast to float32 adds
  to ``read_features`` is the difference);

each from a cold page cache (every file of the store evicted with ``posix_fadvise(DONTNEED)``, which needs
no root) and warm (read just before). Sizes are the bytes of the store's files (``features`` alone and the
whole store), as ``du`` counts them. Results go to ``benchmarks/results/store_dtype_cpu.json``.

Run::

    python benchmarks/bench_store_dtype.py [--tiles 8000 --dim 2048 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_extract import _cpu_name  # same folder: run as a script, benchmarks/ is on sys.path
from torch import nn

from napari_he2rna.features.backbone_base import Backbone
from napari_he2rna.features.cache import cache_path, load_or_extract, read_cache, read_features
from napari_he2rna.features.extraction import ExtractOptions
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.synthetic.cohort import make_slide

HERE = Path(__file__).resolve().parent
TILE_UM = 10.0  # 20 px tiles at 0.5 µm/px: over 8,000 tissue tiles on a 2,800 px square slide


class PooledReluBackbone(Backbone):
    """``dim`` features: a seeded random 1x1 convolution of the tile, ReLU, global average pool."""

    name = "bench-pooled-relu"
    input_px = 16
    weights_hash = "bench-seed-0"
    autocast = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.conv = nn.Conv2d(3, self.dim, kernel_size=1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.randn(self.dim, generator=generator))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _files(store: Path, under: str = "") -> list[Path]:
    root = store / under if under else store
    return [p for p in root.rglob("*") if p.is_file()]


def _disk_bytes(files: list[Path]) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in files)  # allocated blocks, as du counts


def _evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_as_stored(store: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(store), mode="r")["features"][:])


def _time(fn, files: list[Path], repeats: int, cold: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        if cold:
            _evict(files)
        else:
            fn()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    backbone = PooledReluBackbone(args.dim)
    load_start = os.getloadavg()
    out: dict = {
        "tiles": args.tiles,
        "dim": args.dim,
        "repeats": args.repeats,
        "device": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in load_start],
        "backbone": "seeded random 1x1 conv + ReLU + global average pool (a CNN's feature shape)",
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="he2rna-store-dtype-", dir=args.tmp) as tmp:
        slide_path = Path(tmp) / "bench.tiff"
        side = int(args.side)
        make_slide(slide_path, seed=0, size_px=(side, side), write_truth=False)
        features = {}
        for dtype in ("float32", "float16"):
            options = ExtractOptions(tile_um=TILE_UM, max_tiles=args.tiles, dtype=dtype, device="cpu")
            with open_slide(slide_path) as slide:
                _, feats = load_or_extract(slide, backbone, options, cache_dir=Path(tmp) / dtype)
                store = cache_path(slide, backbone, cache_dir=Path(tmp) / dtype, options=options)
            features[dtype] = feats
            every, of_features = _files(store), _files(store, "features")
            shape = feats.shape
            entry = {
                "n_tiles": int(shape[0]),
                "features_bytes_on_disk": _disk_bytes(of_features),
                "store_bytes_on_disk": _disk_bytes(every),
                "features_bytes_raw": int(np.dtype(dtype).itemsize * shape[0] * shape[1]),
            }
            for name, fn in {
                "read_features": lambda s=store, sh=shape: read_features(s, sh),
                "read_cache": lambda s=store: read_cache(s),
                "zarr_read_as_stored": lambda s=store: _read_as_stored(s),  # read_features less the cast
            }.items():
                for state in ("cold", "warm"):
                    times = _time(fn, every, args.repeats, cold=state == "cold")
                    entry[f"{name}_{state}_s_median"] = round(statistics.median(times), 4)
                    entry[f"{name}_{state}_s_all"] = [round(t, 4) for t in times]
            out["stores"][dtype] = entry
        f32, f16 = features["float32"], features["float16"]
        out["max_abs_difference"] = float(np.abs(f32 - f16).max())
        normal = np.abs(f32) >= np.finfo(np.float16).tiny  # below it float16 is subnormal: absolute steps
        out["max_relative_difference_normal_range"] = float(
            (np.abs(f32 - f16)[normal] / np.abs(f32[normal])).max()
        )
    a, b = out["stores"]["float32"], out["stores"]["float16"]
    out["ratios_float16_over_float32"] = {
        key: round(b[key] / a[key], 3)
        for key in a
        if key.endswith("_median") or key.endswith("bytes_on_disk")
    }
    out["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=8000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--side", type=int, default=2800, help="slide side in px (enough tissue for --tiles)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tmp", default=None, help="folder for the stores (default: the system's temp folder)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "store_dtype_cpu.json")
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "stores"}, indent=2))
    for dtype, entry in result["stores"].items():
        print(dtype, {k: v for k, v in entry.items() if not k.endswith("_all")})
    return result


if __name__ == "__main__":
    main()
