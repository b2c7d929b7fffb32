"""The "Model" dock widget: choose a model, run it on a slide, paint gene / gene-set heatmaps.

Only wiring: the work is :class:`napari_he2rna.session.SlideSession` (one per slide layer, kept by
:mod:`._state`). **Run** computes the slide's tile features in a napari ``thread_worker`` (progress in the
widget, **Cancel** sets a ``threading.Event`` the compute code checks); the tile
grid is drawn as a light outline layer as soon as it is known. A pick in the gene box paints an Image
layer named after the gene/set: one pixel per tile, NaN off tissue, in µm over the slide layer. Errors a user
can act on (:class:`~napari_he2rna.errors.He2rnaError`) become notifications, never tracebacks.

**Progressive painting.** Run extracts the tiles in a spread order (a coarse lattice first,
:mod:`napari_he2rna.progressive`) and the picked gene's heatmap fills in while the extraction goes on: tiles
not extracted yet show their nearest extracted tile's value, so the whole slide has a coarse map after the
first ~1/16 of the tiles. The picker works during the run; Cancel keeps what is painted (the features go to
the cache as they arrive, so the next Run resumes).

**One heatmap layer per slide.** Picking another gene updates that layer's data in place (one dot product
per fold from the session's cached hidden layers); **Pin** keeps a copy of it as its own layer (for side by
side or grid view). **Fold spread** adds a second layer, the standard deviation of the fold models' tile
scores. The picker shows each gene's validation R from the bundle (per cancer type or averaged) and marks
the reliable ones (:mod:`napari_he2rna.readout`); hovering a heatmap shows the tile's scores for every
painted name and the Compare tab's truth value in the status bar.

After a run the worker also compares the slide with the model's training data (:mod:`napari_he2rna.ood`):
when it is outside (or predictions leave the training targets' range) a red label in the Run box says so,
and the gene box offers "feature distance (to training data)", painted like a gene.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QStringListModel, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..model import ood
from ..maps import progressive
from ..maps import readout
from ..maps import spatial
from ..errors import Cancelled, He2rnaError
from ..maps.session import DISTANCE_NAME, default_model_path
from ._pickers import SlideLayerPicker
from ._state import META_KEY, SlideState, get_registry, layer_info
from ._worker import Failed, ProgressBridge, compute_job

if TYPE_CHECKING:
    import napari

    from ..model.bundle import ModelBundle
    from ..slides.tiling import TileGrid

log = logging.getLogger(__name__)

DEMO_WARNING = "DEMO: trained on synthetic slides, means nothing on real tissue"
OOD_STYLE = "color: #ff4040; font-weight: bold;"
OOD_OK_STYLE = "color: #a0a0a0;"
HEATMAP_COLORMAP = "magma"
HEATMAP_OPACITY = 0.6
UNCERTAINTY_COLORMAP = "viridis"
#: Least time between two live repaints during a run (ms): batches can come faster than a redraw. Fast
#: until the coarse first pass is painted, then once a second: after the coarse map a pathologist gains
#: little from faster updates, and each repaint redraws the canvas.
LIVE_REPAINT_MS = 150
LIVE_REPAINT_AFTER_FIRST_PASS_MS = 1000
#: Least time between two updates of the dock's progress bar and status line during a run (ms). Any widget
#: update recomposes the whole window with the OpenGL canvas: on software OpenGL (Mesa llvmpipe: remote
#: desktops, virtual displays) one per batch cost the extraction CPU time (benchmarks/README.md).
PROGRESS_UPDATE_MS = 500
DEVICES = ("auto", "cuda", "cpu")


def tile_outline(grid: TileGrid, max_px: int = 2048) -> tuple[np.ndarray, tuple, tuple]:
    """A raster drawing each kept tile's square outline, with its napari scale/translate in µm.

    Each tile becomes ``f x f`` pixels (``f`` from 3 to 16 so the raster stays under ``max_px`` a side) whose
    border is 1 and inside NaN (transparent), so the slide shows through.

    Returns
    -------
    raster : (n_rows * f, n_cols * f) float32
    scale, translate : (y, x) µm; pixel ``j`` covers level-0 ``[j*T/f, (j+1)*T/f)`` like the heatmap's
        one-pixel-per-tile convention (:func:`napari_he2rna.spatial.heatmap_transform` at ``f = 1``).
    """
    n_rows, n_cols = int(grid.n_rows), int(grid.n_cols)
    f = int(np.clip(max_px // max(n_rows, n_cols, 1), 3, 16))
    kept = np.zeros((n_rows, n_cols), dtype=bool)
    kept[grid.table["row"].to_numpy(dtype=np.intp), grid.table["col"].to_numpy(dtype=np.intp)] = True
    block = np.zeros((f, f), dtype=bool)
    block[[0, -1], :] = True
    block[:, [0, -1]] = True
    raster = np.where(np.kron(kept, block), np.float32(1.0), np.float32(np.nan))
    mpp, tile_px = float(grid.mpp), float(grid.tile_px)
    s = tile_px * mpp / f
    t = (tile_px / f - 1.0) / 2.0 * mpp
    return raster, (s, s), (t, t)


class HeatmapImage(Image):
    """A heatmap Image layer whose status-bar text is the tile's readout (scores of every painted name and
    the truth value), from ``readout_provider(world_position) -> str`` (see ``ModelWidget.hover_text``)."""

    readout_provider = None

    def get_status(self, position=None, *, view_direction=None, dims_displayed=None, world=False, value=None):
        status = super().get_status(
            position, view_direction=view_direction, dims_displayed=dims_displayed, world=world, value=value
        )
        provider = self.readout_provider
        if provider is not None and position is not None:
            try:
                pos = np.asarray(position, dtype=float)
                if not world:
                    pos = np.asarray(self.data_to_world(pos), dtype=float)
                text = provider(pos)
            except Exception:  # noqa: BLE001 - a readout must never break the status bar
                text = ""
            if text:
                status["value"] = text
        return status


# ------------------------------------------------------------------------------------------ the widget
class ModelWidget(QWidget):
    """Model bundle, device, Run/Cancel, and the gene picker that paints heatmap layers.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it to dock widgets).
    model_path
        The model to preselect; default the bundled demo model (:func:`session.default_model_path`).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = get_registry(napari_viewer)
        self.bundle: ModelBundle | None = None
        self.worker = None
        self._run_state: SlideState | None = None
        self._progress: tuple[int, int, str] | None = None  # the latest report not shown yet
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.timeout.connect(self._show_progress)
        self._pending_paint: str | None = None
        self._bridge = ProgressBridge(self)  # a child: deleted (and silenced) with the widget
        self._bridge.progressed.connect(self._on_progress)
        self._bridge.grid_ready.connect(self._on_grid_ready)
        self._bridge.batch_done.connect(self._on_batch_done)
        self._label_to_name: dict[str, str] = {}
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.timeout.connect(self._live_repaint)

        # --- slide and model
        self.slide_picker = SlideLayerPicker(napari_viewer)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model bundle (.safetensors)")
        self.open_model_button = QPushButton("Open model…")
        self.model_label = QLabel("No model loaded.")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.demo_label = QLabel(DEMO_WARNING)
        self.demo_label.setWordWrap(True)
        self.demo_label.setStyleSheet("color: #ff4040; font-weight: bold;")
        self.demo_label.setVisible(False)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self._setup_devices()

        # --- run
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Tile the slide and compute its features (the cache is reused)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        # Whether the slide is like the model's training data (set after each run, per slide).
        self.ood_label = QLabel("")
        self.ood_label.setWordWrap(True)
        self.ood_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.ood_label.setVisible(False)

        # --- genes
        self.gene_model = QStringListModel([])
        self.gene_combo = QComboBox()
        self.gene_combo.setEditable(True)
        self.gene_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.gene_combo.setModel(self.gene_model)
        self.gene_combo.setMaxVisibleItems(20)
        view = self.gene_combo.view()
        if hasattr(view, "setUniformItemSizes"):  # fast popup over tens of thousands of names
            view.setUniformItemSizes(True)
        self.completer = QCompleter(self.gene_model, self.gene_combo)
        self.completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.completer.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.completer.setMaxVisibleItems(15)
        self.gene_combo.setCompleter(self.completer)
        self.gene_combo.lineEdit().setPlaceholderText("Type a gene or gene set, Enter to paint")
        self.paint_button = QPushButton("Paint")
        self.pin_button = QPushButton("Pin")
        self.pin_button.setToolTip(
            "Keep a copy of the heatmap as its own layer (it stays when the gene changes)"
        )
        self.spread_check = QCheckBox("fold spread")
        self.spread_check.setToolTip(
            "Also paint the uncertainty layer: the standard deviation of the fold models' tile scores"
        )
        self.type_combo = QComboBox()
        self.type_combo.setToolTip("Validation R shown for this cancer type (or averaged over the types)")
        self.sort_check = QCheckBox("best R first")
        self.reliable_check = QCheckBox(f"only {readout.MARK}")
        self.r_label = QLabel("")
        self.r_label.setWordWrap(True)
        self.r_label.setStyleSheet(OOD_OK_STYLE)
        self.set_edit = QLineEdit()
        self.set_edit.setPlaceholderText("Add gene set…  name=G1+G2+G3")
        self.add_set_button = QPushButton("Add set")

        self._build_layout()
        self._connect()
        self._fill_models(model_path)
        self._slide_changed()

    # ------------------------------------------------------------------ layout / wiring
    def _build_layout(self) -> None:
        model_box = QGroupBox("Slide and model")
        box_layout = QVBoxLayout(model_box)
        form = QFormLayout()
        form.addRow("slide", self.slide_picker.native)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.open_model_button)
        form.addRow("model", row)
        form.addRow("device", self.device_combo)
        box_layout.addLayout(form)
        # Wrapped labels outside the form layout, which clips their height.
        box_layout.addWidget(self.model_label)
        box_layout.addWidget(self.demo_label)

        run_box = QGroupBox("Run")
        run_layout = QVBoxLayout(run_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        run_layout.addLayout(buttons)
        run_layout.addWidget(self.progress_bar)
        run_layout.addWidget(self.status_label)
        run_layout.addWidget(self.ood_label)

        gene_box = QGroupBox("Genes")
        gene_layout = QVBoxLayout(gene_box)
        pick = QHBoxLayout()
        pick.addWidget(self.gene_combo, 1)
        pick.addWidget(self.paint_button)
        pick.addWidget(self.pin_button)
        gene_layout.addLayout(pick)
        # Two short rows rather than one wide one: the dock stays narrow and the canvas wide.
        gene_layout.addWidget(self.type_combo)
        opts = QHBoxLayout()
        opts.addWidget(self.sort_check)
        opts.addWidget(self.reliable_check)
        opts.addWidget(self.spread_check)
        opts.addStretch(1)
        gene_layout.addLayout(opts)
        gene_layout.addWidget(self.r_label)
        sets = QHBoxLayout()
        sets.addWidget(self.set_edit, 1)
        sets.addWidget(self.add_set_button)
        gene_layout.addLayout(sets)

        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addWidget(run_box)
        layout.addWidget(gene_box)
        layout.addStretch(1)

    def _connect(self) -> None:
        self.slide_picker.changed.connect(self._slide_changed)
        self.open_model_button.clicked.connect(self._open_model_clicked)
        self.model_combo.activated.connect(self._model_combo_activated)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.paint_button.clicked.connect(lambda: self._request_paint(self.gene_combo.currentText()))
        # Enter, a pick in the drop-down and a pick in the completer popup all paint; they can fire together
        # for one user action, so requests are coalesced (see _request_paint).
        self.gene_combo.lineEdit().returnPressed.connect(
            lambda: self._request_paint(self.gene_combo.currentText())
        )
        self.gene_combo.activated.connect(lambda i: self._request_paint(self.gene_combo.itemText(i)))
        self.completer.activated.connect(self._request_paint)
        self.pin_button.clicked.connect(lambda: self.pin())
        self.spread_check.toggled.connect(self._spread_toggled)
        self.type_combo.currentIndexChanged.connect(lambda *_: self._gene_display_changed())
        self.sort_check.toggled.connect(lambda *_: self.refresh_genes())
        self.reliable_check.toggled.connect(lambda *_: self.refresh_genes())
        self.add_set_button.clicked.connect(lambda: self.add_gene_set(self.set_edit.text()))
        self.set_edit.returnPressed.connect(lambda: self.add_gene_set(self.set_edit.text()))
        self.registry.changed.connect(self._registry_changed)

    def _setup_devices(self) -> None:
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken torch install just means "no CUDA" here
            cuda = False
        item = self.device_combo.model().item(DEVICES.index("cuda"))
        if not cuda and item is not None:
            item.setEnabled(False)
            item.setToolTip("No CUDA GPU is available to PyTorch")

    # ------------------------------------------------------------------ model
    def _fill_models(self, model_path: str | Path | None) -> None:
        default = default_model_path()
        if default.is_file():
            self.model_combo.addItem(f"demo model ({default.name})", str(default))
        if model_path is not None:
            self.load_model(model_path)
        elif default.is_file():
            self.load_model(default)
        else:
            self.model_label.setText(
                f"The bundled demo model is not there ({default}); create it (see the README) or open a "
                "model bundle."
            )

    def load_model(self, path: str | Path) -> ModelBundle | None:
        """Load a model bundle and make it the current model (errors as notifications)."""
        from ..features.backbones import import_backbone_libraries
        from ..model.bundle import load_bundle

        path = Path(path)
        try:
            bundle = load_bundle(path)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        self.bundle = bundle
        # The backbone's libraries load while the user picks a slide and presses Run (torchvision: ~2 s).
        threading.Thread(
            target=import_backbone_libraries, args=(bundle.backbone,), name="he2rna-imports", daemon=True
        ).start()
        idx = self.model_combo.findData(str(path))
        if idx < 0:
            self.model_combo.addItem(path.name, str(path))
            idx = self.model_combo.count() - 1
        self.model_combo.setCurrentIndex(idx)
        self.model_combo.setToolTip(str(path))
        # The red label says "demo" more visibly than describe()'s own sentence about it.
        self.model_label.setText(bundle.describe().split(" DEMO MODEL:")[0])
        self.demo_label.setVisible(bool(bundle.demo))
        self.type_combo.blockSignals(True)
        self.type_combo.clear()
        self.type_combo.addItems(readout.cancer_types(bundle))
        self.type_combo.blockSignals(False)
        has_r = self.type_combo.count() > 0
        for w in (self.type_combo, self.sort_check, self.reliable_check):
            w.setVisible(has_r)
        _, how = readout.reliable_threshold(bundle, self.cancer_type)
        self.r_label.setText(
            f"R: cross-validated correlation per gene; {readout.MARK} = {how}." if has_r else ""
        )
        self.r_label.setVisible(has_r)
        self.refresh_genes()
        self.update_assessment()
        return bundle

    def _open_model_clicked(self) -> None:
        start = str(Path(self.model_combo.currentData() or default_model_path()).parent)
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model bundle", start, "Model bundles (*.safetensors);;All files (*)"
        )
        if path:
            self.load_model(path)

    def _model_combo_activated(self, index: int) -> None:
        path = self.model_combo.itemData(index)
        if path and (self.bundle is None or str(getattr(self.bundle, "path", "")) != str(path)):
            self.load_model(path)

    # ------------------------------------------------------------------ slide state
    @property
    def slide_layer(self):
        """The slide layer the widget works on (None when no slide is open)."""
        return self.slide_picker.value

    def current_state(self) -> SlideState | None:
        """The picked slide's state (created on first use), or None."""
        layer = self.slide_layer
        if layer is None or layer not in self.viewer.layers:
            return None
        return self.registry.state_for(layer)

    def _slide_changed(self, *_: Any) -> None:
        self.current_state()  # a slide layer picked gets its session
        self.refresh_genes()
        self.update_assessment()
        self._update_buttons()

    def update_assessment(self) -> ood.OODAssessment | None:
        """Show how the picked slide compares with the current model's training data (after a Run).

        Red text when the slide is outside (its scores are not predictions), grey when it is within or the
        check is unavailable, hidden before a run. Returns the assessment shown, or None.
        """
        state = self.current_state()
        session = state.session if state is not None else None
        assessment = (
            session.cached_assessment
            if session is not None and session.ready and session.bundle is self.bundle
            else None
        )
        if assessment is None:
            self.ood_label.setVisible(False)
            self.ood_label.setText("")
            return None
        sentence = assessment.message[:1].upper() + assessment.message[1:]
        if assessment.outside:
            self.ood_label.setText(f"Warning: {sentence}")
            self.ood_label.setStyleSheet(OOD_STYLE)
        else:
            self.ood_label.setText(sentence)
            self.ood_label.setStyleSheet(OOD_OK_STYLE)
        self.ood_label.setVisible(True)
        return assessment

    def _registry_changed(self) -> None:
        self._update_buttons()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update_buttons(self) -> None:
        self.run_button.setEnabled(not self.running)
        self.cancel_button.setEnabled(self.running)

    # ------------------------------------------------------------------ run / cancel
    def run(self):
        """Compute the picked slide's features for the current model in a worker; returns the worker."""
        from napari.qt.threading import create_worker

        if self.running:
            show_info("A run is already going; cancel it or wait for it to finish.")
            return None
        state = self.current_state()
        if state is None:
            show_error("Open a slide first (File > Open, or the Slide widget).")
            return None
        if self.bundle is None:
            show_error("Choose a model bundle first (Open model…).")
            return None
        session = state.session
        if session.bundle is not self.bundle:
            session.set_model(self.bundle)
        cancel = threading.Event()
        state.cancel, state.running = cancel, True
        self._run_state = state
        device = self.device_combo.currentText()
        # Empty until the first progress report, not "busy": Qt animates a busy bar about 30 times a second,
        # and on software OpenGL each frame recomposes the window while the slide is being tiled.
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label.setText(f"Tiling {state.layer.name}…")
        # No napari activity-dock progress: this dock has its own bar and Cancel, and the activity
        # indicator is an animated GIF that recomposes the window about 30 times a second, which on
        # software OpenGL took about a third of a core from the extraction (benchmarks/README.md).
        worker = create_worker(
            compute_job,
            state,
            self.bundle,
            device,
            cancel,
            self._bridge,
            _start_thread=False,
            _ignore_errors=True,
        )
        # Bound methods (not lambdas): Qt drops these connections if the widget is deleted mid-run.
        worker.returned.connect(self._on_worker_returned)
        worker.errored.connect(self._on_worker_errored)  # only bugs in the job itself
        worker.finished.connect(self._on_worker_finished)
        self.destroyed.connect(lambda *_, c=cancel: c.set())  # a closed widget stops its run
        self.worker = worker
        self._update_buttons()
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the run in flight to stop (it stops at the next batch; nothing half-made is kept)."""
        state = self._run_state
        if state is not None and state.cancel is not None:
            state.cancel.set()
            self.status_label.setText("Cancelling…")

    def _on_worker_returned(self, result) -> None:
        if self._run_state is not None:
            self._on_returned(self._run_state, result)

    def _on_worker_errored(self, exc: Exception) -> None:
        if self._run_state is not None:
            self._on_errored(self._run_state, exc)

    def _on_worker_finished(self) -> None:
        if self._run_state is not None:
            self._on_finished(self._run_state)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        """A progress report from the worker: shown at once, then at most every :data:`PROGRESS_UPDATE_MS`."""
        self._progress = (done, total, message)
        if not self._progress_timer.isActive():
            self._show_progress()
            self._progress_timer.start(PROGRESS_UPDATE_MS)

    def _show_progress(self) -> None:
        if self._progress is None or not self.running:
            return
        done, total, message = self._progress
        self._progress = None
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
        label = message or "features"
        self.status_label.setText(f"{label}: {done}/{total} tiles")

    def _on_grid_ready(self, grid: TileGrid) -> None:
        state = self._run_state
        if state is None or state.freed or (state.cancel is not None and state.cancel.is_set()):
            return
        self._show_tiles(state, grid)
        self.status_label.setText(f"{len(grid.table)} tissue tiles; computing features…")

    def _on_batch_done(self, done: int, total: int) -> None:
        """A batch of features arrived (from the worker): repaint soon (see :data:`LIVE_REPAINT_MS`)."""
        if self._live_timer.isActive():
            return
        live = self._run_state.session.live if self._run_state is not None else None
        first_pass = progressive.first_pass_size(live.grid) if live is not None else total
        self._live_timer.start(LIVE_REPAINT_MS if done <= first_pass else LIVE_REPAINT_AFTER_FIRST_PASS_MS)

    def _live_repaint(self) -> None:
        state = self._run_state
        if state is None or state.freed or not state.session.painted:
            return
        name = state.extra.get("gene")
        if name and self.active_layer(state) is None:
            self.paint(name, state)
            return
        self.refresh_live(state)

    def refresh_live(self, state: SlideState) -> None:
        """Repaint a slide's heatmap layers from the tiles extracted so far (the data is updated in place)."""
        for layer in [
            *self.registry.layers_of(state, "heatmap"),
            *self.registry.layers_of(state, "uncertainty"),
        ]:
            info = layer_info(layer) or {}
            name = info.get("name")
            if name:
                self._update_layer(state, layer, name, info.get("kind", "heatmap"))

    def _on_returned(self, state: SlideState, result: TileGrid | Failed) -> None:
        if isinstance(result, Failed):
            self._on_errored(state, result.exc)
            return
        grid = result
        if state.freed:
            return
        self._live_timer.stop()
        self._progress_timer.stop()
        self._progress = None
        self._show_tiles(state, grid)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.status_label.setText(f"{len(grid.table)} tiles ready: pick a gene or a gene set to paint.")
        self.refresh_genes()
        self.update_assessment()
        self._repaint(state)

    def _on_errored(self, state: SlideState, exc: BaseException) -> None:
        self._live_timer.stop()
        self._progress_timer.stop()
        self._progress = None
        kept = not state.freed and state.session.painted
        if not state.freed and not kept:
            self._remove_tiles_if_not_ready(state)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        if isinstance(exc, Cancelled):
            if kept:
                self.refresh_live(state)  # the last batches, then it stays as painted
                done, total = state.session.n_scored()
                self.status_label.setText(
                    f"Cancelled: {done} of {total} tiles painted are kept; Run again to finish (it resumes)."
                )
            else:
                self.status_label.setText("Cancelled; nothing was changed.")
            if not state.freed:
                show_info(f"{state.layer.name}: run cancelled.")
        elif isinstance(exc, He2rnaError):
            self.status_label.setText(str(exc))
            if not state.freed:  # a removed slide's reads fail by design: no message for those
                show_error(str(exc))
        else:
            log.error("HE2RNA run failed", exc_info=(type(exc), exc, exc.__traceback__))
            self.status_label.setText(f"The run failed: {exc}")
            show_error(f"The run failed unexpectedly ({type(exc).__name__}: {exc}).")

    def _on_finished(self, state: SlideState) -> None:
        self.registry.release_after_run(state)
        self._progress_timer.stop()
        self._progress = None
        self.worker = None
        self._run_state = None
        self._update_buttons()

    # ------------------------------------------------------------------ layers
    def _show_tiles(self, state: SlideState, grid: TileGrid) -> None:
        """Add or update the light tile-outline layer of a slide."""
        raster, scale, translate = tile_outline(grid)
        existing = self.registry.layers_of(state, "tiles")
        if existing:
            layer = existing[0]
            layer.data = raster
            layer.scale, layer.translate = scale, translate
            return
        self.viewer.add_image(
            raster,
            name=f"tissue tiles ({state.layer.name})",
            colormap="cyan",
            contrast_limits=(0.0, 1.0),
            opacity=0.3,
            blending="translucent",
            scale=scale,
            translate=translate,
            units=("µm", "µm"),
            metadata={META_KEY: {"kind": "tiles", "session_key": state.key, "name": "tiles"}},
        )
        self.viewer.layers.selection.active = state.layer  # keep the picker on the slide

    def _remove_tiles_if_not_ready(self, state: SlideState) -> None:
        if state.session.ready:
            return  # an earlier run's grid is still valid
        for layer in self.registry.layers_of(state, "tiles"):
            self.viewer.layers.remove(layer)

    def active_layer(self, state: SlideState, kind: str = "heatmap"):
        """The slide's one active layer of ``kind`` (``"heatmap"`` or ``"uncertainty"``), or None."""
        for layer in self.registry.layers_of(state, kind):
            if (layer_info(layer) or {}).get("role") == "active":
                return layer
        return None

    def heatmap_layer(self, state: SlideState, name: str):
        """The heatmap layer showing ``name`` for a slide (the active one first, then pinned), or None."""
        found = [ly for ly in self.registry.layers_of(state, "heatmap") if layer_info(ly).get("name") == name]
        found.sort(key=lambda ly: (layer_info(ly) or {}).get("role") != "active")
        return found[0] if found else None

    def _request_paint(self, name: str) -> None:
        # One Enter can fire returnPressed, the combo's activated and the completer's activated: paint once.
        if not str(name).strip():
            return
        first = self._pending_paint is None
        self._pending_paint = str(name).strip()
        if first:
            QTimer.singleShot(0, self._flush_paint)

    def _flush_paint(self) -> None:
        label, self._pending_paint = self._pending_paint, None
        if label:
            self.paint(self._label_to_name.get(label, readout.name_from_label(label)))

    @property
    def cancer_type(self) -> str | None:
        text = self.type_combo.currentText()
        return text or None

    def layer_title(self, state: SlideState, name: str, kind: str = "heatmap") -> str:
        """A layer's name: the gene, its validation R (when the bundle has one) and, while running, the share
        of tiles painted."""
        session = state.session
        caption = readout.r_caption(session.bundle, name, self.cancer_type)
        title = name if kind == "heatmap" else f"{name} fold spread"
        if caption:
            title += f" · {caption}"
        done, total = session.n_scored()
        if not session.ready and total:
            title += f" · {100 * done // total}% of tiles"
        return title

    def _layer_content(self, state: SlideState, name: str, kind: str):
        session = state.session
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", spatial.PartialGeneSetWarning)
            raster = session.raster(name, kind=kind)
            limits = session.contrast_limits(name, kind=kind)
            scale, translate = session.heatmap_transform()
        units = session.units(name) if kind == "heatmap" else readout.uncertainty_unit(session.bundle)
        return raster, limits, scale, translate, units, seen

    def _update_layer(self, state: SlideState, layer, name: str, kind: str = "heatmap") -> bool:
        """Put ``name``'s current raster into an existing layer (in place). False after an error message."""
        try:
            raster, limits, scale, translate, units, _ = self._layer_content(state, name, kind)
        except He2rnaError as exc:
            show_error(str(exc))
            return False
        if layer.data.shape == raster.shape:
            layer.data[...] = raster
            layer.refresh()
        else:
            layer.data = raster
        # Each contrast-limits event redraws the colour bar (~7 ms): the range change stays silent and the
        # limits' own event redraws once.
        with layer.events.contrast_limits.blocker():
            layer.contrast_limits_range = limits
        layer.contrast_limits = limits
        if tuple(layer.scale) != tuple(scale) or tuple(layer.translate) != tuple(translate):
            layer.scale, layer.translate = scale, translate
        info = layer_info(layer)
        if info.get("role") == "active":
            old, info["name"] = info.get("name"), name
            if kind == "heatmap" and old and old != name and self.heatmap_layer(state, old) is None:
                state.session.drop(old)  # as when its layer is closed: no layer shows it any more
            layer.metadata["units"] = units
            title = self.layer_title(state, name, kind)
            if layer.name != title:
                layer.name = title
        return True

    def _add_layer(
        self,
        state: SlideState,
        name: str,
        kind: str,
        role: str,
        raster,
        limits,
        scale,
        translate,
        units,
        title: str,
    ):
        layer = HeatmapImage(
            raster,
            name=title,
            colormap=HEATMAP_COLORMAP if kind == "heatmap" else UNCERTAINTY_COLORMAP,
            contrast_limits=limits,
            opacity=HEATMAP_OPACITY,
            blending="translucent",
            interpolation2d="nearest",
            scale=scale,
            translate=translate,
            units=("µm", "µm"),
            metadata={
                META_KEY: {"kind": kind, "session_key": state.key, "name": name, "role": role},
                "units": units,
            },
        )
        layer.readout_provider = lambda pos, st=state: self.hover_text(st, pos)
        self.viewer.add_layer(layer)
        return layer

    def paint(self, name: str, state: SlideState | None = None):
        """Paint a gene or gene set on the picked slide: the slide's one heatmap layer shows it (its data is
        updated in place; the first pick adds it). During a run, before the first tiles, the pick is kept and
        painted as they arrive.

        Returns the layer, or None after an error notification (unknown gene, not run yet, ...).
        """
        state = state if state is not None else self.current_state()
        if state is None:
            show_error("Open a slide first, then press Run.")
            return None
        session = state.session
        if not session.painted:
            if state.running and session.bundle is not None:
                try:
                    state.extra["gene"] = session.canonical(name)
                except He2rnaError as exc:
                    show_error(str(exc))
                    return None
                self.status_label.setText(
                    f"{state.extra['gene']} is painted as soon as the first tiles arrive."
                )
                return None
            show_error(f"Press Run on {state.layer.name} first: heatmaps need its tile features.")
            return None
        try:
            canonical = session.canonical(name)
            raster, limits, scale, translate, units, seen = self._layer_content(state, canonical, "heatmap")
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        for w in seen:
            if issubclass(w.category, spatial.PartialGeneSetWarning):
                show_warning(str(w.message))
        state.extra["gene"] = canonical
        layer = self.active_layer(state)
        created = layer is None
        if created:
            layer = self._add_layer(
                state,
                canonical,
                "heatmap",
                "active",
                raster,
                limits,
                scale,
                translate,
                units,
                self.layer_title(state, canonical),
            )
        else:
            self._update_layer(state, layer, canonical, "heatmap")
        if self.spread_check.isChecked():
            self._paint_spread(state, canonical)
        self._show_colorbar(layer)
        if self.viewer.layers.selection.active is not layer:
            self.viewer.layers.selection.active = layer
        self.status_label.setText(f"Painted {canonical} ({units}).")
        self.registry.changed.emit()
        return layer

    def _paint_spread(self, state: SlideState, name: str):
        """Add or update the slide's uncertainty layer (std of the fold models' tile scores) for ``name``."""
        if state.session.bundle is None or name == DISTANCE_NAME:
            return None
        layer = self.active_layer(state, "uncertainty")
        if layer is not None:
            return layer if self._update_layer(state, layer, name, "uncertainty") else None
        try:
            raster, limits, scale, translate, units, _ = self._layer_content(state, name, "uncertainty")
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        layer = self._add_layer(
            state,
            name,
            "uncertainty",
            "active",
            raster,
            limits,
            scale,
            translate,
            units,
            self.layer_title(state, name, "uncertainty"),
        )
        layer.visible = True
        return layer

    def paint_uncertainty(self, name: str | None = None, state: SlideState | None = None):
        """Paint the fold spread of ``name`` (default: the picked gene) on the slide; returns the layer."""
        state = state if state is not None else self.current_state()
        if state is None or not state.session.painted:
            show_error("Press Run first: the fold spread needs the slide's tile features.")
            return None
        name = name or state.extra.get("gene")
        if not name:
            show_error("Pick a gene first, then its fold spread can be painted.")
            return None
        try:
            name = state.session.canonical(name)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        return self._paint_spread(state, name)

    def _spread_toggled(self, on: bool) -> None:
        state = self.current_state()
        if state is None:
            return
        if on:
            if state.session.painted and state.extra.get("gene"):
                self.paint_uncertainty(state=state)
        else:
            for layer in self.registry.layers_of(state, "uncertainty"):
                self.viewer.layers.remove(layer)

    def pin(self, state: SlideState | None = None):
        """Keep a copy of the slide's active heatmap as its own layer; returns it (None with a message)."""
        state = state if state is not None else self.current_state()
        layer = self.active_layer(state) if state is not None else None
        if layer is None:
            show_error("Paint a gene first; Pin keeps a copy of its heatmap.")
            return None
        info = layer_info(layer)
        name = info["name"]
        units = layer.metadata.get("units", "")
        copy = self._add_layer(
            state,
            name,
            "heatmap",
            "pinned",
            np.array(layer.data, copy=True),
            tuple(layer.contrast_limits),
            tuple(layer.scale),
            tuple(layer.translate),
            units,
            f"{name} (pinned)",
        )
        copy.visible = True
        copy.colorbar.visible = False
        self.viewer.layers.selection.active = layer
        self.registry.changed.emit()
        return copy

    def hover_text(self, state: SlideState, world_pos) -> str:
        """Status-bar text for a point (world µm, (..., y, x)): the tile's scores of every painted name (the
        slide's heatmap layers) and the Compare tab's truth value for it."""
        session = state.session
        if state.freed or not session.painted:
            return ""
        y, x = float(world_pos[-2]), float(world_pos[-1])
        tile = session.tile_at(x, y)
        if tile is None:
            return ""
        names = []
        for layer in self.registry.layers_of(state, "heatmap"):
            n = (layer_info(layer) or {}).get("name")
            if n and n not in names:
                names.append(n)
        scores = {n: session.scores(n) for n in names}
        truth_info = state.extra.get("truth")
        grid = session.current_grid()
        tile_id = grid.table["tile_id"].iloc[tile] if "tile_id" in grid.table else tile
        unit = session.units(names[0]) if names else ""
        return readout.hover_text(tile, scores, unit, truth_info, tile_id=tile_id)

    def _show_colorbar(self, layer) -> None:
        # One legend at a time: the newest heatmap's (colorbars of several layers would overlap).
        for other in self.viewer.layers:
            info = layer_info(other)
            if info and info.get("kind") in ("heatmap", "uncertainty") and other is not layer:
                if hasattr(other, "colorbar") and other.colorbar.visible:
                    other.colorbar.visible = False
        if hasattr(layer, "colorbar") and not layer.colorbar.visible:
            layer.colorbar.visible = True

    def _repaint(self, state: SlideState) -> None:
        """Recompute a slide's heatmaps after a run (the model may have changed); pinned copies too."""
        for layer in [
            *self.registry.layers_of(state, "heatmap"),
            *self.registry.layers_of(state, "uncertainty"),
        ]:
            info = layer_info(layer) or {}
            name = info.get("name")
            if name and not self._update_layer(state, layer, name, info.get("kind", "heatmap")):
                self.viewer.layers.remove(layer)
        name = state.extra.get("gene")
        if name and self.active_layer(state) is None:
            self.paint(name, state)

    # ------------------------------------------------------------------ genes
    def choices(self) -> list[str]:
        """What the gene box offers: gene sets (built-in, then the user's), then the model's genes."""
        state = self.current_state()
        if state is not None and state.session.bundle is not None and state.session.bundle is self.bundle:
            return state.session.choices()
        if self.bundle is None:
            return []
        first = [DISTANCE_NAME] if ood.bundle_reference(self.bundle) is not None else []
        sets = [*spatial.GENE_SETS, *[s for s in self.registry.gene_sets if s not in spatial.GENE_SETS]]
        return [*first, *sets, *self.bundle.genes]

    def refresh_genes(self) -> None:
        """Refill the gene box (keeps what is typed): each gene with its validation R and mark, sorted or
        filtered by R when asked."""
        text = self.gene_combo.currentText()
        bundle = self.bundle
        thr, _ = readout.reliable_threshold(bundle, self.cancer_type)
        entries = readout.picker_entries(
            bundle,
            self.choices(),
            self.cancer_type,
            sort_by_r=self.sort_check.isChecked(),
            min_r=thr if self.reliable_check.isChecked() else None,
        )
        self._label_to_name = {label: name for label, name in entries}
        self.gene_model.setStringList([label for label, _ in entries])
        self.gene_combo.setCurrentIndex(-1)
        self.gene_combo.setEditText(text)

    def _gene_display_changed(self) -> None:
        """Another cancer type: the picker's R and the painted layers' names follow."""
        if self.bundle is not None:
            _, how = readout.reliable_threshold(self.bundle, self.cancer_type)
            self.r_label.setText(f"R: cross-validated correlation per gene; {readout.MARK} = {how}.")
        self.refresh_genes()
        for state in self.registry.states():
            for kind in ("heatmap", "uncertainty"):
                layer = self.active_layer(state, kind)
                if layer is not None:
                    layer.name = self.layer_title(state, layer_info(layer)["name"], kind)

    def add_gene_set(self, spec: str) -> list[str]:
        """Add user gene sets from ``"name=G1+G2+G3"`` (several with ``;``) and paint them if possible.

        Returns the names added (empty after an error notification).
        """
        if not spec.strip():
            return []
        try:
            parsed = spatial.parse_gene_sets(spec.strip())
        except He2rnaError as exc:
            show_error(str(exc))
            return []
        self.registry.add_gene_sets(parsed)
        self.set_edit.clear()
        self.refresh_genes()
        state = self.current_state()
        if state is not None and state.session.painted:
            for name in parsed:
                self.paint(name, state)
        return list(parsed)
