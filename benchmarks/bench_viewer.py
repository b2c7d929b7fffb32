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
   The gene is switched in the slide's one heatmap layer (data updated in place), from the session's cached
   hidden layers: ``of_which_scores_and_new_layer_s`` is that work (scores + layer update), the canvas draw
   is ``of_which_canvas_draw_s``.
3. **Progressive painting with ResNet50 on the CPU** (seeded random weights saved to a local file: the cost
   does not depend on their values, nothing is downloaded) on a generated slide of about 1,000 tissue
   tiles: time from Run to the first painted tiles (``progressive_first_paint_s``), to a coarse map of the
   whole slide (the first lattice pass, ``progressive_coarse_map_s``) and to the whole slide
   (``progressive_full_s``).
4. **Peak memory** of the process (VmHWM) before the model is loaded, after it is loaded, and at the end.

Drawing is forced by rendering the vispy canvas directly (``SceneCanvas.render``), not by
``viewer.screenshot`` (which returned a null QImage under some Xvfb/PyQt6 setups); if the canvas cannot
render, the script stops with a sentence saying so.

Run::

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/bench_viewer.py \
        [--genes 30000] [--tiles 8000] [--progressive-px 7400] [--skip-progressive]

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


def _wait(app, cond, timeout=600.0, on_tick=None, tick_ms=20) -> None:
    """Run Qt's event loop, as ``napari.run()`` does, until ``cond()``; ``on_tick()`` runs every ``tick_ms``.

    A real ``QEventLoop``, not ``processEvents()`` in a loop: ``processEvents`` never runs Qt's deferred
    deletes, so napari's activity indicator (an animated GIF, started by ``viewer.open``) never stops, and
    the window is recomposed about 30 times a second for the rest of the benchmark, which no user sees.
    """
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    t0 = time.perf_counter()
    late = []

    def tick() -> None:
        if on_tick is not None:
            on_tick()
        if cond():
            loop.quit()
        elif time.perf_counter() - t0 > timeout:
            late.append(True)
            loop.quit()

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(tick_ms)
    if not cond():
        (loop.exec if hasattr(loop, "exec") else loop.exec_)()
    timer.stop()
    if late:
        raise TimeoutError("the run did not finish")


def _cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of this machine: a virtual machine's CPU taken by its host is "steal".

    (0, 0) where there is no ``/proc/stat`` (macOS, Windows): the steal share is then not reported.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class CannotDraw(SystemExit):
    pass


def _drawn(viewer) -> None:
    """Force the canvas to draw what is on it now: render the vispy scene canvas (an offscreen pass)."""
    try:
        canvas = viewer.window._qt_viewer.canvas._scene_canvas  # napari's vispy SceneCanvas
        img = canvas.render()
    except Exception as exc:  # noqa: BLE001 - any failure here means we cannot time drawing
        raise CannotDraw(
            f"bench_viewer: the napari canvas cannot be rendered here ({type(exc).__name__}: {exc}); run it "
            'under a display with OpenGL, e.g. xvfb-run -a -s "-screen 0 1920x1200x24" with Mesa.'
        ) from exc
    if img is None or getattr(img, "size", 0) == 0:
        raise CannotDraw("bench_viewer: the napari canvas rendered an empty image; is OpenGL available?")


def run_to_first_heatmap(app, viewer, widget, layer) -> float:
    t0 = time.perf_counter()
    widget.run()
    _wait(app, lambda: not widget.running)
    if widget.paint("T cells") is None:
        raise RuntimeError("painting T cells failed")
    _drawn(viewer)
    return time.perf_counter() - t0


def fake_grid(n_tiles: int, mpp: float = 0.5, tile_um: float = 112.0):
    from napari_he2rna.slides.tiling import TileGrid

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

    from napari_he2rna.model.bundle import save_bundle
    from napari_he2rna.model.network import HE2RNA

    torch.manual_seed(0)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    folds = [HE2RNA(2048, n_genes, (1024, 1024), 0.25).eval() for _ in range(5)]
    save_bundle(path, folds, genes, "resnet50-imagenet", 2048, 112.0, (1, 2, 5, 10, 20, 50, 100))


def make_resnet_model(path: Path, n_genes: int = 100) -> None:
    """A 1-fold ResNet50-input model (2048 features) of a few genes: the progressive run scores it."""
    import torch

    from napari_he2rna.model.bundle import save_bundle
    from napari_he2rna.model.network import HE2RNA

    torch.manual_seed(0)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    save_bundle(
        path,
        [HE2RNA(2048, n_genes, (256,), 0.0).eval()],
        genes,
        "resnet50-imagenet",
        2048,
        112.0,
        (1, 10, 100),
    )


