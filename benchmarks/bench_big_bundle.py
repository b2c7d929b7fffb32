"""Benchmark of a SEQUOIA-size model bundle: 20,820 genes on 2,048-d features, 5 folds, random weights.

Each step is timed (wall and CPU seconds of the process) with its peak resident memory (VmHWM, reset before
each step where Linux allows it; ``ru_maxrss`` for the whole run):

1. ``load_bundle`` of the file (written by another process, so its tensors do not count here);
2. in a real napari viewer (needs a display: ``xvfb-run -a``), opening the Model dock with the bundle
   (``ModelWidget(viewer, model_path=...)``: load, gene picker filled) and refilling the picker alone;
3. typing a gene in the picker, one key at a time, as a user does: the completer filters the 20,820
   names on every key (``MatchContains``) and its popup shows the matches; the filter alone
   (``setCompletionPrefix`` + ``completionCount``) is timed too;
4. slide-level ``predict`` of every gene on ``sample_data/sample_slide.tiff``, with an empty feature cache
   (tiling + features + model) and with the cache filled (what every later look costs);
5. ``spatialize`` of 5 genes (tile scores, CSV, AnnData, GeoJSON, 5 PNGs) from the cached features.

The bundle has SEQUOIA's layout (:data:`napari_he2rna.model.convert.PRESETS` ``"sequoia-he2rna"``: hidden
layers 256-256, 256 px tiles at 20x fed unresized, a slide input of 100 k-means cluster means) and a
validation R per gene for two cancer types, so the picker labels (and averages) every gene's R: its worst
case. The features come from a registered tiny backbone that outputs 2048-d (:class:`Tiny2048`: a pooled
thumbnail of the tile and a fixed random projection): the point is the cost of our code with a model this
size, not the backbone's (ResNet50's is in ``bench_extract.py``). The k-means of the slide input is
scikit-learn's; it is timed alone and reported beside ``predict``.

Run::

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/bench_big_bundle.py \
        [--genes 20820] [--folds 5] [--repeats 3] [--skip-viewer]

Results go to ``benchmarks/results/big_bundle_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_he2rna.torch_preload import preload

preload()  # before napari's OpenGL: see napari_he2rna.torch_preload

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from napari_he2rna.features import backbones  # noqa: E402
from napari_he2rna.features.backbone_base import Backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "sample_slide.tiff"
DEMO = ROOT / "sample_data" / "demo_model.safetensors"
#: The registry name of the benchmark's tiny 2048-d backbone.
TINY = "bench-tiny-2048"
#: Genes typed in the picker (their names are in every bundle :func:`make_big_bundle` writes).
REAL_GENES = ("CD3D", "MS4A1", "KRT8", "MKI67", "ESR1")
SEQUOIA_GENES = 20820


# ------------------------------------------------------------------------------------- bundle and backbone
def gene_names(n: int, seed: int = 0) -> list[str]:
    """``n`` unique gene-like symbols: :data:`REAL_GENES` first, then random ones (2-5 letters and an
    optional number: ``ABC12``), so a typed prefix matches what it would among real symbols."""
    rng = np.random.default_rng(seed)
    names = list(REAL_GENES[:n])
    seen = set(names)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    while len(names) < n:
        word = "".join(rng.choice(letters, int(rng.integers(2, 6))))
        if rng.random() < 0.6:
            word += str(int(rng.integers(1, 40)))
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


def make_big_bundle(
    path: str | Path,
    n_genes: int = SEQUOIA_GENES,
    feature_dim: int = 2048,
    n_folds: int = 5,
    hidden: Sequence[int] = (256, 256),
    backbone: str = TINY,
    cancer_types: Sequence[str] = ("TCGA-BRCA", "TCGA-LUAD"),
    seed: int = 0,
) -> Path:
    """Write a bundle of SEQUOIA's size and layout with random weights; returns its path.

    ``n_genes`` outputs on ``feature_dim`` features, ``n_folds`` folds of ``hidden`` layers, the
    ``sequoia-he2rna`` preset's preprocessing (256 px tiles at 20x, not resized, k-means slide input) and a
    random validation R per gene for each of ``cancer_types``. Small sizes make a quick test bundle.
    """
    from napari_he2rna.model.bundle import save_bundle
    from napari_he2rna.model.convert import PRESETS
    from napari_he2rna.model.network import HE2RNA

    torch.manual_seed(seed)
    genes = gene_names(n_genes, seed)
    folds = [HE2RNA(feature_dim, n_genes, tuple(hidden), 0.25).eval() for _ in range(n_folds)]
    rng = np.random.default_rng(seed)
    validation_r = {
        t: dict(zip(genes, rng.uniform(-0.2, 0.8, n_genes).round(4), strict=True)) for t in cancer_types
    }
    preset = PRESETS["sequoia-he2rna"]
    return save_bundle(
        path,
        folds,
        genes,
        backbone,
        feature_dim,
        128.0,
        preset["ks"],
        metadata={"validation_r": validation_r, "output_unit": preset["unit"]},
        aggregation=preset["aggregation"],
        tile_px=preset["tile_px"],
        tile_magnification=preset["tile_magnification"],
        input_resize=preset["input_resize"],
        clustering=preset["clustering"],
    )


class Tiny2048(Backbone):
    """A tile pooled to 8 x 8 x 3, a fixed random projection to ``dim`` and a ReLU: 2048-d features at almost
    no cost (at any input size, like ResNet50's global pool)."""

    name = TINY
    input_px = 224
    weights_hash = "bench-tiny-2048-v1"
    autocast = False

    def __init__(self, dim: int = 2048) -> None:
        super().__init__()
        self.dim = int(dim)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(192, self.dim, generator=gen) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj)


