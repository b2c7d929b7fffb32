"""The Compare dock's metrics table: one row per metric and subset, one column per compared score.

P-values and tile-level correlations carry a tooltip saying that neighbouring tiles are correlated (the
p-value treats them as independent); other rows carry their note (too few tiles, no positives, ...) as a
tooltip, and every note is also written under the table (:attr:`MetricsTable.notes`, a wrapped label), so the
table needs no note column and fits a narrow dock without scrolling sideways. The table is as tall as its
rows (it never scrolls inside the dock's scroll area) and wraps its text columns to the dock's width.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QSizePolicy, QTableWidget, QTableWidgetItem

from ..validation import metrics

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


def _fmt(metric: str, value: Any) -> str:
    """Table text of one number: p-values in scientific form, counts as integers, NaN as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if metric == "n_tiles":
        return str(int(value))
    if metric.endswith("_p"):
        return f"{float(value):.3g}"
    return f"{float(value):.3f}"


class MetricsTable(QTableWidget):
    """A read-only table of the metrics of one or two scores against the truth, with its notes below.

    Attributes
    ----------
    notes
        A wrapped label with the rows' notes (add it under the table); empty and hidden when there are none.
    """

    def __init__(self) -> None:
        super().__init__(0, 0)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.setWordWrap(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.notes = QLabel("")
        self.notes.setWordWrap(True)
        self.notes.setStyleSheet("color: #a0a0a0;")
        self.notes.setVisible(False)
        self._fit_height()

    def show_results(self, results: dict[str, metrics.TileMetrics | metrics.AnnotationMetrics]) -> None:
        """Fill the table from the metrics of each compared name (empty when there are none)."""
        names = list(results)
        self.clear()
        headers = ["metric", "subset", *names]
        self.setColumnCount(len(headers))
        self.setHorizontalHeaderLabels(headers)
        header = self.horizontalHeader()
        for j in range(len(headers)):
            # the text columns share what the numbers leave, wrapping; the numbers keep their width
            mode = QHeaderView.ResizeMode.Stretch if j < 2 else QHeaderView.ResizeMode.ResizeToContents
            header.setSectionResizeMode(j, mode)
        notes: dict[str, list[str]] = {}
        if not names:
            self.setRowCount(0)
            self._show_notes(notes)
            return
        first = results[names[0]].table()
        others = [results[n].table() for n in names[1:]]
        self.setRowCount(len(first))
        for i, row in first.iterrows():
            metric = row["metric"]
            subset = str(row["subset"])
            if metric == "roc_auc" and math.isfinite(row["threshold"]):
                subset = f"{subset} (>{row['threshold']:.3g}, n={row['n_positive']})"
            cells = [_METRIC_NAMES.get(metric, metric), subset]
            cells += [_fmt(metric, row["value"])] + [_fmt(metric, t.loc[i, "value"]) for t in others]
            row_notes = [str(row["note"])] + [str(t.loc[i, "note"]) for t in others]
            note = "; ".join(dict.fromkeys(n for n in row_notes if n and n != "nan"))
            if metric in ("pearson_r", "spearman_rho") and not note:
                note = "tile-level: neighbouring tiles are correlated"
            if note:
                notes.setdefault(note, []).append(f"{cells[0]} {str(row['subset'])}".strip())
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if metric in ("pearson_p", "spearman_p", "pearson_r", "spearman_rho"):
                    item.setToolTip(_CAVEAT_TIP)
                elif note:
                    item.setToolTip(note)
                if j >= 2:
                    item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                self.setItem(i, j, item)
        self._show_notes(notes)
        self._fit_height()

    def _show_notes(self, notes: dict[str, list[str]]) -> None:
        """The notes under the table: each note once, with the rows it is about."""
        lines = [f"{', '.join(dict.fromkeys(rows))}: {note}" for note, rows in notes.items()]
        self.notes.setText("\n".join(lines))
        self.notes.setVisible(bool(lines))

    def _fit_height(self) -> None:
        """As tall as the header and the rows (wrapped to the current column widths): no inner scrolling."""
        self.resizeRowsToContents()
        height = self.horizontalHeader().height() if self.columnCount() else 0
        height += sum(self.rowHeight(i) for i in range(self.rowCount()))
        self.setFixedHeight(height + 2 * self.frameWidth() + 2)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._fit_height()  # narrower columns wrap into taller rows
