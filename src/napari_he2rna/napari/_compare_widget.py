"""The "Compare" dock widget: check a heatmap against ground truth, with tile-level metrics on the fly.

Pick a slide layer, load a truth file (QuPath cell detections as TSV/CSV/GeoJSON, a segmentation mask image,
or QuPath GeoJSON annotations), align it in µm when it comes from another scan (offset, scale, rotation: the
truth layer moves with it), pick one or two painted genes/sets, and read Pearson R / Spearman ρ, ROC-AUC at
the 75/90/95/99th percentile (and a threshold you type), the median truth in the top-N tiles, or for
annotations the inside-vs-outside AUC and the share of the top-N tiles inside. The ROC curves are drawn below.

When the truth was drawn on a consecutive section (an IHC scanned separately), **Load IHC slide…** shows that
slide over the H&E and **Align automatically** registers it
(:func:`napari_he2rna.validation.align.align_slides`, in a napari ``thread_worker`` with progress and Cancel):
the found transform fills the offset / scale / rotation fields and the affine line, which stay editable to
correct it, and the IHC layer and the truth (read in the IHC's pixels) move with them. A failed alignment
(no tissue, similarity too low) is a sentence in the alignment label; the fields are left as they were.

The comparison itself (truth, filters, alignment, truth per tile, metrics) is a Qt-free
:class:`~napari_he2rna.validation.comparison.Comparison`, the one ``he2rna compare`` drives too; the truth
layer is drawn from it by :mod:`._truth_layers` and the ROC curves by :mod:`._roc_canvas`; this module only
wires Qt to them. The numbers are recomputed a moment after any change (a QTimer debounce) on the GUI
thread: a full recompute takes tens of milliseconds even at 30,000 tiles, so a worker thread would only add
latency. Every error becomes a napari notification; the widget stays usable.

The per-slide :class:`~napari_he2rna.maps.session.SlideSession` (grid and tile scores) comes from the shared
registry of :mod:`napari_he2rna.napari._state` (the Model widget fills it), or from ``session_provider``.

The dock stacks its boxes: the slide (:mod:`._compare_pickers`), the truth (:class:`._truth_box.TruthBox`),
the scores, then the status line, the :class:`._metrics_table.MetricsTable` (its notes under it) and the ROC
plot, the export buttons, and last the alignment and IHC slide (:class:`._alignment_box.AlignmentBox`). The
truth layer comes in small and semi-transparent, and the layer that was active (the heatmap) stays active,
so hovering it still shows the tile's scores, now with its truth value. The boxes' widgets are reachable from
the dock under their old names (``widget.class_combo``, ``widget.offset_x``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..errors import DataError, He2rnaError
from ..validation import align, metrics, truth
from ..validation.annotations import AnnotationPolygon
from ..validation.comparison import Comparison
from ..validation.transform import Alignment
from ._alignment_box import AlignmentBox
from ._compare_pickers import NO_SCORE, ScoresBox, SlideBox
from ._csv_save import ask_csv_path, write_csv
from ._metrics_table import MetricsTable
from ._roc_canvas import RocCanvas
from ._state import META_KEY, get_registry, layer_info
from ._truth_box import ALL_CLASSES, AUTO_CHANNEL, OTHER_TILES, TruthBox
from ._truth_layers import place_truth_layer, show_truth_layer, style_truth_layer

if TYPE_CHECKING:
    import napari

    from ..maps.session import SlideSession

#: ``ALL_CLASSES`` (the truth box's) and ``NO_SCORE`` (the score pickers') stay importable from here.
__all__ = ["ALL_CLASSES", "NO_SCORE", "CompareWidget"]

DEBOUNCE_MS = 150


class CompareWidget(QWidget):
    """Load ground truth for a slide, align it, and compare one or two tile-score maps with it.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    session_provider
        ``layer -> SlideSession | None``: where the slide's grid and tile scores come from. Default: the
        session the Model widget keeps for that slide layer in the viewer's shared registry.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        session_provider: Callable[[Any], SlideSession | None] | None = None,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = get_registry(napari_viewer)
        self._provider = session_provider or self._registry_session
        # Truth state: the loaded truth, its filters, alignment, cached truth per tile and metrics live in
        # the comparison (None before a load); the widget's fields are copied into it by _sync.
        self.comparison: Comparison | None = None
        self.truth_layer = None
        self._last_error = ""
        self._loading = False
        self._pending_mask: Path | None = None  # a mask that failed to load for want of a channel
        # Results of the last recompute, for the exports and the tests.
        self.truth_values: np.ndarray | None = None
        self.results: dict[str, metrics.TileMetrics | metrics.AnnotationMetrics] = {}
        self.score_values: dict[str, np.ndarray] = {}
        self.metrics: pd.DataFrame = metrics.metrics_table({})

        self._build_ui()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.recompute)

        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self.registry.changed.connect(self._registry_changed)
        self.refresh_slides()
        self._update_truth_options()

    # ================================================================================================ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        self.slide_box = SlideBox(self.viewer)
        self.truth_box = TruthBox()
        self.align_box = AlignmentBox(self.viewer, lambda: self.slide_layer)
        self.scores_box = ScoresBox()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.table = MetricsTable()
        self.roc = RocCanvas()
        self.figure, self.canvas = self.roc.figure, self.roc.canvas
        self.export_metrics_button = QPushButton("Export metrics…")
        self.export_tiles_button = QPushButton("Export per-tile table…")

        # What is compared, then the numbers and the ROC together (the whole tab scrolls, nothing inside
        # it does), then the alignment, which a truth drawn on the same scan does not need.
        for box in (self.slide_box, self.truth_box, self.scores_box):
            layout.addWidget(box)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        layout.addWidget(self.table.notes)
        layout.addWidget(self.canvas)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_metrics_button)
        buttons.addWidget(self.export_tiles_button)
        layout.addLayout(buttons)
        layout.addWidget(self.align_box)
        layout.addStretch(1)

        # The boxes' widgets under the dock's names, as before the split (tests, scripts).
        self.slide_combo = self.slide_box.slide_combo
        self.load_button = self.truth_box.load_button
        self.load_ihc_button = self.truth_box.load_ihc_button
        self.truth_label = self.truth_box.truth_label
        self.class_combo = self.truth_box.class_combo
        self.negative_combo = self.truth_box.negative_combo
        self.channel_combo = self.truth_box.channel_combo
        self.downsample_spin = self.truth_box.downsample_spin
        self.mask_mpp_spin = self.truth_box.mask_mpp_spin
        self.offset_x = self.align_box.offset_x
        self.offset_y = self.align_box.offset_y
        self.scale_spin = self.align_box.scale_spin
        self.rotation_spin = self.align_box.rotation_spin
        self.reset_align = self.align_box.reset_align
        self.affine_edit = self.align_box.affine_edit
        self.align_button = self.align_box.align_button
        self.align_cancel_button = self.align_box.align_cancel_button
        self.align_progress = self.align_box.align_progress
        self.align_label = self.align_box.align_label
        self.score_a = self.scores_box.score_a
        self.score_b = self.scores_box.score_b
        self.top_n_spin = self.scores_box.top_n_spin
        self.threshold_edit = self.scores_box.threshold_edit

        # Wiring: anything that changes the numbers schedules one debounced recompute.
        self.slide_combo.currentIndexChanged.connect(self._slide_changed)
        self.truth_box.file_chosen.connect(self.load_truth_file)
        self.truth_box.ihc_chosen.connect(self.load_ihc_slide)
        self.class_combo.currentIndexChanged.connect(self._class_changed)
        self.negative_combo.currentIndexChanged.connect(self._truth_changed)
        self.channel_combo.currentIndexChanged.connect(self._channel_changed)
        self.downsample_spin.valueChanged.connect(self._mask_geometry_changed)
        self.mask_mpp_spin.valueChanged.connect(self._mask_geometry_changed)
        self.align_box.changed.connect(self._alignment_changed)
        self.align_box.failed.connect(self._fail)
        self.scores_box.changed.connect(self.schedule)
        self.export_metrics_button.clicked.connect(lambda: self.export_metrics())
        self.export_tiles_button.clicked.connect(lambda: self.export_tiles())

    # ================================================================================================ slides
    def _registry_session(self, layer: Any) -> SlideSession | None:
        state = self.registry.get(layer)
        return None if state is None else state.session

    def slide_layers(self) -> list:
        return self.slide_box.slide_layers()

    @property
    def slide_layer(self):
        """The slide layer picked in the combo (None when no slide is open)."""
        return self.slide_box.slide_layer

    @property
    def session(self) -> SlideSession | None:
        layer = self.slide_layer
        return None if layer is None else self._provider(layer)

    def refresh_slides(self) -> None:
        """Fill the slide combo from the viewer (keeps the current pick when it is still there)."""
        if self.slide_box.refresh():
            self._slide_changed()
        else:
            self.refresh_scores()

    def refresh_scores(self) -> None:
        """Fill the score pickers: painted names first, then the gene sets and the model's genes."""
        session = self.session
        painted: list[str] = []
        others: list[str] = []
        if session is not None:
            painted = list(session.cached_names())
            state = self.registry.get(self.slide_layer)
            if state is not None:
                for ly in self.registry.layers_of(state, "heatmap"):
                    name = (layer_info(ly) or {}).get("name")
                    if name and name not in painted:
                        painted.append(name)
            if session.bundle is not None:
                try:
                    others = [c for c in session.choices() if c not in painted]
                except He2rnaError:
                    others = []
        self.scores_box.fill(painted, others)
        self.schedule()

    def _layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and layer is self.truth_layer and layer not in self.viewer.layers:
            self.truth_layer = None  # the user closed it; the truth itself stays loaded
        self.align_box.layer_removed(layer)
        try:
            self.refresh_slides()
        except RuntimeError:  # the dock was closed (Qt object deleted) while the viewer lives on
            self._disconnect()

    def _registry_changed(self, *args) -> None:
        try:
            self.refresh_scores()
        except RuntimeError:
            self._disconnect()

    def _disconnect(self) -> None:
        for emitter, slot in (
            (self.viewer.layers.events.inserted, self._layers_changed),
            (self.viewer.layers.events.removed, self._layers_changed),
            (self.registry.changed, self._registry_changed),
        ):
            try:
                emitter.disconnect(slot)
            except (RuntimeError, ValueError, TypeError):
                pass

    def _slide_changed(self, *args) -> None:
        if self.truth_path is not None and self.slide_layer is not None:
            # The truth was placed through the previous slide's µm/px: read it again for this one.
            self.load_truth_file(self.truth_path, kind=self.truth_kind)
        self.refresh_scores()

    # ================================================================================================ truth
    def _slide_mpp(self) -> tuple[Any, float]:
        layer = self.slide_layer
        if layer is None:
            raise DataError("open a slide first (File > Open, or the Slide widget), then load its truth")
        slide = layer.metadata["slide"]
        if slide.mpp is None:
            raise DataError(
                f"{slide.path.name} does not say its pixel size: give its µm/px in the Slide widget first"
            )
        return slide, float(slide.mpp)

    def load_truth_file(self, path: str | Path, kind: str | None = None) -> bool:
        """Read a truth file for the current slide and show it; False (and a notification) on failure.

        ``kind`` is ``"cells"``, ``"mask"`` or ``"annotations"``; guessed from the file when None. A failed
        load leaves the previous truth in place.
        """
        path = Path(path)
        try:
            slide, mpp = self._slide_mpp()
            channel = self.channel_combo.currentText()  # ignored by grey masks and by other kinds
            channel = None if channel == AUTO_CHANNEL else channel
            # a truth drawn on the IHC gives µm of the IHC: read it in the IHC's pixels
            scan_mpp = self.ihc_slide.mpp if self.ihc_slide is not None and self.ihc_slide.mpp else mpp
            comparison = Comparison(tuple(int(v) for v in slide.dimensions), mpp, scan_mpp=scan_mpp)
            comparison.load(path, kind=kind, channel=channel)
        except He2rnaError as exc:
            if path.suffix.lower() in truth.MASK_SUFFIXES and kind in (None, "mask"):
                # e.g. a colour mask: let the user pick the channel, which loads it again
                self._pending_mask = path
                self.truth_box.set_rows_visible("mask")
            return self._fail(str(exc))
        except Exception as exc:  # a reader we do not know raised: still a sentence, not a traceback
            return self._fail(f"cannot read {path.name}: {exc.__class__.__name__}: {exc}")
        self._loading = True
        try:
            self._pending_mask = None
            self.comparison = comparison
            self._update_truth_options()
            self._show_truth_layer()
        finally:
            self._loading = False
        self._last_error = ""
        self.schedule()
        return True

    def _fail(self, message: str) -> bool:
        show_error(message)
        self.status.setText(message)
        self._last_error = message
        return False

    def _update_truth_options(self) -> None:
        """Fill the class combos from the file and show only the options of this kind of truth."""
        kind = self.truth_kind
        classes = self.comparison.class_names() if self.comparison is not None else []
        self.truth_box.fill_classes(kind, classes)
        self.truth_box.set_rows_visible(kind)
        self._update_truth_label()

    def _update_truth_label(self) -> None:
        self.truth_box.show_loaded(self._sync())

    @property
    def truth_path(self) -> Path | None:
        """The loaded truth file (None before any load)."""
        return None if self.comparison is None else Path(self.comparison.truth.source)

    @property
    def truth_kind(self) -> str | None:
        """``"cells"``, ``"mask"``, ``"annotations"`` or None."""
        return None if self.comparison is None else self.comparison.kind

    @property
    def _polygons_all(self) -> list[AnnotationPolygon] | None:
        return None if self.comparison is None else self.comparison.truth.polygons

    def _sync(self) -> Comparison | None:
        """Copy the widget's fields (classes, mask scale, alignment, grid, metric settings) into the
        comparison and return it (None before any truth is loaded)."""
        c = self.comparison
        if c is None:
            return None
        cls, outside = self.class_combo.currentText(), self.negative_combo.currentText()
        c.classes = None if cls in ("", ALL_CLASSES) else (cls,)
        c.negative_classes = None if outside in ("", OTHER_TILES) or c.kind != "annotations" else (outside,)
        c.mask_downsample = self.downsample_spin.value() or None
        c.mask_mpp = self.mask_mpp_spin.value() or None
        c.alignment = self.alignment()
        session = self.session
        c.grid = None if session is None else session.grid
        c.thresholds = tuple(self.scores_box.threshold())
        c.top_n = self.top_n_spin.value()
        return c

    def ground_truth(self) -> truth.GroundTruth | None:
        """The loaded truth, unfiltered (None before any load); the filters are the comparison's."""
        return None if self.comparison is None else self.comparison.truth

    def _class_changed(self, *args) -> None:
        if self.truth_kind == "cells":
            self._update_truth_label()
            self._show_truth_layer()
        elif self.truth_kind == "annotations":
            self._style_shapes()
        self._truth_changed()

    def _channel_changed(self, *args) -> None:
        if self._loading:
            return
        if self._pending_mask is not None:
            self.load_truth_file(self._pending_mask, kind="mask")
        elif self.truth_kind == "mask" and self.truth_path is not None:
            self.load_truth_file(self.truth_path, kind="mask")

    def _mask_geometry_changed(self, *args) -> None:
        if self.truth_kind == "mask":
            self._place_truth_layer()
        self._truth_changed()

    def _truth_changed(self, *args) -> None:
        self.schedule()  # the comparison's cache follows the fields it is given

    # ================================================================================================ layers
    def _show_truth_layer(self) -> None:
        """(Re)draw the truth layer: Points (cells), Shapes (annotations) or Image (mask), in µm."""
        comparison = self._sync()
        slide_layer = self.slide_layer
        name = f"{self.truth_path.stem} truth"
        # same units as the slide layer (µm), else napari stops using units for all layers
        units = dict(units=tuple(slide_layer.units)) if slide_layer is not None else {}
        meta = {
            META_KEY: {"kind": "truth", "session_key": id(slide_layer), "name": name},
            "source": self.truth_path,
        }
        self.truth_layer = show_truth_layer(
            self.viewer, comparison, self.truth_layer, name=name, metadata=meta, **units
        )
        self._place_truth_layer()  # and the IHC layer, and the affine line

    def _style_shapes(self) -> None:
        if self.comparison is not None:
            style_truth_layer(self.truth_layer, self._sync())

    def _place_truth_layer(self) -> None:
        """Put the truth and IHC layers where the alignment says, as a napari affine in (y, x) µm."""
        self.align_box.place_ihc_layer()
        layer = self.truth_layer
        if layer is None or layer not in self.viewer.layers or self.comparison is None:
            return
        place_truth_layer(layer, self._sync())

    def _alignment_changed(self, *args) -> None:
        try:
            self._place_truth_layer()
        except He2rnaError as exc:
            self._fail(str(exc))
            return
        self._truth_changed()

    def alignment(self) -> Alignment:
        """The alignment set in the widget (truth scan -> slide, µm)."""
        return self.align_box.alignment()

    def set_affine(self, affine_um: Any) -> None:
        """Set the alignment to a full 3x3 affine (truth µm -> slide µm): fields and stretch/shear follow."""
        self.align_box.set_affine(affine_um)

    def reset_alignment(self) -> None:
        self.align_box.reset_alignment()

    def set_alignment(self, offset_um=(0.0, 0.0), scale: float = 1.0, rotation_deg: float = 0.0) -> None:
        """Set the alignment fields (one update of the layer and one recompute)."""
        self.align_box.set_alignment(offset_um, scale, rotation_deg)

    # ================================================================================================ IHC
    def load_ihc_slide(self, path: str | Path) -> bool:
        """Open the IHC (truth scan) slide and show it over the H&E with the current alignment."""
        if not self.align_box.load_ihc_slide(path):
            return False
        self._place_truth_layer()
        if self.truth_path is not None:  # its µm are the IHC's now
            self.load_truth_file(self.truth_path, kind=self.truth_kind)
        return True

    @property
    def ihc_slide(self):
        """The IHC (truth scan) slide, or None."""
        return self.align_box.ihc_slide

    @property
    def ihc_layer(self):
        """The IHC slide's layer, or None (also after the user closed it)."""
        return self.align_box.ihc_layer

    @property
    def align_result(self) -> align.AlignmentResult | None:
        """The last automatic alignment's result."""
        return self.align_box.align_result

    @property
    def aligning(self) -> bool:
        """True while an automatic alignment runs."""
        return self.align_box.aligning

    @property
    def align_worker(self):
        """The napari worker of the automatic alignment in flight (None when idle)."""
        return self.align_box.align_worker

    def align_automatically(self):
        """Register the IHC slide onto the H&E in a worker; returns the worker (None if not started)."""
        return self.align_box.align_automatically()

    def cancel_alignment(self) -> None:
        """Stop the alignment in flight (the fields stay as they were)."""
        self.align_box.cancel_alignment()

    # ================================================================================================ metrics
    def schedule(self, *args) -> None:
        """Recompute a moment later; changes arriving meanwhile are folded into one recompute."""
        self._timer.start()

    def score_names(self) -> list[str]:
        return self.scores_box.score_names()

    def truth_per_tile(self) -> np.ndarray:
        """(N,) truth per tile of the slide's grid under the current class and alignment (cached)."""
        return self._sync().truth_per_tile()

    def recompute(self) -> bool:
        """Bin the truth, score the picked names and refresh the table and the ROC plot now.

        Returns True when metrics were computed; otherwise the status line says what is missing and an
        error (a bad file, a gene the model lacks, truth off the slide) is shown once as a notification.
        """
        self._timer.stop()
        self.results, self.score_values, self.truth_values = {}, {}, None
        self.metrics = metrics.metrics_table({})
        session = self.session
        message = ""
        if self.slide_layer is None:
            message = "Open a slide first."
        elif session is None or session.grid is None or session.features is None:
            message = "Run the model on this slide first (Model widget), then pick a gene or set here."
        elif self.truth_kind is None:
            message = "Load a truth file (QuPath detections, a mask or annotations)."
        elif not self.score_names():
            message = "Pick a gene or gene set to compare."
        if message:
            self.status.setText(message)
            self._render()
            return False
        try:
            comparison = self._sync()
            comparison.truth_per_tile()  # a truth problem is reported before a gene problem
            scores = {session.canonical(n): session.scores(n) for n in self.score_names()}
            self.results = comparison.compute(scores)
            self.score_values = comparison.scores
            values = self.truth_values = comparison.truth_values
            state = self.registry.get(self.slide_layer)
            if state is not None:  # the Model dock's hover readout shows it
                state.extra["truth"] = (self.truth_kind, comparison.truth_label, values)
        except He2rnaError as exc:
            self._report(str(exc))
            self._render()
            return False
        except Exception as exc:  # never a traceback into napari; say what failed
            self._report(f"the metrics could not be computed: {exc.__class__.__name__}: {exc}")
            self._render()
            return False
        self._last_error = ""
        self.metrics = comparison.metrics_table()
        n = len(values)
        units = session.units(self.score_names()[0])
        self.status.setText(f"{n} tiles; truth: {comparison.truth_label}; scores in {units}.")
        self._render()
        return True

    def _report(self, message: str) -> None:
        self.status.setText(message)
        if message != self._last_error:  # one notification per problem, not one per keystroke
            show_error(message)
        self._last_error = message

    # ================================================================================================ display
    def _render(self) -> None:
        self.table.show_results(self.results)
        self.roc.draw(self.results)

    # ================================================================================================ export
    def _default_name(self, suffix: str) -> str:
        layer = self.slide_layer
        stem = Path(layer.metadata.get("slide_path", layer.name)).stem if layer is not None else "slide"
        return f"{stem}_{suffix}.csv"

    def export_metrics(self, path: str | Path | None = None) -> Path | None:
        """Write the metrics table (score, truth, metric, subset, value, threshold, n_positive, note)."""
        if not self.results and not self.recompute():
            show_error("There are no metrics to export yet: load a truth file and pick a gene or set.")
            return None
        path, overwrite = ask_csv_path(self, path, "Export metrics", self._default_name("metrics"))
        return None if path is None else write_csv(self.metrics, path, overwrite)

    def per_tile_table(self) -> pd.DataFrame:
        """Tile id and position, the score of each picked name and the truth per tile."""
        return self.comparison.per_tile_table()

    def export_tiles(self, path: str | Path | None = None) -> Path | None:
        """Write the per-tile table (tile id, row, col, x, y, scores, truth)."""
        if not self.results and not self.recompute():
            show_error("There is no per-tile table to export yet: load a truth file and pick a gene or set.")
            return None
        path, overwrite = ask_csv_path(
            self, path, "Export per-tile table", self._default_name("compare_tiles")
        )
        return None if path is None else write_csv(self.per_tile_table(), path, overwrite)