def register_tiny_backbone(dim: int = 2048) -> None:
    """Register :class:`Tiny2048` (``dim`` outputs) under :data:`TINY` in the backbone registry."""
    backbones.register_backbone(TINY, lambda weights, download: Tiny2048(dim), dim)


# ------------------------------------------------------------------------------------------- measuring
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` once: its result, and wall / CPU seconds, RSS before and the peak RSS during it (MB)."""
    rss0 = _status_kb("VmRSS")
    reset = _reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kb("VmHWM") if reset else None
    fig = {"wall_s": round(wall, 5), "cpu_s": round(cpu, 5)}
    if rss0 is not None and peak is not None:
        fig.update({"rss_before_mb": round(rss0 / 1024), "peak_rss_mb": round(peak / 1024)})
        fig["peak_above_before_mb"] = round((peak - rss0) / 1024)
    return out, fig


def repeat(fn: Callable[[], Any], n: int) -> tuple[Any, dict[str, Any]]:
    """``fn`` ``n`` times: the first run's figures, the median wall / CPU seconds of all runs and the best
    (the machine is shared: the best time is the steadiest signal of what the code costs)."""
    out, first = measure(fn)
    walls, cpus = [first["wall_s"]], [first["cpu_s"]]
    for _ in range(max(n, 1) - 1):
        out, fig = measure(fn)
        walls.append(fig["wall_s"])
        cpus.append(fig["cpu_s"])
    return out, {
        **first,
        "first_wall_s": first["wall_s"],
        "wall_s": round(float(np.median(walls)), 5),
        "best_wall_s": round(float(min(walls)), 5),
        "cpu_s": round(float(np.median(cpus)), 5),
        "runs": len(walls),
    }


# ---------------------------------------------------------------------------------------------- steps
def _wait(app, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    """Run Qt's event loop until ``cond()`` (see ``bench_viewer._wait``: a real QEventLoop)."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop, t0 = QEventLoop(), time.perf_counter()
    timer = QTimer()
    timer.timeout.connect(lambda: loop.quit() if cond() or time.perf_counter() - t0 > timeout else None)
    timer.start(5)
    if not cond():
        (loop.exec if hasattr(loop, "exec") else loop.exec_)()
    timer.stop()


def viewer_figures(bundle_path: Path, repeats: int, word: str = "CD3D") -> dict[str, Any]:
    """Open the Model dock with the bundle in a real viewer, refill its picker and type ``word`` in it."""
    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication, QCompleter

    from napari_he2rna.napari._model_widget import ModelWidget

    res: dict[str, Any] = {}
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    try:
        viewer.open(str(SAMPLE), plugin="napari-he2rna")
        handle = viewer.window._qt_window.windowHandle()
        _wait(app, lambda: handle is not None and handle.isExposed(), timeout=30)
        settle = time.perf_counter() + 0.5
        _wait(app, lambda: time.perf_counter() > settle)

        def open_dock(path: Path):
            widget = ModelWidget(viewer, model_path=path)
            dock = viewer.window.add_dock_widget(widget, name=f"Model ({path.stem})")
            app.processEvents()
            return widget, dock

        # the dock with the bundled demo model (a few genes) before and after: what is not the bundle's size
        (_, dock), res["open_model_dock_demo_model_first"] = measure(lambda: open_dock(DEMO))
        viewer.window.remove_dock_widget(dock)
        (widget, _), res["open_model_dock"] = measure(lambda: open_dock(bundle_path))
        (_, dock), res["open_model_dock_demo_model"] = measure(lambda: open_dock(DEMO))
        viewer.window.remove_dock_widget(dock)
        if widget.bundle is None:
            raise RuntimeError("the Model dock did not load the big bundle")
        res["picker_rows"] = widget.gene_model.rowCount()
        _, res["fill_gene_picker"] = repeat(widget.refresh_genes, repeats)
        _, res["load_model_in_dock"] = repeat(lambda: widget.load_model(bundle_path), repeats)

        completer = widget.completer

        def filter_only(prefix: str) -> int:
            """A new completer like the picker's over its names (a used one keeps every prefix's matches)."""
            probe = QCompleter(widget.gene_model)
            probe.setCaseSensitivity(completer.caseSensitivity())
            probe.setFilterMode(completer.filterMode())
            t = time.perf_counter()
            probe.setCompletionPrefix(prefix)
            count = probe.completionCount()
            seconds.append(time.perf_counter() - t)
            return count

        filters = []
        for i in range(1, len(word) + 1):
            seconds: list[float] = []
            counts = [filter_only(word[:i]) for _ in range(max(repeats, 1))]
            filters.append(
                {"prefix": word[:i], "matches": counts[0], "wall_s": round(float(np.median(seconds)), 5)}
            )
        res["completer_filter"] = filters

        edit = widget.gene_combo.lineEdit()
        edit.setFocus()
        edit.clear()
        app.processEvents()
        keys = []
        for ch in word:

            def key(ch=ch) -> None:
                QTest.keyClick(edit, ch)
                app.processEvents()

            _, fig = measure(key)
            popup = completer.popup()
            matches = completer.completionModel()
            shown = [matches.index(r, 0).data() for r in range(min(5, matches.rowCount()))]
            keys.append(
                {
                    "typed": edit.text(),
                    "matches": completer.completionCount(),
                    "popup_visible": popup.isVisible(),
                    "first_matches": shown,
                    **fig,
                }
            )
        res["typing"] = keys
        res["typed_gene_found"] = any(str(s).split(" ")[0] == word for s in keys[-1]["first_matches"])
        QTest.keyClick(edit, Qt.Key.Key_Escape)
        app.processEvents()
    finally:
        viewer.close()
    return res


@contextlib.contextmanager
def timed_calls(owner: Any, name: str, into: list[float]):
    """Add the wall seconds of every call of ``owner.name`` to ``into`` while in the block."""
    real = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    setattr(owner, name, timed)
    try:
        yield into
    finally:
        setattr(owner, name, real)


def predict_figures(bundle_path: Path, cache: Path, out: Path, repeats: int) -> dict[str, Any]:
    """``load_bundle``; ``predict`` of every gene with an empty and a filled cache, with a new bundle and with
    one whose k-means input is already made; the k-means alone; ``spatialize`` of 5 genes, split into the
    k-means, the PNG drawing and the rest."""
    from napari_he2rna.maps.predict import predict
    from napari_he2rna.maps.session import SlideSession
    from napari_he2rna.maps.spatialize import spatialize
    from napari_he2rna.model.aggregation import Clustering
    from napari_he2rna.model.bundle import load_bundle

    res: dict[str, Any] = {}
    bundle, res["load_bundle"] = repeat(lambda: load_bundle(bundle_path), repeats)
    res["bundle_genes"] = len(bundle.genes)
    res["bundle_folds"] = bundle.n_folds
    res["bundle_file_mb"] = round(bundle_path.stat().st_size / 2**20, 1)

    kmeans: list[float] = []
    with timed_calls(Clustering, "cluster_means", kmeans):
        pred, res["predict_all_genes_empty_cache"] = measure(
            lambda: predict(SAMPLE, bundle, device="cpu", cache_dir=cache)
        )
        res["predict_genes"] = len(pred.predictions)
        res["predict_tiles"] = pred.n_tiles
        res["predict_finite"] = bool(np.isfinite(pred.predictions.to_numpy()).all())
        kmeans.clear()
        _, res["predict_all_genes_new_bundle"] = repeat(
            lambda: predict(SAMPLE, load_bundle(bundle_path), device="cpu", cache_dir=cache), repeats
        )
        res["of_which_kmeans_slide_input_s"] = round(float(np.median(kmeans)), 4)
        kmeans.clear()
        _, res["predict_all_genes"] = repeat(
            lambda: predict(SAMPLE, bundle, device="cpu", cache_dir=cache), repeats
        )
        res["predict_all_genes"]["kmeans_calls"] = len(kmeans)  # 0: the bundle keeps the slide's k-means

    n, pngs, parts = [0], [], []

    def spat():
        n[0] += 1
        kmeans.clear()
        pngs.clear()
        t = time.perf_counter()
        folder = out / f"run{n[0]}"
        out_set = spatialize(SAMPLE, bundle_path, list(REAL_GENES), folder, device="cpu", cache_dir=cache)
        total = time.perf_counter() - t
        parts.append((sum(kmeans), sum(pngs), total - sum(kmeans) - sum(pngs)))
        return out_set

    with timed_calls(Clustering, "cluster_means", kmeans), timed_calls(SlideSession, "render_png", pngs):
        result, res["spatialize_5_genes"] = repeat(spat, repeats)
    # per run: the k-means (scikit-learn), the PNG drawing (matplotlib) and the rest; medians over the runs
    for i, key in enumerate(("of_which_kmeans_s", "of_which_png_drawing_s", "rest_s")):
        res["spatialize_5_genes"][key] = round(float(np.median([p[i] for p in parts])), 4)
    res["spatialize_files"] = len(result.png_paths) + 4
    return res


def _cpu_model() -> str:
    try:
        from napari_he2rna.features.precision import cpu_model

        return cpu_model()
    except Exception:  # noqa: BLE001 - only a label
        return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    register_tiny_backbone()
    res: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "genes": args.genes,
        "folds": args.folds,
        "feature_dim": 2048,
        "hidden": [256, 256],
        "backbone": f"{TINY} (registered here: 2048-d, a fixed projection; our code's cost, not a CNN's)",
        "slide": SAMPLE.name,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        bundle_path = tmp_path / "big.safetensors"
        # written by another process: the writer's tensors must not count in this process's peak memory
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--make-bundle",
                str(bundle_path),
                "--genes",
                str(args.genes),
                "--folds",
                str(args.folds),
            ],
            check=True,
        )
        os.environ["HE2RNA_CACHE"] = str(tmp_path / "cache")  # the viewer's cache, empty
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the sample slide's magnification is estimated: one warning
            res["steps"] = predict_figures(bundle_path, tmp_path / "cache", tmp_path / "out", args.repeats)
            if not args.skip_viewer:
                res["viewer"] = viewer_figures(bundle_path, args.repeats)
    res["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return res


def summary(res: dict[str, Any]) -> list[str]:
    """One line per step: median wall s, CPU s, peak RSS above the RSS before it."""
    st = res["steps"]
    rows = [
        ("load_bundle", st["load_bundle"]),
        ("predict all genes, empty feature cache (tiny backbone)", st["predict_all_genes_empty_cache"]),
        ("predict all genes, new bundle (k-means included)", st["predict_all_genes_new_bundle"]),
        ("predict all genes, bundle loaded (k-means kept)", st["predict_all_genes"]),
        ("spatialize 5 genes (new bundle each: k-means included)", st["spatialize_5_genes"]),
    ]
    viewer = res.get("viewer")
    if viewer:
        rows += [
            ("open Model dock with the bundle", viewer["open_model_dock"]),
            ("open Model dock with the demo model (for comparison)", viewer["open_model_dock_demo_model"]),
            ("fill the gene picker", viewer["fill_gene_picker"]),
            ("load the bundle in the dock", viewer["load_model_in_dock"]),
        ]
        rows += [(f"type '{k['typed']}' ({k['matches']} matches)", k) for k in viewer["typing"]]
    lines = [
        f"{res['genes']} genes x {res['folds']} folds, {res['cpu_model']}, {res['cores']} cores, "
        f"load {res['load_average_at_start']:.2f} at start, {res['load_average_at_end']:.2f} at end",
        "| step | wall s (median) | best wall s | CPU s (median) | peak RSS above before (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, f in rows:
        best, peak = f.get("best_wall_s", "-"), f.get("peak_above_before_mb", "-")
        lines.append(f"| {name} | {f['wall_s']} | {best} | {f['cpu_s']} | {peak} |")
    sp = st["spatialize_5_genes"]
    lines.append(
        f"k-means of the slide input (scikit-learn) {st['of_which_kmeans_slide_input_s']} s; spatialize: "
        f"k-means {sp['of_which_kmeans_s']} s, PNG drawing {sp['of_which_png_drawing_s']} s, "
        f"rest {sp['rest_s']} s"
    )
    lines.append(f"process peak RSS {res['process_peak_rss_mb']} MB")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=SEQUOIA_GENES)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per step (median reported)")
    ap.add_argument("--skip-viewer", action="store_true", help="no napari steps (no display needed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_bundle_cpu.json")
    ap.add_argument("--make-bundle", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_bundle is not None:
        make_big_bundle(args.make_bundle, n_genes=args.genes, n_folds=args.folds)
        return
    if not args.skip_viewer and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        raise SystemExit("bench_big_bundle: the viewer steps need a display; run it under xvfb-run -a")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(summary(res)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
