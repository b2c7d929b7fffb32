"""The "HE2RNA" dock widget: the plugin's four widgets in one dock, as tabs (Slide, Model, Compare, Export).

One dock instead of four stacked ones: the window fits a 1080-px-high screen with the canvas taking most of
it. Each tab scrolls when its content is taller than the dock. Only wiring: the tabs are the usual widgets
(:class:`~._slide_widget.SlideWidget`, :class:`~._model_widget.ModelWidget`,
:class:`~._compare_widget.CompareWidget`, :class:`~._export_widget.ExportWidget`), sharing the viewer's
session registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._compare_widget import CompareWidget
from ._export_widget import ExportWidget
from ._model_widget import ModelWidget
from ._slide_widget import SlideWidget

if TYPE_CHECKING:
    import napari

#: Widest the panel asks to be (px): the canvas keeps the rest of a 1920-px screen.
PANEL_WIDTH = 440


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class HE2RNAPanel(QWidget):
    """Slide · Model · Compare · Export in tabs of one dock."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide = SlideWidget(napari_viewer)
        self.model = ModelWidget(napari_viewer, model_path=model_path)
        self.compare = CompareWidget(napari_viewer)
        self.export = ExportWidget(napari_viewer)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        for widget, title in (
            (self.slide.native, "Slide"),
            (self.model, "Model"),
            (self.compare, "Compare"),
            (self.export, "Export"),
        ):
            self.tabs.addTab(_scrolled(widget), title)
        self.tabs.setCurrentIndex(1)  # Model: where a session starts once a slide is open
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        # As wide as the widest tab needs (nothing clipped; the tabs scroll vertically only).
        need = max(
            w.minimumSizeHint().width() for w in (self.slide.native, self.model, self.compare, self.export)
        )
        self.setMinimumWidth(max(360, need + 24))
        self.setMaximumWidth(max(PANEL_WIDTH, need + 24) + 200)

    def show_tab(self, title: str) -> None:
        """Bring a tab to the front by its title."""
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i) == title:
                self.tabs.setCurrentIndex(i)
                return
        raise KeyError(title)
