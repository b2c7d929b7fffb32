"""GPU check of napari-he2rna: extraction, training and GPU-vs-CPU features on one machine, one JSON.

Meant for a machine with a CUDA GPU (``benchmarks/gpu_check.sh`` sets up ``.venv`` and calls this). Nothing is
downloaded: every network has random weights (ResNet50's seeded state dict saved to a local file and read by
the package as a weights file, the way the tests do it; the ViT is built by timm with ``pretrained=False``).

1. **Slide**: a synthetic pyramidal TIFF with ``--tiles`` tissue tiles (default 8,000 of 112 µm at
   0.5 µm/px, JPEG tiles, an H&E-like texture on white glass), written by the package's TIFF writer.
2. **Extraction**, per backbone (ResNet50, the paper's; ``--vit`` ViT-L/16 with UNI's timm settings, the
   foundation-model shape), at the precision ``auto`` picks on the device:

   * ``pipeline_tiles_per_s``: :func:`napari_he2rna.features.extraction.iter_features` over every tile of the
     slide (reader threads decode the next batches while the backbone runs on the current one);
   * ``backbone_only_tiles_per_s``: the same tiles, already decoded in memory, through
     :class:`~napari_he2rna.features.extraction.BatchRunner` alone (its ceiling);
   * ``gpu_vs_cpu``: the first ``--match-tiles`` tiles through the same network on the CPU in fp32, against
     the device in fp32 and at the ``auto`` precision: the per-tile cosine (goal: >= 0.999 for every tile).

3. **Training**: all-tile HE2RNA (:func:`napari_he2rna.model.training.train_one`, hidden 1024-1024, batches of
   4 slides, one k per batch from the paper's full-scale list) on a simulated cohort of random features
   written to one zarr store per slide, read through :class:`napari_he2rna.cohorts.cohort.LazyFeatures` and
   :class:`napari_he2rna.model.cohort_prediction.SlideBatches` (streamed from disk as ``train_one`` reads
   all tiles: with its read-ahead where it has one, :func:`read_ahead`), then the same slides already in
   memory: batches/s of each, per epoch, their ratio, the read MB/s and the share of the time the training
   thread waited for data. The stores' pages are dropped from the page cache after writing
   (``posix_fadvise(DONTNEED)``), so the first streamed epoch reads from disk.

``--cpu-smoke`` runs all of it on the CPU at tiny sizes (32 tiles, a ViT-Tiny instead of ViT-L, 8 slides of
256 tiles: 2 batches an epoch) in well under a minute: the test suite runs it. Usage::

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
#: The cosine every tile's GPU features must reach against the CPU's (fp32) features.
MIN_COSINE = 0.999
#: Sizes of a full check and of ``--cpu-smoke`` (each can be changed on the command line).
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "tiles": 8000,
        "batch_size": 128,
        "match_tiles": 256,
        "vit_arch": "vit_large_patch16_224",
        "train_slides": 64,
        "train_tiles": 8000,
        "train_genes": 2000,
        "train_epochs": 2,
    },
    "cpu-smoke": {
        "tiles": 32,
        "batch_size": 16,
        "match_tiles": 16,
        "vit_arch": "vit_tiny_patch16_224",
        "train_slides": 8,
        "train_tiles": 256,
        "train_genes": 50,
        "train_epochs": 1,
    },
}
MPP = 0.5
TILE_UM = 112.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device's name and the machine's CPU."""
    from napari_he2rna.features.precision import cpu_model

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        env["tf32_convolutions"] = bool(torch.backends.cudnn.allow_tf32)
        env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        with contextlib.suppress(Exception):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    for module in ("torchvision", "timm", "zarr", "openslide"):
        with contextlib.suppress(Exception):
            env[module] = __import__(module).__version__
    return env


