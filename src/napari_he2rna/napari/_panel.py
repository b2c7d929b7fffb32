"""The "HE2RNA" dock widget: the plugin's four widgets in one dock, as tabs (Slide, Model, Compare, Export).

One dock instead of four stacked ones: the window fits a 1080-px-high screen with the canvas taking most of
it. The tab bar stays at the top and the current tab scrolls as a whole, in the panel's one scroll area
(the tables and plots inside are as tall as their content: nothing scrolls inside something that scrolls).
The tabs fit the dock's width down to its minimum (:func:`~._dock_fit.compact_widgets`): long texts wrap,
combo boxes elide, form rows put their label above the field. Only wiring: the tabs are the usual widgets
(:class:`~._slide_widget.SlideWidget`, :class:`~._model_widget.ModelWidget`,
:class:`~._compare_widget.CompareWidget`, :class:`~._export_widget.ExportWidget`), sharing the viewer's
session registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QStyle, QTabBar, QVBoxLayout, QWidget

from ._compare_widget import CompareWidget
from ._dock_fit import compact_widgets
from ._export_widget import ExportWidget
from ._model_widget import ModelWidget
from ._slide_widget import SlideWidget

if TYPE_CHECKING:
    import napari

#: Width the panel asks for (px) when there is room: the canvas keeps the rest of a 1920-px screen.
PANEL_WIDTH = 420


class HE2RNAPanel(QWidget):
    """Slide · Model · Compare · Export in tabs of one dock.

    Attributes
    ----------
    tabs
        The tab bar (``tabText``, ``count``, ``setCurrentIndex``).
    scroll
        The one scroll area; its widget holds the four pages, only the current one shown (a hidden page
        takes no room, so the scroll height is the current tab's).
    pages
        The four pages, in tab order.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, model_path: str | Path | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide = SlideWidget(napari_viewer)
        self.model = ModelWidget(napari_viewer, model_path=model_path)
        self.compare = CompareWidget(napari_viewer)
        self.export = ExportWidget(napari_viewer)
        self.tabs = QTabBar()
        self.tabs.setDocumentMode(True)
        self.tabs.setExpanding(False)
        self.tabs.setUsesScrollButtons(False)
        self.pages = [self.slide.native, self.model, self.compare, self.export]
        body = QWidget()
        body_layout = QVBoxLayout(body)
        body_layout.setContentsMargins(0, 0, 0, 0)
        for page, title in zip(self.pages, ("Slide", "Model", "Compare", "Export"), strict=True):
            self.tabs.addTab(title)
            body_layout.addWidget(page)
            page.setVisible(False)
            compact_widgets(page)
        body_layout.addStretch(1)  # a short tab stays at the top, its rows at their natural height
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(body)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.tabs)
        layout.addWidget(self.scroll, 1)
        self._scroll_pos = [0] * len(self.pages)
        self._current = -1
        self.tabs.currentChanged.connect(self._tab_changed)
        self.tabs.setCurrentIndex(1)  # Model: where a session starts once a slide is open
        self._tab_changed(self.tabs.currentIndex())
        # As narrow as the widest page allows (each shrinks a lot: see compact_widgets), plus the scroll bar.
        bar = self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent)
        need = max(page.minimumSizeHint().width() for page in self.pages)
        self.setMinimumWidth(max(need, self.tabs.sizeHint().width()) + bar + 2)

    def sizeHint(self) -> QSize:
        hint = super().sizeHint()
        return QSize(max(self.minimumWidth(), PANEL_WIDTH), hint.height())

    def _tab_changed(self, index: int) -> None:
        if index == self._current or index < 0:
            return
        if self._current >= 0:
            self._scroll_pos[self._current] = self.scroll.verticalScrollBar().value()
            self.pages[self._current].setVisible(False)
        self._current = index
        self.pages[index].setVisible(True)
        self.scroll.verticalScrollBar().setValue(self._scroll_pos[index])

    @property
    def current_page(self) -> QWidget:
        """The page of the current tab."""
        return self.pages[self.tabs.currentIndex()]

    def show_tab(self, title: str) -> None:
        """Bring a tab to the front by its title."""
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i) == title:
                self.tabs.setCurrentIndex(i)
                return
        raise KeyError(title)
