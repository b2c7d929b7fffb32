"""The Compare dock's "Ground truth" box: Load truth… / Load IHC slide…, and the options of the truth's kind.

Cells count one class (QuPath's "Positive" by default); annotations compare an inside class with an outside
one (or every other tile); a mask gives the channel whose non-zero pixels are positive and its scale on the
slide. Only the options of the loaded kind are shown. Reading the file is the dock's
(:meth:`CompareWidget.load_truth_file`); this box says what was picked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
)

from ..slides.slide import SLIDE_SUFFIXES

if TYPE_CHECKING:
    from ..validation.comparison import Comparison

ALL_CLASSES = "(all classes)"
OTHER_TILES = "(all other tiles)"
AUTO_CHANNEL = "(grey / auto)"
#: QuPath's positive cell detection names its classes "Positive"/"Negative": count the positives by default.
DEFAULT_CELL_CLASS = "Positive"
TRUTH_FILTER = (
    "Ground truth (*.tsv *.csv *.txt *.geojson *.json *.png *.tif *.tiff *.jpg *.jpeg *.bmp);;"
    "QuPath detections (*.tsv *.csv *.txt *.geojson *.json);;"
    "QuPath annotations (*.geojson *.json);;"
    "Masks (*.png *.tif *.tiff *.jpg *.jpeg *.bmp);;All files (*)"
)
SLIDE_FILTER = "Slides and images (" + " ".join(f"*{s}" for s in SLIDE_SUFFIXES) + ");;All files (*)"


class TruthBox(QGroupBox):
    """The truth file and IHC slide buttons, what was loaded, classes, mask channel and mask scale."""

    #: A truth file was picked in the Load truth… dialog: its path.
    file_chosen = Signal(str)
    #: An IHC slide was picked in the Load IHC slide… dialog: its path.
    ihc_chosen = Signal(str)

    def __init__(self) -> None:
        super().__init__("Ground truth")
        tform = QFormLayout(self)
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
        self.load_button.clicked.connect(self._load_clicked)
        self.load_ihc_button.clicked.connect(self._load_ihc_clicked)

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load ground truth", "", TRUTH_FILTER)
        if path:
            self.file_chosen.emit(path)

    def _load_ihc_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load IHC slide", "", SLIDE_FILTER)
        if path:
            self.ihc_chosen.emit(path)

    def fill_classes(self, kind: str | None, classes: list[str]) -> None:
        """Offer the truth's classes (keeps a pick that is still there; else a default for the kind)."""
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

    def set_rows_visible(self, kind: str | None) -> None:
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

    def show_loaded(self, comparison: Comparison | None) -> None:
        """Say what truth is loaded: its file, and its cells (of the class picked), polygons or mask size."""
        if comparison is None:
            self.truth_label.setText("No truth loaded.")
            return
        name = Path(comparison.truth.source).name
        if comparison.kind == "cells":
            n = len(comparison.selected_cells())
            text = f"{name}: {n} cells ({self.class_combo.currentText()})"
        elif comparison.kind == "annotations":
            text = f"{name}: {len(comparison.truth.polygons or [])} polygons"
        else:
            h, w = comparison.truth.mask.shape
            text = f"{name}: {w}x{h} px mask"
        self.truth_label.setText(text)
