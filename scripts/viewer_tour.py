"""Drive napari through the plugin's tour and write one screenshot per step, at napari's first-launch window
size and full screen, to look at what a person sees (clipped widgets, hidden layers, warnings).

The tour, as a new user would do it in ``he2rna view`` (napari with the plugin's one dock):

0. ``00_launch``: the viewer as ``he2rna view`` opens it (no slide yet);
1. ``01_open_slide``: open ``sample_data/sample_slide.tiff`` in the Slide tab;
2. ``02_run``: Run it with the bundled demo model (Model tab) and paint CD3E;
3. ``03_gene``: pick a gene (B cells, then CD3E again);
4. ``04_fold_spread``: tick "fold spread" (the fold models' standard deviation, a second layer);
5. ``05_compare``: untick it, select the heatmap; Compare tab, load ``sample_data/sample_slide_CD3.tsv``
   (QuPath CD3 detections) and compare CD3E with it;
6. ``06_export``: Export tab, write the tile scores (CSV) and a heatmap TIFF into ``OUT/exports``;
7. ``07_cmu_region``: hide the sample slide's layers, open the real CMU-1 H&E region (read in place from
   ``../shared/data/slides/cmu-1-small-region.svs``; ``--cmu`` gives another), Run the demo model on it and
   paint T cells: the dock and the canvas say the slide is outside the training data.

Each step writes ``NN_step_WxH.png`` (the whole window) at napari's first-launch size (1089 x 630) and full
screen, each laid out as ``he2rna view`` lays out a window on a screen of that size
(:func:`napari_he2rna.napari.viewer.fit_window`) with the dock scrolled to what the step is about, and
``NN_step_dock.png`` (the dock's tab at its full height, so what needs scrolling is seen too); ``tour.txt``
lists the steps with the active layer, the hover text over its best tile and the window and dock sizes.
napari starts with fresh settings (a temporary settings file: no saved window geometry, as on a first
launch) and an empty feature cache.

Run (Xvfb is what the test suite uses too; ``scripts/setup_env.sh`` installs it)::

    xvfb-run -s "-screen 0 1920x1080x24" .venv/bin/python scripts/viewer_tour.py --out /tmp/tour \
        [--size 1920x1080] [--cmu PATH]

``--size`` is the full-screen size (default: the screen's). About 30 s on two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "sample_slide.tiff"
CD3 = ROOT / "sample_data" / "sample_slide_CD3.tsv"
CMU = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
#: napari's window on a first launch (no saved geometry): its layout's size hint.
FIRST_LAUNCH = (1089, 630)
GENE = "CD3E"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1920x1080, not {text!r}") from None
    return w, h


def wait(cond, timeout: float = 300.0, what: str = "the step") -> None:
    """Let Qt run (events, timers, workers' signals, deferred deletes) until ``cond()`` is true."""
    from qtpy.QtCore import QCoreApplication, QEvent, QEventLoop

    deadline = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"viewer_tour: {what} did not finish within {timeout:.0f} s")
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        # processEvents alone never deletes what Qt deletes later (napari's busy indicator would spin on)
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        time.sleep(0.01)


def settle(seconds: float = 0.4) -> None:
    end = time.perf_counter() + seconds
    wait(lambda: time.perf_counter() > end)


