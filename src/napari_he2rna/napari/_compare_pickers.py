"""The Compare dock's pickers of what is compared: the slide ("Slide" box) and its scores ("Scores" box).

The slide combo lists the viewer's slide layers by name. The score pickers list the slide's painted names
first, then the gene sets and the model's genes (any gene of the model can be typed); the second one is
optional (:data:`NO_SCORE`). Top N is the number of best-scored tiles whose median truth is reported; the
threshold adds a ROC-AUC for tiles whose truth exceeds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import Signal
from qtpy.QtGui import QDoubleValidator
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QLineEdit, QSpinBox

from ._state import is_slide_layer

if TYPE_CHECKING:
    import napari

NO_SCORE = "(none)"


class SlideBox(QGroupBox):
    """The slide layer whose heatmaps are compared, picked by name among the viewer's slide layers."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__("Slide")
        self.viewer = napari_viewer
        form = QFormLayout(self)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("The slide whose heatmaps are compared (opened by HE2RNA)")
        form.addRow("slide layer", self.slide_combo)

    def slide_layers(self) -> list:
        return [ly for ly in self.viewer.layers if is_slide_layer(ly)]

    @property
    def slide_layer(self):
        """The slide layer picked in the combo (None when no slide is open)."""
        layers = self.slide_layers()
        name = self.slide_combo.currentText()
        return next((ly for ly in layers if ly.name == name), None)

    def refresh(self) -> bool:
        """Fill the combo from the viewer (keeps the current pick when it is still there); True when the
        pick changed (signals are blocked meanwhile)."""
        current = self.slide_combo.currentText()
        names = [ly.name for ly in self.slide_layers()]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)
        return self.slide_combo.currentText() != current


class ScoresBox(QGroupBox):
    """Score and compare-with pickers, top N tiles and the optional truth threshold."""

    #: A pick or a setting changed (the numbers are out of date).
    changed = Signal()

    def __init__(self) -> None:
        super().__init__("Scores")
        sform = QFormLayout(self)
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
        self.score_a.currentTextChanged.connect(self._changed)
        self.score_b.currentTextChanged.connect(self._changed)
        self.top_n_spin.valueChanged.connect(self._changed)
        self.threshold_edit.textChanged.connect(self._changed)

    def _changed(self, *args) -> None:
        self.changed.emit()

    def fill(self, painted: list[str], others: list[str]) -> None:
        """Offer the painted names first, then the others (keeps a pick that is still offered)."""
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

    def threshold(self) -> list[float]:
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