# -------------------------------------------------------------------------------------------------- slide
def _texture(side: int, rng: np.random.Generator) -> np.ndarray:
    """An H&E-like square: pink stroma, purple nuclei in patches, noise (every tile of a slide differs)."""
    coarse = rng.random((side // 50 + 1, side // 50 + 1))
    kind = np.kron(coarse, np.ones((50, 50)))[:side, :side]
    pink = np.array([226, 150, 190], dtype=np.float32)
    purple = np.array([120, 70, 160], dtype=np.float32)
    nuclei = rng.random((side, side)) < 0.05 + 0.25 * kind
    img = np.where(nuclei[..., None], purple, pink) + rng.normal(0, 12, (side, side, 3)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def make_slide(path: Path, n_tiles: int, seed: int = 0) -> dict[str, Any]:
    """A pyramidal TIFF whose tissue (a square on white glass) holds at least ``n_tiles`` whole tiles."""
    from napari_he2rna.synthetic.writers import write_pyramid_tiff

    t0 = time.perf_counter()
    tile_px = round(TILE_UM / MPP)
    per_side = int(np.ceil(np.sqrt(n_tiles))) + 1
    tissue = per_side * tile_px
    margin = max(2 * tile_px, tissue // 16)  # enough glass for the tissue threshold
    side = tissue + 2 * margin
    rgb = np.full((side, side, 3), 243, dtype=np.uint8)
    block = _texture(1000, np.random.default_rng(seed))  # 1000 px: not a multiple of the tile side
    reps = int(np.ceil(tissue / block.shape[0]))
    textured = np.tile(block, (reps, reps, 1))[:tissue, :tissue]
    rgb[margin : margin + tissue, margin : margin + tissue] = textured
    write_pyramid_tiff(path, rgb, mpp=MPP, description="napari-he2rna gpu_check slide")
    return {"side_px": side, "mpp": MPP, "tile_um": TILE_UM, "write_s": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------------ backbones
def resnet50_backbone(device: torch.device, weights: Path):
    """The package's ResNet50 from a seeded random state dict saved locally (written once)."""
    from napari_he2rna.features.backbones import get_backbone

    if not weights.is_file():
        from torchvision.models import resnet50

        torch.manual_seed(0)
        torch.save(resnet50().state_dict(), weights)
    return get_backbone("resnet50-imagenet", weights=weights, device=str(device), download=False)


def vit_backbone(device: torch.device, arch: str, state: dict | None = None):
    """The package's timm encoder wrapper (:class:`~napari_he2rna.features.hub.HubBackbone`) around a
    random-weights ``arch`` built with UNI's settings (ViT-L/16, class token): no hub, no download.

    ``state`` (a state dict) gives the same weights to a second copy, e.g. on the CPU.
    """
    import timm

    from napari_he2rna.features.backbones import BACKBONES
    from napari_he2rna.features.hub import HubBackbone

    uni = BACKBONES["uni"].hub
    kwargs = dict(uni.timm_kwargs) if arch == uni.architecture else {}
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if state is not None:
        net.load_state_dict(state)
    backbone = HubBackbone(
        f"random-{arch}",
        net,
        uni,
        int(net.num_features),
        224,
        uni.mean,
        uni.std,
        int(getattr(net, "num_prefix_tokens", 1)),
        f"random-seed0-{arch}",
    )
    return backbone.eval().to(device)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two ``(n, d)`` arrays (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def _cos_summary(c: np.ndarray) -> dict[str, Any]:
    return {
        "min_cosine": round(float(c.min()), 6),
        "median_cosine": round(float(np.median(c)), 6),
        "tiles_below_goal": int((c < MIN_COSINE).sum()),
        "pass": bool(c.min() >= MIN_COSINE),
    }


def extraction_figures(
    slide,
    grid,
    backbone,
    cpu_copy: Callable[[], Any],
    batch_size: int,
    num_workers: int,
    match_tiles: int,
) -> dict[str, Any]:
    """Pipeline vs backbone-only tiles/s at the ``auto`` precision, and GPU-vs-CPU features per tile."""
    from napari_he2rna.features.extraction import BatchRunner, effective_precision, iter_features
    from napari_he2rna.slides.tiling import read_tiles

    device = backbone.device
    n = len(grid.table)
    precision = effective_precision(backbone, "auto")
    warm = np.arange(min(batch_size, n))
    for _ in iter_features(slide, grid, backbone, warm, batch_size, "auto", num_workers):
        pass  # cuDNN autotuning, allocator, thread pools
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    feats = np.empty((n, backbone.dim), dtype=np.float32)
    t = time.perf_counter()
    for rows, f in iter_features(slide, grid, backbone, None, batch_size, "auto", num_workers):
        feats[rows] = f
    _sync(device)
    pipeline = n / (time.perf_counter() - t)

    tiles = read_tiles(slide, grid, None, backbone.input_px, num_workers)
    run = BatchRunner(backbone, batch_size, "auto")
    t = time.perf_counter()
    for start in range(0, n, batch_size):
        run(tiles[start : start + batch_size])
    _sync(device)
    backbone_only = n / (time.perf_counter() - t)
    out: dict[str, Any] = {
        "tiles": n,
        "batch_size": batch_size,
        "reader_threads": num_workers,
        "precision": precision,
        "pipeline_tiles_per_s": round(pipeline, 1),
        "backbone_only_tiles_per_s": round(backbone_only, 1),
        "pipeline_vs_backbone_only": round(pipeline / backbone_only, 3),
        "features_finite": bool(np.isfinite(feats).all()),
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    m = min(match_tiles, n)
    sample = tiles[:m]
    cpu = cpu_copy()
    reference = BatchRunner(cpu, min(batch_size, 32), "fp32")(sample)
    device_fp32 = BatchRunner(backbone, batch_size, "fp32")(sample)
    out["gpu_vs_cpu"] = {
        "tiles": m,
        "device": str(device),
        "fp32": _cos_summary(cosines(device_fp32, reference)),
        precision: _cos_summary(cosines(feats[:m], reference)),
    }
    return out


# ------------------------------------------------------------------------------------------------- training
class TimedBatches:
    """A :class:`SlideBatches` whose reads are timed: ``arrays`` (read and pad a batch; the read-ahead thread
    calls it) and ``batch`` (the same and the copy to the device, in the training thread, where training reads
    without read-ahead)."""

    def __init__(self, slides) -> None:
        self.slides, self.read_s, self.calls = slides, 0.0, 0

    def _timed(self, read: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = read()
        self.read_s += time.perf_counter() - t
        self.calls += 1
        return out

    def arrays(self, idx: Sequence[int]):
        return self._timed(lambda: self.slides.arrays(idx))

    def batch(self, idx: Sequence[int], device: torch.device):
        return self._timed(lambda: self.slides.batch(idx, device))

    def __getattr__(self, name: str):
        return getattr(self.slides, name)


def read_ahead() -> tuple[Any, int | None]:
    """The read-ahead :func:`train_one` uses (``model.prefetch.iter_batches``) and its depth; (None, None)
    where training reads each batch in its own thread."""
    from napari_he2rna.model import training

    iter_batches = getattr(training, "iter_batches", None)
    if iter_batches is None or "stats" not in inspect.signature(iter_batches).parameters:
        return None, None
    from napari_he2rna.model import prefetch

    return iter_batches, getattr(prefetch, "PREFETCH_DEPTH", None)


@contextlib.contextmanager
def waits_counted(stats: dict[str, float]):
    """While in the block, the read-ahead of :func:`train_one` adds to ``stats["wait_s"]`` the seconds the
    training thread waited for a batch not read yet (nothing where training has no read-ahead)."""
    from napari_he2rna.model import training

    real, _ = read_ahead()
    if real is None:
        yield
        return

    def counted(source, batches, device, depth=None, stats_=None):
        return real(source, batches, device, depth, stats)

    training.iter_batches = counted
    try:
        yield
    finally:
        training.iter_batches = real


def _write_cohort(folder: Path, n_slides: int, n_tiles: int, dim: int, seed: int) -> dict[str, Any]:
    """One zarr array per slide of random float32 features (80 % of slides full, the rest 25-100 %)."""
    import zarr

    rng = np.random.default_rng(seed)
    counts = np.where(rng.random(n_slides) < 0.8, n_tiles, rng.integers(n_tiles // 4, n_tiles + 1, n_slides))
    t0, nbytes = time.perf_counter(), 0
    for i, c in enumerate(counts):
        arr = rng.standard_normal((int(c), dim), dtype=np.float32)
        z = zarr.create_array(
            store=str(folder / f"s{i:04d}.zarr"),
            shape=arr.shape,
            chunks=(min(int(c), 1024), dim),
            dtype="float32",
            compressors=None,
        )
        z[:] = arr
        nbytes += arr.nbytes
    write_s = time.perf_counter() - t0
    dropped = 0
    for p in folder.rglob("*"):  # the next reads come from the disk, not the page cache
        if p.is_file() and hasattr(os, "posix_fadvise"):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            finally:
                os.close(fd)
    return {
        "slides": n_slides,
        "tiles_max": n_tiles,
        "tiles_total": int(counts.sum()),
        "dim": dim,
        "store_dtype": "float32",
        "disk_gb": round(nbytes / 1e9, 2),
        "write_mb_per_s": round(nbytes / 1e6 / write_s, 1),
        "page_cache": "dropped per file after writing (posix_fadvise DONTNEED)" if dropped else "warm",
    }


def _train(slides, y, device: torch.device, config, genes: int, dim: int) -> dict[str, Any]:
    from napari_he2rna.model.network import HE2RNA
    from napari_he2rna.model.training import train_one

    torch.manual_seed(0)
    model = HE2RNA(dim, genes, config.hidden, config.dropout).to(device)
    timed = TimedBatches(slides)
    n = len(y)
    marks = [time.perf_counter()]

    def on_epoch(epoch: int, info: dict) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    types = np.array(["SIM"] * n)
    rng = np.random.default_rng(0)
    no_validation = np.array([], dtype=np.int64)
    stats: dict[str, float] = {}
    with waits_counted(stats):
        train_one(model, timed, y, types, np.arange(n), no_validation, config, device, rng, on_epoch)
    per_epoch = int(np.ceil(n / config.batch))
    epochs = np.diff(marks)
    total = float(marks[-1] - marks[0])
    # the training thread's wait for data: counted by the read-ahead, or all of the reading without one
    wait = stats.get("wait_s", timed.read_s) if read_ahead()[0] is not None else timed.read_s
    return {
        "batches": timed.calls,
        "batches_per_epoch": per_epoch,
        "epoch_s": [round(float(e), 3) for e in epochs],
        "batches_per_s_by_epoch": [round(per_epoch / float(e), 3) for e in epochs],
        "batches_per_s": round(timed.calls / total, 3),
        "read_s": round(timed.read_s, 3),
        "data_wait_fraction": round(wait / total, 3),
        "device_busy_fraction_estimate": round(1 - wait / total, 3),
    }


def training_figures(
    folder: Path, device: torch.device, n_slides: int, n_tiles: int, genes: int, epochs: int, dim: int = 2048
) -> dict[str, Any]:
    """All-tile HE2RNA batches/s streaming from zarr stores and from memory, in one run."""
    import zarr

    from napari_he2rna.cohorts.cohort import LazyFeatures
    from napari_he2rna.model.cohort_prediction import SlideBatches
    from napari_he2rna.model.training import TrainConfig

    folder.mkdir(parents=True, exist_ok=True)
    cohort = _write_cohort(folder, n_slides, n_tiles, dim, seed=1)
    ids = [f"s{i:04d}" for i in range(n_slides)]
    y = np.random.default_rng(2).random((n_slides, genes), dtype=np.float32)
    config = TrainConfig(mode="tiles", max_epochs=epochs, val_fraction=0.0, device=str(device))

    def read(sid: str) -> np.ndarray:
        return zarr.open_array(str(folder / f"{sid}.zarr"), mode="r")[:]

    warm = SlideBatches(LazyFeatures(read, ids[:4]), ids[:4], keep_in_memory=True)
    _train(warm, y[:4], device, TrainConfig(mode="tiles", max_epochs=1, device=str(device)), genes, dim)

    streamed = SlideBatches(LazyFeatures(read, ids), ids, keep_in_memory=False)
    stream = _train(streamed, y, device, config, genes, dim)
    first_epoch_bytes = cohort["tiles_total"] * dim * 4
    stream["read_mb_per_s_first_epoch"] = round(first_epoch_bytes / 1e6 / stream["epoch_s"][0], 1)
    t = time.perf_counter()
    in_memory = {sid: read(sid) for sid in ids}
    load_s = time.perf_counter() - t
    memory = _train(SlideBatches(in_memory, ids, keep_in_memory=True), y, device, config, genes, dim)
    memory["load_into_memory_s"] = round(load_s, 2)
    ahead, depth = read_ahead()
    reads = (
        f"read {depth} batches ahead by a background thread (model.prefetch.iter_batches; pinned memory "
        "and non-blocking copies on CUDA)"
        if ahead is not None
        else "read per batch in the training thread"
    )
    return {
        "how": "model.training.train_one, mode 'tiles' (all tiles, no supertiles), hidden 1024-1024, "
        "batch 4, k from FULL_TILE_KS; streaming = LazyFeatures over one zarr store per slide, "
        f"SlideBatches(keep_in_memory=False), {reads}",
        "read_ahead_depth": depth,
        "genes": genes,
        "cohort": cohort,
        "streaming": stream,
        "in_memory": memory,
        "streaming_vs_in_memory": round(stream["batches_per_s"] / memory["batches_per_s"], 3),
    }


# --------------------------------------------------------------------------------------------------- driver
def run_check(args: argparse.Namespace) -> dict[str, Any]:
    from napari_he2rna.features.devices import resolve_device
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.slides.tiling import tile_grid

    t_start = time.perf_counter()
    device = torch.device("cpu") if args.cpu_smoke else resolve_device(args.device)
    if not args.cpu_smoke and device.type != "cuda":
        warnings.warn(f"no CUDA device here: the check runs on {device}", stacklevel=1)
    workers = args.num_workers or (min(16, os.cpu_count() or 2) if device.type == "cuda" else 2)
    res: dict[str, Any] = {
        "check": "napari-he2rna benchmarks/gpu_check.py",
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(device),
        "weights": "random (seeded; nothing downloaded)",
    }
    with tempfile.TemporaryDirectory(prefix="he2rna-gpu-check-") as tmp:
        tmp_path = Path(tmp)
        slide_path = tmp_path / "slide.tiff"
        res["slide"] = make_slide(slide_path, args.tiles)
        with open_slide(slide_path) as slide:
            grid = tile_grid(slide, tile_um=TILE_UM, max_tiles=args.tiles, seed=0)
            res["slide"]["tiles"] = len(grid.table)
            weights = tmp_path / "resnet50-random.pth"
            res["extraction"] = {}
            resnet = resnet50_backbone(device, weights)
            res["extraction"]["resnet50"] = extraction_figures(
                slide,
                grid,
                resnet,
                lambda: resnet50_backbone(torch.device("cpu"), weights),
                args.batch_size,
                workers,
                args.match_tiles,
            )
            del resnet
            try:
                vit = vit_backbone(device, args.vit_arch)
            except ImportError as exc:
                res["extraction"][args.vit_arch] = {"skipped": f"timm is not installed ({exc})"}
            else:
                state = {k: v.detach().cpu() for k, v in vit.net.state_dict().items()}
                res["extraction"][args.vit_arch] = extraction_figures(
                    slide,
                    grid,
                    vit,
                    lambda: vit_backbone(torch.device("cpu"), args.vit_arch, state),
                    args.batch_size,
                    workers,
                    args.match_tiles,
                )
                del vit, state
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["training"] = training_figures(
            tmp_path / "cohort",
            device,
            args.train_slides,
            args.train_tiles,
            args.train_genes,
            args.train_epochs,
        )
    ext = [v for v in res["extraction"].values() if "gpu_vs_cpu" in v]
    res["goals"] = {
        "gpu_features_match_cpu_fp32": all(v["gpu_vs_cpu"]["fp32"]["pass"] for v in ext),
        "gpu_features_match_cpu_at_auto_precision": all(v["gpu_vs_cpu"][v["precision"]]["pass"] for v in ext),
        "pipeline_at_least_0.9_of_backbone_only": all(v["pipeline_vs_backbone_only"] >= 0.9 for v in ext),
        "streaming_at_least_0.9_of_in_memory": res["training"]["streaming_vs_in_memory"] >= 0.9,
    }
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    return res


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON (default {DEFAULT_OUT})")
    ap.add_argument("--cpu-smoke", action="store_true", help="everything on the CPU at tiny sizes")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cuda, cuda:1, cpu")
    ap.add_argument(
        "--num-workers", type=int, default=None, help="tile reader threads (default: CUDA 16, CPU 2)"
    )
    for key, value in SIZES["gpu"].items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    args = ap.parse_args(argv)
    for key, value in SIZES["cpu-smoke" if args.cpu_smoke else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run_check(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    env = res["environment"]
    print(
        f"{res['mode']} on {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"CUDA {env['torch_cuda_build']}"
    )
    for name, r in res["extraction"].items():
        if "skipped" in r:
            print(f"  {name}: skipped ({r['skipped']})")
            continue
        print(
            f"  {name} ({r['precision']}): pipeline {r['pipeline_tiles_per_s']} tiles/s, backbone only "
            f"{r['backbone_only_tiles_per_s']} ({r['pipeline_vs_backbone_only']:.0%}); GPU vs CPU min cosine "
            f"fp32 {r['gpu_vs_cpu']['fp32']['min_cosine']}, {r['precision']} "
            f"{r['gpu_vs_cpu'][r['precision']]['min_cosine']}"
        )
    tr = res["training"]
    print(
        f"  training: streaming {tr['streaming']['batches_per_s']} batches/s, in memory "
        f"{tr['in_memory']['batches_per_s']} ({tr['streaming_vs_in_memory']:.0%})"
    )
    print(f"  goals: {res['goals']}; {res['total_s']} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
