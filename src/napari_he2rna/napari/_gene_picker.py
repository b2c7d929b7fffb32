"""The Model dock's "Genes" box: the gene / gene-set picker, Paint, Pin, fold spread and user gene sets.

The picker lists each gene with its validation R from the bundle (per cancer type or averaged) and marks
the reliable ones (:mod:`napari_he2rna.maps.readout`); it can sort by R or keep only the marked ones. Enter,
a pick in the drop-down, a pick in the completer popup and **Paint** all ask for one paint
(:attr:`GenePicker.paint_requested`); what to paint and how is the dock's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QStringListModel, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QCompleter,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
)

from ..maps import readout
from ._run_section import OOD_OK_STYLE

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle


class GenePicker(QGroupBox):
    """The gene box (names with their R and mark), Paint / Pin, fold spread, cancer type, R sorting and
    filtering, and the line that adds user gene sets."""

    #: A gene or gene set was picked (Enter, drop-down, completer or Paint): its name, once per user action.
    paint_requested = Signal(str)

    def __init__(self) -> None:
        super().__init__("Genes")
        self._pending_paint: str | None = None
        self._label_to_name: dict[str, str] = {}

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

        gene_layout = QVBoxLayout(self)
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

        self.paint_button.clicked.connect(lambda: self._request_paint(self.gene_combo.currentText()))
        # Enter, a pick in the drop-down and a pick in the completer popup all paint; they can fire together
        # for one user action, so requests are coalesced (see _request_paint).
        self.gene_combo.lineEdit().returnPressed.connect(
            lambda: self._request_paint(self.gene_combo.currentText())
        )
        self.gene_combo.activated.connect(lambda i: self._request_paint(self.gene_combo.itemText(i)))
        self.completer.activated.connect(self._request_paint)

    @property
    def cancer_type(self) -> str | None:
        text = self.type_combo.currentText()
        return text or None

    def show_bundle(self, bundle: ModelBundle) -> None:
        """A model was loaded: its cancer types, and the R options only when it has validation R."""
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

    def show_entries(self, entries: list[tuple[str, str]]) -> None:
        """Offer these ``(label, name)`` entries in the gene box (keeps what is typed)."""
        text = self.gene_combo.currentText()
        self._label_to_name = {label: name for label, name in entries}
        self.gene_model.setStringList([label for label, _ in entries])
        self.gene_combo.setCurrentIndex(-1)
        self.gene_combo.setEditText(text)

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
            self.paint_requested.emit(self._label_to_name.get(label, readout.name_from_label(label)))
