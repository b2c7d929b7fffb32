"""The "Compare" dock widget: check a heatmap against ground truth, with tile-level metrics on the fly.

Pick a slide layer, load a truth file (QuPath cell detections as TSV/CSV/GeoJSON, a segmentation mask image,
or QuPath GeoJSON annotations), align it in µm when it comes from another scan (offset, scale, rotation: the
truth layer moves with it), pick one or two painted genes/sets, and read Pearson R / Spearman ρ, ROC-AUC at
the 75/90/95/99th percentile (and a threshold you type), the median truth in the top-N tiles, or for
annotations the inside-vs-outside AUC and the share of the top-N tiles inside. The ROC curves are drawn below.

When the truth was drawn on a consecutive section (an IHC scanned separately), **Load IHC slide…** shows that
slide over the H&E and **Align automatically** registers it (:func:`napari_he2rna.align.align_slides`, in a
napari ``thread_worker`` with progress and Cancel): the found transform fills the offset / scale / rotation
fields and the affine line, which stay editable to correct it, and the IHC layer and the truth (read in the
IHC's pixels) move with them. A failed alignment (no tissue, similarity too low) is a sentence in the
alignment label; the fields are left as they were.

The comparison itself (truth, filters, alignment, truth per tile, metrics) is a Qt-free
:class:`~napari_he2rna.comparison.Comparison`, the one ``he2rna compare`` drives too; the truth layer is drawn
from it by :mod:`._truth_layers` and the ROC curves by :mod:`._roc_canvas`; this module only wires Qt to
them. The numbers are recomputed a moment after any change (a QTimer debounce) on the GUI thread: a full
recompute takes tens of milliseconds even at 30,000 tiles, so a worker thread would only
add latency. Every error becomes a napari notification; the widget stays usable.

The per-slide :class:`~napari_he2rna.session.SlideSession` (grid and tile scores) comes from the shared
registry of :mod:`napari_he2rna.napari._state` (the Model widget fills it), or from ``session_provider``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QDoubleValidator
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..validation import align
from ..validation import metrics
from ..maps import spatial
from ..validation import truth
from ..validation.comparison import Comparison, layer_affine
from ..errors import Cancelled, DataError, He2rnaError, SlideError
from ..slides.slide import SLIDE_SUFFIXES, open_slide
from ._roc_canvas import RocCanvas
from ._state import META_KEY, get_registry, is_slide_layer, layer_info
from ._truth_layers import place_truth_layer, show_truth_layer, style_truth_layer

if TYPE_CHECKING:
    import napari

    from ..maps.session import SlideSession

ALL_CLASSES = "(all classes)"
OTHER_TILES = "(all other tiles)"
NO_SCORE = "(none)"
AUTO_CHANNEL = "(grey / auto)"
#: QuPath's positive cell detection names its classes "Positive"/"Negative": count the positives by default.
DEFAULT_CELL_CLASS = "Positive"
DEBOUNCE_MS = 150
TRUTH_FILTER = (
    "Ground truth (*.tsv *.csv *.txt *.geojson *.json *.png *.tif *.tiff *.jpg *.jpeg *.bmp);;"
    "QuPath detections (*.tsv *.csv *.txt *.geojson *.json);;"
    "QuPath annotations (*.geojson *.json);;"
    "Masks (*.png *.tif *.tiff *.jpg *.jpeg *.bmp);;All files (*)"
)
_METRIC_NAMES = {
    "n_tiles": "tiles",
    "pearson_r": "Pearson R",
    "pearson_p": "Pearson p",
    "spearman_rho": "Spearman ρ",
    "spearman_p": "Spearman p",
    "roc_auc": "ROC-AUC",
    "median_truth_top_n": "median truth",
    "median_truth_all": "median truth",
    "annotation_auc": "inside-vs-outside AUC",
    "top_n_share_inside": "share inside",
    "share_inside_all": "share inside",
}
_CAVEAT_TIP = (
    "Neighbouring tiles are correlated, so this tile-level p-value (which treats tiles as independent) is "
    "optimistic; read it as a rough guide, not a test. " + metrics.P_VALUE_CAVEAT
)


SLIDE_FILTER = "Slides and images (" + " ".join(f"*{s}" for s in SLIDE_SUFFIXES) + ");;All files (*)"


class _AlignSignals(QObject):
    """Progress of the alignment worker, carried to the GUI thread (a queued connection)."""

    progressed = Signal(int, int, str)


def _align_job(fixed, moving, cancel: threading.Event, signals: _AlignSignals):
    """Run in the worker: the result, or the user-facing error as a value (napari would add a traceback)."""
    try:
        return align.align_slides(
            fixed,
            moving,
            progress=lambda d, t, m="": signals.progressed.emit(int(d), int(t), str(m)),
            cancel=cancel,
        )
    except He2rnaError as exc:
        return exc


def _parse_affine(text: str) -> np.ndarray:
    """Six numbers ``a b tx c d ty`` (commas, semicolons or spaces) as a 3x3 matrix, else DataError."""
    parts = text.replace(";", " ").replace(",", " ").split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 6:
        raise DataError("type the affine as six numbers: a b tx c d ty (µm; slide = [a b; c d] truth + t)")
    return np.array([values[:3], values[3:], [0.0, 0.0, 1.0]])


def _fmt(metric: str, value: Any) -> str:
    """Table text of one number: p-values in scientific form, counts as integers, NaN as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if metric == "n_tiles":
        return str(int(value))
    if metric.endswith("_p"):
        return f"{float(value):.3g}"
    return f"{float(value):.3f}"


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
        # The IHC (truth scan) slide, its layer, the stretch/shear left of the affine, the alignment job.
        self.ihc_slide = None
        self.ihc_layer = None
        self._shape = np.eye(2)
        self.align_result: align.AlignmentResult | None = None
        self.align_worker = None
        self._align_cancel: threading.Event | None = None
        self._align_signals = _AlignSignals()
        self._align_signals.progressed.connect(self._on_align_progress)
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

        slide_box = QGroupBox("Slide")
        form = QFormLayout(slide_box)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The slide whose heatmaps are compared (opened by HE2RNA)")
        form.addRow("slide layer", self.slide_combo)
        layout.addWidget(slide_box)

        truth_box = QGroupBox("Ground truth")
        tform = QFormLayout(truth_box)
        self.load_button = QPushButton("Load truth…")
        self.load_button.setToolTip(
            "QuPath detections (TSV/CSV/GeoJSON with centroids), a segmentation mask (PNG/TIFF) or "
            "QuPath GeoJSON annotations (tumour / non-tumour polygons)"
        )
        self.truth_label = QLabel("No truth loaded.")
        self.truth_label.setWordWrap(True)
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Cells: the class to count. Annotations: the class that is 'inside'.")
        self.negative_combo = QComboBox()
        self.negative_combo.setToolTip(
            "Annotations: the class that is 'outside' (tiles in neither are left out), or every other tile"
        )
        self.channel_combo = QComboBox()
        self.channel_combo.addItems([AUTO_CHANNEL, "red", "green", "blue"])
        self.channel_combo.setToolTip("Colour masks: the channel whose non-zero pixels are positive")
        self.downsample_spin = QDoubleSpinBox()
        self.downsample_spin.setRange(0.0, 1e5)
        self.downsample_spin.setDecimals(3)
        self.downsample_spin.setSpecialValueText("by size")
        self.downsample_spin.setToolTip("Level-0 slide px per mask px; 'by size' stretches it over the slide")
        self.mask_mpp_spin = QDoubleSpinBox()
        self.mask_mpp_spin.setRange(0.0, 1e5)
        self.mask_mpp_spin.setDecimals(4)
        self.mask_mpp_spin.setSpecialValueText("unknown")
        self.mask_mpp_spin.setToolTip("µm per mask pixel (wins over the downsample when given)")
        self.load_ihc_button = QPushButton("Load IHC slide…")
        self.load_ihc_button.setToolTip(
            "The consecutive section the truth was drawn on (IHC), to show over the H&E and align"
        )
        load_row = QHBoxLayout()
        load_row.addWidget(self.load_button)
        load_row.addWidget(self.load_ihc_button)
        tform.addRow(load_row)
        tform.addRow(self.truth_label)
        tform.addRow("class", self.class_combo)
        tform.addRow("outside class", self.negative_combo)
        tform.addRow("mask channel", self.channel_combo)
        tform.addRow("mask downsample", self.downsample_spin)
        tform.addRow("mask µm/px", self.mask_mpp_spin)
        self._truth_form = tform
        layout.addWidget(truth_box)

        align_box = QGroupBox("Alignment (truth → slide, µm)")
        aform = QFormLayout(align_box)
        self.offset_x = self._spin(-1e6, 1e6, 2, " µm", "Shift of the truth along x, µm")
        self.offset_y = self._spin(-1e6, 1e6, 2, " µm", "Shift of the truth along y, µm")
        # enough decimals that a found transform survives the fields (1e-6 of a 100,000 px slide: 0.1 px)
        self.scale_spin = self._spin(0.001, 1000.0, 6, "", "Scale of the truth scan onto the slide")
        self.scale_spin.setValue(1.0)
        self.scale_spin.setSingleStep(0.01)
        self.rotation_spin = self._spin(-180.0, 180.0, 5, "°", "Rotation, anticlockwise on screen")
        self.reset_align = QPushButton("Reset alignment")
        self.affine_edit = QLineEdit()
        self.affine_edit.setToolTip(
            "The whole affine, truth µm -> slide µm, as six numbers a b tx c d ty; edit and press Enter "
            "(offset, scale and rotation follow; what is left is kept as stretch/shear)"
        )
        self.align_button = QPushButton("Align automatically")
        self.align_button.setToolTip(
            "Register the IHC slide onto the H&E (haematoxylin, rotation search, affine, mutual information)"
        )
        self.align_cancel_button = QPushButton("Cancel")
        self.align_cancel_button.setEnabled(False)
        self.align_progress = QProgressBar()
        self.align_progress.setRange(0, 1)
        self.align_progress.setValue(0)
        self.align_label = QLabel("")
        self.align_label.setWordWrap(True)
        aform.addRow("offset x", self.offset_x)
        aform.addRow("offset y", self.offset_y)
        aform.addRow("scale", self.scale_spin)
        aform.addRow("rotation", self.rotation_spin)
        aform.addRow("affine", self.affine_edit)
        align_row = QHBoxLayout()
        align_row.addWidget(self.align_button)
        align_row.addWidget(self.align_cancel_button)
        aform.addRow(align_row)
        aform.addRow(self.align_progress)
        aform.addRow(self.align_label)
        aform.addRow(self.reset_align)
        layout.addWidget(align_box)

        score_box = QGroupBox("Scores")
        sform = QFormLayout(score_box)
        self.score_a = QComboBox()
        self.score_a.setEditable(True)
        self.score_a.setInsertPolicy(QComboBox.NoInsert)
        self.score_a.setToolTip("A painted gene or gene set (type any gene of the model)")
        self.score_b = QComboBox()
        self.score_b.setEditable(True)
        self.score_b.setInsertPolicy(QComboBox.NoInsert)
        self.score_b.setToolTip("Optional second gene/set, compared side by side on the same truth")
        self.top_n_spin = QSpinBox()
        self.top_n_spin.setRange(1, 10_000_000)
        self.top_n_spin.setValue(100)
        self.top_n_spin.setToolTip("Median truth in this many best-scored tiles (paper: 100)")
        self.threshold_edit = QLineEdit()
        self.threshold_edit.setPlaceholderText("e.g. 5 (optional)")
        self.threshold_edit.setValidator(QDoubleValidator())
        self.threshold_edit.setToolTip("Extra ROC-AUC for tiles whose truth exceeds this value")
        sform.addRow("score", self.score_a)
        sform.addRow("compare with", self.score_b)
        sform.addRow("top N tiles", self.top_n_spin)
        sform.addRow("truth threshold", self.threshold_edit)
        layout.addWidget(score_box)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(200)
        layout.addWidget(self.table)

        self.roc = RocCanvas()
        self.figure, self.canvas = self.roc.figure, self.roc.canvas
        layout.addWidget(self.canvas)

        buttons = QHBoxLayout()
        self.export_metrics_button = QPushButton("Export metrics…")
        self.export_tiles_button = QPushButton("Export per-tile table…")
        buttons.addWidget(self.export_metrics_button)
        buttons.addWidget(self.export_tiles_button)
        layout.addLayout(buttons)

        # Wiring: anything that changes the numbers schedules one debounced recompute.
        self.slide_combo.currentIndexChanged.connect(self._slide_changed)
        self.load_button.clicked.connect(self._load_clicked)
        self.class_combo.currentIndexChanged.connect(self._class_changed)
        self.negative_combo.currentIndexChanged.connect(self._truth_changed)
        self.channel_combo.currentIndexChanged.connect(self._channel_changed)
        self.downsample_spin.valueChanged.connect(self._mask_geometry_changed)
        self.mask_mpp_spin.valueChanged.connect(self._mask_geometry_changed)
        for spin in (self.offset_x, self.offset_y, self.scale_spin, self.rotation_spin):
            spin.valueChanged.connect(self._alignment_changed)
        self.reset_align.clicked.connect(self.reset_alignment)
        self.affine_edit.editingFinished.connect(self._affine_edited)
        self.load_ihc_button.clicked.connect(self._load_ihc_clicked)
        self.align_button.clicked.connect(lambda: self.align_automatically())
        self.align_cancel_button.clicked.connect(self.cancel_alignment)
        self.score_a.currentTextChanged.connect(self.schedule)
        self.score_b.currentTextChanged.connect(self.schedule)
        self.top_n_spin.valueChanged.connect(self.schedule)
        self.threshold_edit.textChanged.connect(self.schedule)
        self.export_metrics_button.clicked.connect(lambda: self.export_metrics())
        self.export_tiles_button.clicked.connect(lambda: self.export_tiles())

    @staticmethod
    def _spin(lo: float, hi: float, decimals: int, suffix: str, tip: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(lo, hi)
        spin.setDecimals(decimals)
        spin.setSuffix(suffix)
        spin.setToolTip(tip)
        spin.setKeyboardTracking(False)  # typing "112" must not recompute at "1" and "11"
        return spin

    # ================================================================================================ slides
    def _registry_session(self, layer: Any) -> SlideSession | None:
        state = self.registry.get(layer)
        return None if state is None else state.session

    def slide_layers(self) -> list:
        return [ly for ly in self.viewer.layers if is_slide_layer(ly)]

    @property
    def slide_layer(self):
        """The slide layer picked in the combo (None when no slide is open)."""
        layers = self.slide_layers()
        name = self.slide_combo.currentText()
        return next((ly for ly in layers if ly.name == name), None)

    @property
    def session(self) -> SlideSession | None:
        layer = self.slide_layer
        return None if layer is None else self._provider(layer)

    def refresh_slides(self) -> None:
        """Fill the slide combo from the viewer (keeps the current pick when it is still there)."""
        current = self.slide_combo.currentText()
        names = [ly.name for ly in self.slide_layers()]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)
        if self.slide_combo.currentText() != current:
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
        for combo, first in ((self.score_a, []), (self.score_b, [NO_SCORE])):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(first + painted + others)
            if current and (current in painted or current in others or current == NO_SCORE):
                combo.setCurrentText(current)
            elif combo is self.score_a and painted:
                combo.setCurrentText(painted[0])
            elif combo is self.score_b:
                combo.setCurrentText(NO_SCORE)
            combo.blockSignals(False)
        self.schedule()

    def _layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and layer is self.truth_layer and layer not in self.viewer.layers:
            self.truth_layer = None  # the user closed it; the truth itself stays loaded
        if layer is not None and layer is self.ihc_layer and layer not in self.viewer.layers:
            self.ihc_layer = None  # the IHC slide stays open: Align automatically still works
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
    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load ground truth", "", TRUTH_FILTER)
        if path:
            self.load_truth_file(path)

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
                self._set_rows_visible("mask")
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
        for combo, first in ((self.class_combo, ALL_CLASSES), (self.negative_combo, OTHER_TILES)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([first, *classes])
            if current in classes:
                combo.setCurrentText(current)
            elif combo is self.class_combo and kind == "cells" and DEFAULT_CELL_CLASS in classes:
                combo.setCurrentText(DEFAULT_CELL_CLASS)
            elif combo is self.class_combo and kind == "annotations" and classes:
                combo.setCurrentText(classes[0])
            combo.blockSignals(False)
        self._set_rows_visible(kind)
        self._update_truth_label()

    def _set_rows_visible(self, kind: str | None) -> None:
        """Show only the options that apply to this kind of truth."""
        rows = {
            self.class_combo: kind in ("cells", "annotations"),
            self.negative_combo: kind == "annotations",
            self.channel_combo: kind == "mask",
            self.downsample_spin: kind == "mask",
            self.mask_mpp_spin: kind == "mask",
        }
        for widget, visible in rows.items():
            widget.setVisible(visible)
            label = self._truth_form.labelForField(widget)
            if label is not None:
                label.setVisible(visible)

    def _update_truth_label(self) -> None:
        if self.truth_path is None:
            self.truth_label.setText("No truth loaded.")
            return
        name = self.truth_path.name
        comparison = self._sync()
        if self.truth_kind == "cells":
            n = len(comparison.selected_cells())
            text = f"{name}: {n} cells ({self.class_combo.currentText()})"
        elif self.truth_kind == "annotations":
            text = f"{name}: {len(self._polygons_all or [])} polygons"
        else:
            h, w = comparison.truth.mask.shape
            text = f"{name}: {w}x{h} px mask"
        self.truth_label.setText(text)

    @property
    def truth_path(self) -> Path | None:
        """The loaded truth file (None before any load)."""
        return None if self.comparison is None else Path(self.comparison.truth.source)

    @property
    def truth_kind(self) -> str | None:
        """``"cells"``, ``"mask"``, ``"annotations"`` or None."""
        return None if self.comparison is None else self.comparison.kind

    @property
    def _polygons_all(self) -> list[truth.AnnotationPolygon] | None:
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
        c.thresholds = tuple(self._threshold())
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

    def alignment(self) -> truth.Alignment:
        """The alignment set in the widget (truth scan -> slide, µm)."""
        return truth.Alignment.from_offset_scale(
            (self.offset_x.value(), self.offset_y.value()),
            self.scale_spin.value(),
            self.rotation_spin.value(),
            shape=None if np.allclose(self._shape, np.eye(2)) else self._shape,
        )

    def _place_truth_layer(self) -> None:
        """Put the truth and IHC layers where the alignment says, as a napari affine in (y, x) µm."""
        self._show_affine()
        if self.ihc_layer is not None and self.ihc_layer in self.viewer.layers:
            self.ihc_layer.affine = layer_affine(self.alignment())
        layer = self.truth_layer
        if layer is None or layer not in self.viewer.layers or self.comparison is None:
            return
        place_truth_layer(layer, self._sync())

    def _show_affine(self) -> None:
        a = self.alignment().affine
        text = " ".join(f"{v:.6g}" for v in (a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1], a[1, 2]))
        if self.affine_edit.text() != text:
            self.affine_edit.setText(text)

    def _affine_edited(self) -> None:
        current = self.alignment().affine
        try:
            typed = _parse_affine(self.affine_edit.text())
            if np.allclose(typed, current, rtol=1e-6, atol=1e-6):
                return
            self.set_affine(typed)
        except He2rnaError as exc:
            self._fail(str(exc))
            self._show_affine()

    def set_affine(self, affine_um: Any) -> None:
        """Set the alignment to a full 3x3 affine (truth µm -> slide µm): fields and stretch/shear follow."""
        offset, scale, rotation, shape = truth.Alignment.from_affine(affine_um).to_offset_scale()
        self._shape = np.asarray(shape, dtype=float)
        self.set_alignment(offset, scale, rotation)

    def _alignment_changed(self, *args) -> None:
        try:
            self._place_truth_layer()
        except He2rnaError as exc:
            self._fail(str(exc))
            return
        self._truth_changed()

    def reset_alignment(self) -> None:
        self._shape = np.eye(2)
        for spin, value in ((self.offset_x, 0.0), (self.offset_y, 0.0), (self.scale_spin, 1.0)):
            spin.blockSignals(True)
            spin.setValue(value)
            spin.blockSignals(False)
        self.rotation_spin.setValue(0.0)  # one signal for the lot
        self._alignment_changed()

    def set_alignment(self, offset_um=(0.0, 0.0), scale: float = 1.0, rotation_deg: float = 0.0) -> None:
        """Set the alignment fields (one update of the layer and one recompute)."""
        for spin, value in (
            (self.offset_x, offset_um[0]),
            (self.offset_y, offset_um[1]),
            (self.scale_spin, scale),
            (self.rotation_spin, rotation_deg),
        ):
            spin.blockSignals(True)
            spin.setValue(float(value))
            spin.blockSignals(False)
        self._alignment_changed()

    # ================================================================================================ IHC
    def _load_ihc_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load IHC slide", "", SLIDE_FILTER)
        if path:
            self.load_ihc_slide(path)

    def load_ihc_slide(self, path: str | Path) -> bool:
        """Open the IHC (truth scan) slide and show it over the H&E with the current alignment."""
        from ._reader import slide_layer_data

        try:
            if self.slide_layer is None:
                raise DataError("open the H&E slide first, then its IHC")
            slide = open_slide(path)
        except (SlideError, DataError) as exc:
            return self._fail(str(exc))
        data, kwargs, _ = slide_layer_data(slide, name=f"{slide.path.name} (IHC)")
        fixed_mpp = self.slide_layer.metadata["slide"].mpp or 1.0
        kwargs["metadata"] = {META_KEY: {"kind": "ihc", "name": kwargs["name"]}, "ihc_slide": slide}
        kwargs["scale"] = (fixed_mpp, fixed_mpp)  # IHC px at the H&E's µm/px, as the alignment works
        kwargs["units"] = tuple(self.slide_layer.units)
        if self.ihc_layer is not None and self.ihc_layer in self.viewer.layers:
            self.viewer.layers.remove(self.ihc_layer)
        if self.ihc_slide is not None:
            self.ihc_slide.close()
        self.ihc_slide = slide
        self.ihc_layer = self.viewer.add_image(data, opacity=0.5, **kwargs)
        self.align_label.setText(f"IHC: {slide.path.name}; press Align automatically, or set the fields.")
        self._place_truth_layer()
        if self.truth_path is not None:  # its µm are the IHC's now
            self.load_truth_file(self.truth_path, kind=self.truth_kind)
        return True

    @property
    def aligning(self) -> bool:
        """True while an automatic alignment runs."""
        return self.align_worker is not None

    def align_automatically(self):
        """Register the IHC slide onto the H&E in a worker; returns the worker (None if not started)."""
        from napari.qt.threading import create_worker

        if self.aligning:
            show_info("An alignment is already running; cancel it or wait.")
            return None
        if self.slide_layer is None or self.ihc_slide is None:
            self._fail("load the IHC slide first (Load IHC slide…), over an open H&E slide")
            return None
        cancel = threading.Event()
        self._align_cancel = cancel
        self.align_progress.setRange(0, 0)
        self.align_label.setText("Aligning…")
        worker = create_worker(
            _align_job,
            self.slide_layer.metadata["slide"],
            self.ihc_slide,
            cancel,
            self._align_signals,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(self._on_align_returned)
        worker.errored.connect(self._on_align_errored)
        worker.finished.connect(self._on_align_finished)
        self.destroyed.connect(lambda *_, c=cancel: c.set())
        self.align_worker = worker
        self.align_button.setEnabled(False)
        self.align_cancel_button.setEnabled(True)
        worker.start()
        return worker

    def cancel_alignment(self) -> None:
        """Stop the alignment in flight (the fields stay as they were)."""
        if self._align_cancel is not None:
            self._align_cancel.set()
            self.align_label.setText("Cancelling…")

    def _on_align_progress(self, done: int, total: int, message: str) -> None:
        self.align_progress.setRange(0, max(total, 1))
        self.align_progress.setValue(min(done, total))
        if self.aligning and message:
            self.align_label.setText(f"Aligning: {message}…")

    def _on_align_returned(self, result) -> None:
        if isinstance(result, Cancelled):
            self.align_label.setText("Alignment cancelled; the fields are unchanged.")
            return
        if isinstance(result, He2rnaError):
            self.align_label.setText(f"{result} (the fields are unchanged)")
            return
        self.align_result = result
        mpp = self.slide_layer.metadata["slide"].mpp if self.slide_layer is not None else None
        self.set_affine(truth.Alignment.from_affine_px(result.affine_px, mpp or 1.0).affine)
        self.align_label.setText(f"Aligned: {result.summary()}")

    def _on_align_errored(self, exc: Exception) -> None:  # a bug in the alignment: still one sentence
        self.align_label.setText(f"the alignment failed: {exc.__class__.__name__}: {exc}")

    def _on_align_finished(self) -> None:
        self.align_worker = None
        self._align_cancel = None
        self.align_progress.setRange(0, 1)
        self.align_progress.setValue(1)
        self.align_button.setEnabled(True)
        self.align_cancel_button.setEnabled(False)

    # ================================================================================================ metrics
    def schedule(self, *args) -> None:
        """Recompute a moment later; changes arriving meanwhile are folded into one recompute."""
        self._timer.start()

    def _threshold(self) -> list[float]:
        text = self.threshold_edit.text().strip().replace(",", ".")
        try:
            return [float(text)] if text else []
        except ValueError:
            return []

    def score_names(self) -> list[str]:
        names = [self.score_a.currentText().strip(), self.score_b.currentText().strip()]
        out: list[str] = []
        for n in names:
            if n and n != NO_SCORE and n not in out:
                out.append(n)
        return out

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
        self._fill_table()
        self._draw_roc()

    def _fill_table(self) -> None:
        names = list(self.results)
        table = self.table
        table.clear()
        headers = ["metric", "subset", *names, "note"]
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        if not names:
            table.setRowCount(0)
            return
        first = self.results[names[0]].table()
        others = [self.results[n].table() for n in names[1:]]
        table.setRowCount(len(first))
        for i, row in first.iterrows():
            metric = row["metric"]
            subset = str(row["subset"])
            if metric == "roc_auc" and math.isfinite(row["threshold"]):
                subset = f"{subset} (>{row['threshold']:.3g}, n={row['n_positive']})"
            cells = [_METRIC_NAMES.get(metric, metric), subset]
            cells += [_fmt(metric, row["value"])] + [_fmt(metric, t.loc[i, "value"]) for t in others]
            notes = [str(row["note"])] + [str(t.loc[i, "note"]) for t in others]
            note = "; ".join(dict.fromkeys(n for n in notes if n and n != "nan"))
            if metric in ("pearson_r", "spearman_rho") and not note:
                note = "tile-level: neighbouring tiles are correlated"
            cells.append(note)
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if metric in ("pearson_p", "spearman_p", "pearson_r", "spearman_rho"):
                    item.setToolTip(_CAVEAT_TIP)
                elif note:
                    item.setToolTip(note)
                if 2 <= j < 2 + len(names):
                    item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                table.setItem(i, j, item)

    def _draw_roc(self) -> None:
        self.roc.draw(self.results)

    # ================================================================================================ export
    def _save_path(self, path: str | Path | None, title: str, default: str) -> tuple[Path | None, bool]:
        """(path, overwrite): a dialog when ``path`` is None (Qt asks before replacing a file)."""
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(self, title, default, "CSV (*.csv);;All files (*)")
            return (Path(chosen), True) if chosen else (None, False)
        path = Path(path)
        if path.exists():
            answer = QMessageBox.question(
                self, title, f"{path.name} already exists. Replace it?", QMessageBox.Yes | QMessageBox.No
            )
            return (path, True) if answer == QMessageBox.Yes else (None, False)
        return path, False

    def _write(self, df: pd.DataFrame, path: Path, overwrite: bool) -> Path | None:
        try:
            out = spatial.atomic_write(path, lambda tmp: df.to_csv(tmp, index=False), overwrite=overwrite)
        except He2rnaError as exc:
            show_error(str(exc))
            return None
        show_info(f"Wrote {out}.")
        return out

    def _default_name(self, suffix: str) -> str:
        layer = self.slide_layer
        stem = Path(layer.metadata.get("slide_path", layer.name)).stem if layer is not None else "slide"
        return f"{stem}_{suffix}.csv"

    def export_metrics(self, path: str | Path | None = None) -> Path | None:
        """Write the metrics table (score, truth, metric, subset, value, threshold, n_positive, note)."""
        if not self.results and not self.recompute():
            show_error("There are no metrics to export yet: load a truth file and pick a gene or set.")
            return None
        path, overwrite = self._save_path(path, "Export metrics", self._default_name("metrics"))
        return None if path is None else self._write(self.metrics, path, overwrite)

    def per_tile_table(self) -> pd.DataFrame:
        """Tile id and position, the score of each picked name and the truth per tile."""
        return self.comparison.per_tile_table()

    def export_tiles(self, path: str | Path | None = None) -> Path | None:
        """Write the per-tile table (tile id, row, col, x, y, scores, truth)."""
        if not self.results and not self.recompute():
            show_error("There is no per-tile table to export yet: load a truth file and pick a gene or set.")
            return None
        path, overwrite = self._save_path(path, "Export per-tile table", self._default_name("compare_tiles"))
        return None if path is None else self._write(self.per_tile_table(), path, overwrite)
