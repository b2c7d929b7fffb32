"""Benchmark of the viewer path: Run to first heatmap, per-gene repaint at 8,000 tiles, peak memory.

In a real ``napari.Viewer`` with the plugin's Model widget (needs a display: run under ``xvfb-run -a``):

1. **Run to first heatmap** on the bundled sample slide with the bundled demo model: press Run (tiling,
   hed-stats features, scores) and paint "T cells", until the canvas has drawn it. Cold (empty feature cache)
   and warm (features from the zarr cache, what a second look at a slide costs).
2. **Per-gene repaint at 8,000 tiles** with a 30,000-gene model (5 folds, ResNet50-sized input 2048, hidden
   1024-1024, as the paper's all-genes model): the slide's session gets a grid of 8,000 tiles and random
   features (the cost of a repaint does not depend on their values), then genes are painted one after the
   other, each until the canvas has drawn it. The first gene computes the hidden layers; the next ones reuse
   them and compute one output row each.
3. **Peak memory** of the process (VmHWM) before the model is loaded, after it is loaded, and at the end.

Run::

    xvfb-run -a .venv/bin/python benchmarks/bench_viewer.py [--genes 30000] [--tiles 8000]

Results go to ``benchmarks/results/viewer_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from napari_he2rna.torch_preload import preload

preload()  # before napari's OpenGL: see napari_he2rna.torch_preload

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "sample_slide.tiff"
DEMO = ROOT / "sample_data" / "demo_model.safetensors"


def _mem_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait(app, cond, timeout=600.0) -> None:
    t0 = time.perf_counter()
    while not cond():
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the run did not finish")


def _drawn(viewer) -> None:
    """Force the canvas to draw what is on it now (a screenshot renders the scene)."""
    viewer.screenshot(canvas_only=True, flash=False)


def run_to_first_heatmap(app, viewer, widget, layer) -> float:
    t0 = time.perf_counter()
    widget.run()
    _wait(app, lambda: not widget.running)
    if widget.paint("T cells") is None:
        raise RuntimeError("painting T cells failed")
    _drawn(viewer)
    return time.perf_counter() - t0


def fake_grid(n_tiles: int, mpp: float = 0.5, tile_um: float = 112.0):
    from napari_he2rna.tiling import TileGrid

    side = int(np.ceil(np.sqrt(n_tiles / 0.8)))  # tissue covers ~80 % of a square grid
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(side * side, n_tiles, replace=False))
    tile_px = round(tile_um / mpp)
    rows, cols = ids // side, ids % side
    table = pd.DataFrame(
        {
            "tile_id": ids,
            "row": rows,
            "col": cols,
            "x": cols * tile_px,
            "y": rows * tile_px,
            "size": tile_px,
            "tissue_fraction": 1.0,
        }
    )
    return TileGrid(table, tile_px, tile_um, mpp, side, side, (side * tile_px, side * tile_px))


def make_model(path: Path, n_genes: int) -> None:
    """A 5-fold 2048-1024-1024-n_genes bundle; random weights (a repaint costs the same whatever they are)."""
    import torch

    from napari_he2rna.model import HE2RNA, save_bundle

    torch.manual_seed(0)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    folds = [HE2RNA(2048, n_genes, (1024, 1024), 0.25).eval() for _ in range(5)]
    save_bundle(path, folds, genes, "resnet50-imagenet", 2048, 112.0, (1, 2, 5, 10, 20, 50, 100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=30000)
    ap.add_argument("--tiles", type=int, default=8000)
    ap.add_argument("--repaints", type=int, default=10)
    ap.add_argument("--make-model", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_model is not None:
        make_model(args.make_model, args.genes)
        return

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_he2rna.napari._model_widget import ModelWidget
    from napari_he2rna.napari._state import get_registry

    res: dict[str, object] = {
        "device": "cpu",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HE2RNA_CACHE"] = str(Path(tmp) / "cache")  # cold: an empty feature cache
        viewer = napari.Viewer(show=True)
        app = QApplication.instance()
        layer = viewer.open(str(SAMPLE), plugin="napari-he2rna")[0]
        widget = ModelWidget(viewer, model_path=DEMO)
        viewer.window.add_dock_widget(widget, name="Model")
        handle = viewer.window._qt_window.windowHandle()
        _wait(app, lambda: handle is not None and handle.isExposed(), timeout=30)
        for _ in range(50):  # let the first frames draw before timing
            app.processEvents()
            time.sleep(0.01)
        res["run_to_first_heatmap_cold_s"] = round(run_to_first_heatmap(app, viewer, widget, layer), 2)
        res["run_to_first_heatmap_warm_s"] = round(run_to_first_heatmap(app, viewer, widget, layer), 2)
        res["sample_tiles"] = len(get_registry(viewer).get(layer).session.grid.table)
        res["rss_before_big_model_mb"] = round(_mem_mb("VmRSS"))

        # the 30,000-gene model, written and loaded as a user would
        # the 30,000-gene model is written by another process (its tensors must not count in this
        # process's peak memory), then loaded as a user would
        genes = [f"GENE{i:05d}" for i in range(args.genes)]
        path = Path(tmp) / "big.safetensors"
        subprocess.run(
            [sys.executable, __file__, "--make-model", str(path), "--genes", str(args.genes)], check=True
        )
        t0 = time.perf_counter()
        bundle = widget.load_model(path)
        res["load_big_model_s"] = round(time.perf_counter() - t0, 2)
        res["model_genes"] = args.genes
        res["model_file_mb"] = round(path.stat().st_size / 2**20)
        res["rss_after_big_model_mb"] = round(_mem_mb("VmRSS"))

        session = get_registry(viewer).get(layer).session
        session.set_model(bundle)
        grid = fake_grid(args.tiles)
        feats = np.random.default_rng(1).random((args.tiles, 2048), dtype=np.float32)
        session.set_features(grid, feats, "resnet50-imagenet", bundle=bundle)
        times, paint_only = [], []
        for g in genes[: args.repaints]:
            t0 = time.perf_counter()
            if widget.paint(g) is None:
                raise RuntimeError(f"painting {g} failed")
            t1 = time.perf_counter()
            _drawn(viewer)
            times.append(time.perf_counter() - t0)
            paint_only.append(t1 - t0)
        draw = [t - p for t, p in zip(times, paint_only, strict=True)]
        # the scores alone (no layer): what "computed only for that gene" costs
        compute = []
        for g in genes[args.repaints : 2 * args.repaints]:
            t0 = time.perf_counter()
            session.raster(g)
            compute.append(time.perf_counter() - t0)
        res["scores_one_gene_s"] = round(float(np.median(compute)), 4)
        res["repaint_tiles"] = args.tiles
        res["repaint_first_gene_s"] = round(times[0], 3)
        res["repaint_next_genes_median_s"] = round(float(np.median(times[1:])), 3)
        res["of_which_scores_and_new_layer_s"] = round(float(np.median(paint_only[1:])), 3)
        res["of_which_canvas_draw_s"] = round(float(np.median(draw[1:])), 3)
        res["peak_rss_mb"] = round(_mem_mb("VmHWM"))
        viewer.close()

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "viewer_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in res.items())]
    (out / "viewer_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