def progressive_figures(app, viewer, tmp: Path, side_px: int) -> dict:
    """Run to first painted tiles / coarse map / whole slide with ResNet50 on the CPU (random weights)."""
    import torch
    from torchvision.models import resnet50

    from napari_he2rna.features.resnet import RESNET50_FILE
    from napari_he2rna.maps import progressive
    from napari_he2rna.napari._model_widget import ModelWidget
    from napari_he2rna.napari._state import get_registry

    weights = tmp / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), weights / RESNET50_FILE)  # seeded random weights, a local file
    os.environ["HE2RNA_WEIGHTS"] = str(weights)
    os.environ["HE2RNA_CACHE"] = str(tmp / "cache-resnet")  # an empty cache: a real extraction
    slide_path = tmp / "big_slide.tiff"
    # drawn by another process: the generator's big float arrays must not count in this process's peak
    subprocess.run(
        [sys.executable, __file__, "--make-slide", str(slide_path), "--progressive-px", str(side_px)],
        check=True,
    )
    model = tmp / "resnet_model.safetensors"
    make_resnet_model(model)
    layer = viewer.open(str(slide_path), plugin="napari-he2rna")[0]
    widget = ModelWidget(viewer, model_path=model)
    viewer.window.add_dock_widget(widget, name="Model (ResNet50)")
    widget.device_combo.setCurrentText("cpu")
    viewer.layers.selection.active = layer
    state = get_registry(viewer).state_for(layer)
    marks: dict[str, float] = {}
    coarse: list[int] = []
    steal0, total0 = _cpu_times()
    t0 = time.perf_counter()
    widget.run()
    widget.paint("GENE00000")  # picked at once: painted as the first tiles arrive

    def tick() -> None:
        if "first" not in marks and widget.active_layer(state) is not None:
            _drawn(viewer)
            marks["first"] = time.perf_counter() - t0
        if not coarse and state.session.live is not None:
            coarse.append(progressive.first_pass_size(state.session.live.grid))
        if coarse and "coarse" not in marks and widget.active_layer(state) is not None:
            if state.session.n_scored()[0] >= coarse[0]:
                _drawn(viewer)
                marks["coarse"] = time.perf_counter() - t0

    try:
        _wait(app, lambda: not widget.running, timeout=3600, on_tick=tick)
    except TimeoutError:
        raise TimeoutError("the ResNet50 run did not finish in an hour") from None
    if not state.session.ready:
        raise RuntimeError(f"the ResNet50 run failed: {widget.status_label.text()}")
    _drawn(viewer)
    full = time.perf_counter() - t0
    steal1, total1 = _cpu_times()
    n = len(state.session.grid.table)
    return {
        "progressive_backbone": "resnet50 (seeded random weights, local file)",
        "progressive_tiles": n,
        "progressive_first_pass_tiles": int(progressive.first_pass_size(state.session.grid)),
        "progressive_first_paint_s": round(marks.get("first", float("nan")), 2),
        "progressive_coarse_map_s": round(marks.get("coarse", float("nan")), 2),
        "progressive_full_s": round(full, 2),
        "progressive_coarse_map_fraction_of_full": round(marks.get("coarse", float("nan")) / full, 3),
        "progressive_tiles_per_s": round(n / full, 2),
        # share of this machine's CPU time its host took during the run (a virtual machine's "steal")
        "progressive_cpu_steal_fraction": (
            round((steal1 - steal0) / (total1 - total0), 3) if total1 > total0 else None
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=30000)
    ap.add_argument("--tiles", type=int, default=8000)
    ap.add_argument("--repaints", type=int, default=10)
    ap.add_argument("--progressive-px", type=int, default=7400, help="side of the generated ResNet50 slide")
    ap.add_argument("--skip-progressive", action="store_true", help="no ResNet50 progressive figures")
    ap.add_argument("--make-model", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-slide", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_slide is not None:
        from napari_he2rna.synthetic import make_slide

        make_slide(args.make_slide, seed=3, size_px=(args.progressive_px,) * 2, write_truth=False)
        return
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
        settle = time.perf_counter() + 0.5
        _wait(app, lambda: time.perf_counter() > settle)  # let the first frames draw before timing
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
        res["peak_rss_before_progressive_mb"] = res["peak_rss_mb"]
        if not args.skip_progressive:
            # the big model goes first: the progressive run has its own small ResNet50-input model
            for ly in list(viewer.layers):
                if ly in viewer.layers:  # a slide's removal takes its heatmaps along
                    viewer.layers.remove(ly)
            widget.bundle = None
            del bundle, session
            res.update(progressive_figures(app, viewer, Path(tmp), args.progressive_px))
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
