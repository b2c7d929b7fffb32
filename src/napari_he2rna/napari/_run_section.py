"""The Model dock's "Run" box: Run / Cancel, the progress bar and status line, and the run's worker.

A run computes a slide's tile features in a napari ``thread_worker`` (:func:`._worker.compute_job`;
**Cancel** sets a ``threading.Event`` the compute code checks). The tile outline is drawn as soon as the grid
is known, and the painted heatmaps fill in as batches arrive (repaints and progress updates are throttled:
each one recomposes the window). Once a map is painted, the bar and the status line count the tiles the map
shows (the same count as the layer names, :meth:`RunSection._live_repaint`). The red label under the bar
says when the slide is unlike the model's training data (:meth:`RunSection.show_assessment`), and so does
the canvas.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout

from ..errors import Cancelled, He2rnaError
from ..maps import progressive, readout
from ._heatmap_layers import HeatmapLayers
from ._state import SessionRegistry, SlideState
from ._worker import Failed, ProgressBridge, compute_job

if TYPE_CHECKING:
    from ..model import ood
    from ..model.bundle import ModelBundle
    from ..slides.tiling import TileGrid

log = logging.getLogger(__name__)

OOD_STYLE = "color: #ff4040; font-weight: bold;"
OOD_OK_STYLE = "color: #a0a0a0;"
#: Least time between two live repaints during a run (ms): batches can come faster than a redraw. Fast
#: until the coarse first pass is painted, then once a second: after the coarse map a pathologist gains
#: little from faster updates, and each repaint redraws the canvas.
LIVE_REPAINT_MS = 150
LIVE_REPAINT_AFTER_FIRST_PASS_MS = 1000
#: Least time between two updates of the dock's progress bar and status line during a run (ms). Any widget
#: update recomposes the whole window with the OpenGL canvas: on software OpenGL (Mesa llvmpipe: remote
#: desktops, virtual displays) one per batch cost the extraction CPU time (benchmarks/README.md).
PROGRESS_UPDATE_MS = 500


class RunSection(QGroupBox):
    """Run / Cancel, progress and status of the Model dock, and the worker of the run in flight.

    Parameters
    ----------
    registry
        The viewer's session registry (a run's end releases its slide's session there).
    layers
        The dock's layers (tile outline, live repaints of the painted heatmaps).
    """

    #: The gene picked before the first tiles arrived can be painted now: ``(name, state)``.
    paint_pending = Signal(str, object)
    #: A run ended with the slide's features ready: ``(state)``.
    ready = Signal(object)

    def __init__(self, registry: SessionRegistry, layers: HeatmapLayers) -> None:
        super().__init__("Run")
        self.registry = registry
        self.layers = layers
        self.worker = None
        self._run_state: SlideState | None = None
        self._progress: tuple[int, int, str] | None = None  # the latest report not shown yet
        self._progress_message = ""  # the latest report's message (the extraction rate)
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.timeout.connect(self._show_progress)
        self._bridge = ProgressBridge(self)  # a child: deleted (and silenced) with the widget
        self._bridge.progressed.connect(self._on_progress)
        self._bridge.grid_ready.connect(self._on_grid_ready)
        self._bridge.batch_done.connect(self._on_batch_done)
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.timeout.connect(self._live_repaint)

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

        run_layout = QVBoxLayout(self)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        run_layout.addLayout(buttons)
        run_layout.addWidget(self.progress_bar)
        run_layout.addWidget(self.status_label)
        run_layout.addWidget(self.ood_label)
        self.cancel_button.clicked.connect(self.cancel)

    def show_assessment(self, assessment: ood.OODAssessment | None) -> None:
        """Red text when the slide is outside the training data, grey when within, hidden without one; the
        canvas's red warning while outside."""
        self.layers.show_training_warning(assessment is not None and assessment.outside)
        if assessment is None:
            self.ood_label.setVisible(False)
            self.ood_label.setText("")
            return
        sentence = assessment.message[:1].upper() + assessment.message[1:]
        if assessment.outside:
            self.ood_label.setText(f"Warning: {sentence}")
            self.ood_label.setStyleSheet(OOD_STYLE)
        else:
            self.ood_label.setText(sentence)
            self.ood_label.setStyleSheet(OOD_OK_STYLE)
        self.ood_label.setVisible(True)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def update_buttons(self) -> None:
        self.run_button.setEnabled(not self.running)
        self.cancel_button.setEnabled(self.running)

    # ------------------------------------------------------------------ run / cancel
    def start(self, state: SlideState, bundle: ModelBundle, device: str):
        """Compute a slide's features (its session has ``bundle``) in a worker; returns the worker."""
        from napari.qt.threading import create_worker

        cancel = threading.Event()
        state.cancel, state.running = cancel, True
        self._run_state = state
        # Empty until the first progress report, not "busy": Qt animates a busy bar about 30 times a second,
        # and on software OpenGL each frame recomposes the window while the slide is being tiled.
        self._set_bar(0, 1)
        self.status_label.setText(f"Tiling {state.layer.name}…")
        # No napari activity-dock progress: this dock has its own bar and Cancel, and the activity
        # indicator is an animated GIF that recomposes the window about 30 times a second, which on
        # software OpenGL took about a third of a core from the extraction (benchmarks/README.md).
        worker = create_worker(
            compute_job,
            state,
            bundle,
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
        self.update_buttons()
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
        self._progress_message = message
        state = self._run_state
        if state is not None and self.layers.active_layer(state) is not None:
            return  # a map is painted: the bar counts what it shows, at each repaint (_live_repaint)
        if total > 0:
            self._set_bar(done, total)
        label = message or "features"
        self.status_label.setText(f"{label}: {done}/{total} tiles")

    def _set_bar(self, done: int, total: int) -> None:
        """The bar at ``done`` of ``total``, its text the percentage the layer names give."""
        total = max(int(total), 1)
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(min(int(done), total))
        self.progress_bar.setFormat(f"{readout.percent_done(min(int(done), total), total)}%")

    def _on_grid_ready(self, grid: TileGrid) -> None:
        state = self._run_state
        if state is None or state.freed or (state.cancel is not None and state.cancel.is_set()):
            return
        self.layers.show_tiles(state, grid)
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
        if name and self.layers.active_layer(state) is None:
            self.paint_pending.emit(name, state)
            return
        # One count for the layer names, the bar and the status line: they say the same share of tiles.
        counts = state.session.n_scored()
        self.layers.refresh_live(state, counts)
        if self.running and counts[1] > 0 and self.layers.active_layer(state) is not None:
            self._set_bar(*counts)
            label = self._progress_message or "features"
            self.status_label.setText(f"{label}: {counts[0]}/{counts[1]} tiles painted")

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
        self.layers.show_tiles(state, grid)
        self._set_bar(1, 1)
        self.status_label.setText(f"{len(grid.table)} tiles ready: pick a gene or a gene set to paint.")
        self.ready.emit(state)  # the dock repaints the slide's maps from every tile
        layer = self.layers.active_layer(state)
        name = state.extra.get("gene")
        if layer is not None and name and not state.freed:
            self.status_label.setText(f"Painted {name} on all {len(grid.table)} tiles.")

    def _on_errored(self, state: SlideState, exc: BaseException) -> None:
        self._live_timer.stop()
        self._progress_timer.stop()
        self._progress = None
        kept = not state.freed and state.session.painted
        if not state.freed and not kept:
            self.layers.remove_tiles_if_not_ready(state)
        self._set_bar(0, 1)
        if isinstance(exc, Cancelled):
            if kept:
                self.layers.refresh_live(state)  # the last batches, then it stays as painted
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
        self.update_buttons()
