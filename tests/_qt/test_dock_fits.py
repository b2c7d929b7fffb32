"""The HE2RNA dock fits napari's window, and Compare shows the truth without hiding the heatmap.

The viewer ``he2rna view`` builds (:func:`open_viewer`: the panel docked through the plugin manifest, as
napari docks it) on the sample slide, under Xvfb. "Fits" is checked at napari's first-launch window size
(1089 x 630) with the dock at its narrowest: every visible widget of every tab is within the dock's width
and at least as wide as its minimum size hint, wrapped texts have the height their lines need, the panel
scrolls as a whole in its one scroll area and nothing inside it scrolls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QAbstractScrollArea, QDockWidget, QLabel, QScrollArea, QWidget

from napari_he2rna.napari._panel import PANEL_WIDTH
from napari_he2rna.napari.viewer import fit_window, open_viewer

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
SLIDE = SAMPLE / "sample_slide.tiff"
FIRST_LAUNCH = (1089, 630)  # napari's window on a first launch: its layout's size hint
TIMEOUT_MS = 240_000
GENE = "CD3E"


@pytest.fixture
def view(make_napari_viewer, qtbot):
    """(viewer, panel, dock) of ``he2rna view sample_slide.tiff`` with no saved window geometry (napari's
    test viewer starts from its default settings and saves none on close)."""
    viewer = open_viewer(str(SLIDE), viewer=make_napari_viewer(show=True))
    panel = next(iter(dict(viewer.window.dock_widgets).values()))
    dock = panel.parentWidget()
    while not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    qtbot.waitExposed(panel.window())
    return viewer, panel, dock


def _narrowest(qtbot, panel, dock) -> None:
    """napari's first-launch window, the dock as narrow as it goes."""
    window = panel.window()
    window.resize(*FIRST_LAUNCH)
    window.resizeDocks([dock], [1], Qt.Orientation.Horizontal)
    qtbot.wait(300)


def _name(w: QWidget) -> str:
    text = w.text() if hasattr(w, "text") and callable(w.text) else ""
    return f"{type(w).__name__} {str(text)[:40]!r}"


def _clipped(panel) -> list[str]:
    """What does not fit on the current tab: widgets cut at the dock's right edge or squeezed below their
    minimum, wrapped texts with fewer lines than they need, scroll areas inside the panel's that scroll."""
    [area] = [a for a in panel.findChildren(QScrollArea) if a.isVisible()]
    viewport = area.viewport()
    width = viewport.width()
    out = []
    for w in area.widget().findChildren(QWidget):
        if not w.isVisibleTo(area) or w.isWindow() or isinstance(w.parentWidget(), QAbstractScrollArea):
            continue  # hidden, a popup, or a scroll area's own scroll bars and viewport
        hint = w.minimumSizeHint()
        right = w.mapTo(viewport, QPoint(w.width(), 0)).x()
        if hint.width() > width:
            out.append(f"{_name(w)} needs {hint.width()} px, the dock has {width}")
        elif right > width + 1:
            out.append(f"{_name(w)} ends at {right} px, the dock at {width}")
        elif w.width() + 1 < hint.width():
            out.append(f"{_name(w)} is {w.width()} px wide, under its minimum {hint.width()}")
        lines = w.heightForWidth(w.width()) if isinstance(w, QLabel) and w.wordWrap() and w.text() else -1
        if w.height() + 1 < lines:
            out.append(f"{_name(w)} is {w.height()} px high, its lines need {lines}")
        if isinstance(w, QAbstractScrollArea) and w.verticalScrollBar().maximum() > 0:
            out.append(f"{_name(w)} scrolls inside the panel")
    return out


def _every_tab_fits(qtbot, panel) -> None:
    for i in range(panel.tabs.count()):
        panel.tabs.setCurrentIndex(i)
        qtbot.wait(150)
        assert _clipped(panel) == [], panel.tabs.tabText(i)


def test_view_gives_the_canvas_most_of_the_window_when_no_geometry_is_saved(view, qtbot):
    viewer, panel, dock = view
    window = panel.window()
    screen = window.screen().availableGeometry()
    # he2rna view sized the window to the screen, not napari's first-launch 1089 x 630
    assert (window.width(), window.height()) == (screen.width(), screen.height())
    assert fit_window(dock, (1920, 1080)) == (1920, 1080)
    qtbot.wait(300)
    assert panel.minimumWidth() <= dock.width() <= PANEL_WIDTH + 10
    assert window.centralWidget().width() > 0.55 * window.width()  # the canvas


def test_one_scroll_area_the_slide_file_shown_and_every_tab_fits_the_first_launch_window(view, qtbot):
    viewer, panel, dock = view
    assert len(panel.findChildren(QScrollArea)) == 1  # the panel scrolls as a whole, no nested ones
    panel.show_tab("Slide")
    assert Path(panel.slide.file.value).resolve() == SLIDE.resolve()
    field = panel.slide._path_edit
    assert field.text().endswith(SLIDE.name) and field.cursorPosition() == len(field.text())  # name shown
    facts = panel.slide.facts.native
    assert facts.wordWrap() and "levels: 4" in facts.text()
    _narrowest(qtbot, panel, dock)
    _every_tab_fits(qtbot, panel)


def test_compare_shows_truth_and_heatmap_and_the_tabs_still_fit(view, qtbot, tmp_path):
    viewer, panel, dock = view
    model = panel.model
    assert model.run() is not None
    qtbot.waitUntil(lambda: not model.running, timeout=TIMEOUT_MS)
    heat = model.paint(GENE)
    assert heat is not None and viewer.layers.selection.active.name == heat.name

    compare = panel.compare
    panel.show_tab("Compare")
    assert compare.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    compare.score_a.setCurrentText(GENE)
    qtbot.waitUntil(lambda: GENE in compare.results, timeout=10_000)
    truth = compare.truth_layer
    # the heatmap stays the active layer: its hover gives the tile's score and its truth
    assert viewer.layers.selection.active.name == heat.name != truth.name
    # small, semi-transparent dots: about a nucleus in µm (the layer is in µm), the tiles seen through
    assert truth.opacity <= 0.6
    assert [str(u) for u in truth.units] == ["micrometer"] * 2 and tuple(truth.scale) == (1.0, 1.0)
    assert np.max(truth.size) <= 5.0
    tile = int(np.nanargmax(heat.data))
    pixel = np.unravel_index(tile, heat.data.shape)
    where = heat.data_to_world(pixel)
    status = heat.get_status(where, view_direction=None, dims_displayed=[0, 1], world=True)
    assert GENE in status["value"] and "truth" in status["value"]
    # the metrics table shows every row and no note column (the notes are under it and in tooltips)
    table = compare.table
    assert table.columnCount() == 3 and table.verticalScrollBar().maximum() == 0
    assert "correlated" in table.notes.text()

    folder = tmp_path / "a_folder_with_a_rather_long_name_for_the_exports"
    folder.mkdir()
    assert panel.export.export_csv(folder / "tile_scores.csv") is not None
    _narrowest(qtbot, panel, dock)
    _every_tab_fits(qtbot, panel)