class Tour:
    """The viewer, its panel, and where the screenshots go."""

    def __init__(self, out: Path, full: tuple[int, int] | None) -> None:
        from qtpy.QtWidgets import QDockWidget

        from napari_he2rna.napari.viewer import open_viewer

        self.out = out
        self.log: list[str] = []
        self.viewer = open_viewer(None)
        self.window = None
        self.panel = None
        wait(lambda: bool(self.viewer.window.dock_widgets), what="docking the panel")
        self.panel = next(iter(dict(self.viewer.window.dock_widgets).values()))
        self.window = self.panel.window()
        self.dock = self.panel.parentWidget()
        while not isinstance(self.dock, QDockWidget):
            self.dock = self.dock.parentWidget()
        handle = self.window.windowHandle()
        wait(lambda: handle is not None and handle.isExposed(), what="showing the window")
        settle(1.0)
        screen = self.window.screen().availableGeometry()
        self.sizes = [FIRST_LAUNCH, full or (screen.width(), screen.height())]
        self.note(f"window as he2rna view opened it: {self.window.width()} x {self.window.height()}")

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.log.append(text)

    def hover_text(self) -> str:
        """The status-bar text napari shows for the active layer over the slide's best-scored tile."""
        import numpy as np

        layer = self.viewer.layers.selection.active
        if layer is None:
            return "(no active layer)"
        if layer.data.ndim != 2 or not np.isfinite(layer.data).any():
            position = (layer.extent.world[0] + layer.extent.world[1]) / 2.0
        else:
            pixel = np.unravel_index(np.nanargmax(layer.data), layer.data.shape)
            position = layer.data_to_world(pixel)
        status = layer.get_status(position, view_direction=None, dims_displayed=[0, 1], world=True)
        return str(status.get("value", status) if isinstance(status, dict) else status)

    def shot(self, name: str, tab: str, focus=None) -> None:
        """Screenshots of one step: the window at each size (the dock scrolled to ``focus``, the widget the
        step is about, as a user scrolls to it), then the dock's tab at its full height."""
        self.panel.show_tab(tab)
        active = self.viewer.layers.selection.active
        self.note(f"{name}: tab {tab}; active layer: {active.name if active is not None else None}")
        self.note(f"    hover over the best tile: {self.hover_text()}")
        from napari_he2rna.napari.viewer import fit_window

        for w, h in self.sizes:
            fit_window(self.dock, (w, h))  # what he2rna view does on a screen of that size
            settle(0.3)
            self.viewer.reset_view()  # as napari does for a new layer: the whole slide in the canvas
            if focus is not None:
                self.panel.scroll.ensureWidgetVisible(focus, 0, 0)
            settle(0.5)
            path = self.out / f"{name}_{w}x{h}.png"
            self.window.grab().save(str(path))
            size = f"window {self.window.width()} x {self.window.height()}, dock {self.panel.width()} px"
            self.note(f"    {path.name}: {size}")
        self.panel.current_page.grab().save(str(self.out / f"{name}_dock.png"))

    # ------------------------------------------------------------------ steps
    def open_slide(self, path: Path) -> None:
        self.panel.slide.open_path(path)
        layer = self.viewer.layers[-1]
        # picked in the Model and Export tabs as a user would: under he2rna view (napari hands the plugin a
        # proxy of the viewer) their slide pickers do not follow a second slide made active by itself
        for picker in (self.panel.model.slide_picker, self.panel.export.slide_picker):
            picker.value = next(c for c in picker.choices if c.name == layer.name)
        settle()

    def run(self, gene: str) -> None:
        model = self.panel.model
        if model.run() is None:
            raise SystemExit("viewer_tour: Run did not start (see the notification above)")
        wait(lambda: not model.running, what="Run")
        if model.paint(gene) is None:
            raise SystemExit(f"viewer_tour: painting {gene} failed")
        settle()

    def compare(self, truth: Path, score: str) -> None:
        compare = self.panel.compare
        if not compare.load_truth_file(truth):
            raise SystemExit(f"viewer_tour: {truth.name} did not load: {compare.status.text()}")
        compare.score_a.setCurrentText(score)
        wait(lambda: bool(compare.results), what="the comparison")
        settle()

    def export(self, folder: Path) -> None:
        export = self.panel.export
        folder.mkdir(parents=True, exist_ok=True)
        for path in (folder / "sample_slide_tile_scores.csv", folder / f"sample_slide_{GENE}.tif"):
            path.unlink(missing_ok=True)
        if export.export_csv(folder / "sample_slide_tile_scores.csv") is None:
            raise SystemExit("viewer_tour: the CSV export failed")
        export.set_checked([GENE])
        if export.export_tiff(folder / f"sample_slide_{GENE}.tif") is None:
            raise SystemExit("viewer_tour: the TIFF export failed")
        settle()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the screenshots (created)")
    ap.add_argument("--size", type=_size, default=None, help="full-screen size WxH (default: the screen's)")
    ap.add_argument("--cmu", type=Path, default=CMU, help="the real H&E region of the last step")
    args = ap.parse_args()
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        print('viewer_tour: no display; run it under xvfb-run -s "-screen 0 1920x1080x24"', file=sys.stderr)
        return 2
    if not args.cmu.is_file():
        print(f"viewer_tour: {args.cmu} is not there (--cmu PATH gives another H&E region)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # A first launch: no saved window geometry (napari's settings file is a new one), no feature cache.
        os.environ["NAPARI_CONFIG"] = str(Path(tmp) / "napari_settings.yaml")
        os.environ["HE2RNA_CACHE"] = str(Path(tmp) / "cache")
        from napari_he2rna.torch_preload import preload

        preload()  # before napari's OpenGL: see napari_he2rna.torch_preload
        from qtpy.QtWidgets import QApplication

        tour = Tour(args.out, args.size)
        tour.shot("00_launch", "Model")
        tour.open_slide(SAMPLE)
        tour.shot("01_open_slide", "Slide")
        tour.run(GENE)
        tour.shot("02_run", "Model")
        tour.panel.model.paint("B cells")
        tour.panel.model.paint(GENE)
        tour.shot("03_gene", "Model", tour.panel.model.gene_box)
        tour.panel.model.spread_check.setChecked(True)
        settle()
        tour.shot("04_fold_spread", "Model", tour.panel.model.gene_box)
        tour.panel.model.spread_check.setChecked(False)  # the heatmap itself again, picked in the layer list
        model = tour.panel.model
        tour.viewer.layers.selection.active = model.heatmap_layer(model.current_state(), GENE)
        tour.compare(CD3, GENE)
        tour.shot("05_compare", "Compare", tour.panel.compare.canvas)
        tour.export(args.out / "exports")
        tour.shot("06_export", "Export", tour.panel.export.result_label)
        for layer in tour.viewer.layers:  # the sample slide's layers out of the way of the next slide
            layer.visible = False
        tour.open_slide(args.cmu)
        tour.run("T cells")
        tour.shot("07_cmu_region", "Model", tour.panel.model.ood_label)
        ood = tour.panel.model.ood_label
        tour.note(f"    training-data check: {ood.text() if ood.isVisible() else '(not shown)'}")
        (args.out / "tour.txt").write_text("\n".join(tour.log) + "\n", encoding="utf-8")
        tour.viewer.close()
        QApplication.processEvents()
    print(f"viewer_tour: screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
