"""Issue 12 in a real napari viewer (Xvfb + Mesa): progressive painting, one layer per slide, Pin, the fold
spread layer, the tabbed panel's Slide tab, hover readout with truth, bundle units and validation R.

Run with ``xvfb-run -a .venv/bin/python -m pytest tests/_qt/test_viewer_progressive.py``. Each progressive
test extracts the sample slide's hed-stats features into its own empty cache, slowed a little per batch so
that the run can be watched while it goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_he2rna.maps import heatmaps, map_display, map_style, readout
from napari_he2rna.maps import session as slide_session
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._model_widget import ModelWidget
from napari_he2rna.napari._panel import HE2RNAPanel
from napari_he2rna.napari._state import get_registry, layer_info
from napari_he2rna.slides.slide import open_slide

REPO = Path(__file__).resolve().parents[2]
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67", "TP63", "KRT8", "KRT18", "ACTB", "GAPDH"]
TIMEOUT_MS = 240_000


def _bundle(path: Path, folds: int, metadata: dict | None = None) -> Path:
    torch.manual_seed(0)
    nets = [HE2RNA(33, len(GENES), hidden=(16,), dropout=0.0).eval() for _ in range(folds)]
    return save_bundle(path, nets, GENES, "hed-stats", 33, 112.0, ks=[1, 10], metadata=metadata)


@pytest.fixture(scope="module")
def one_fold(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("m1") / "one.safetensors", 1)


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory) -> Path:
    meta = {
        "output_unit": "fraction",
        "validation_r": {"BRCA": {g: 0.1 * i - 0.2 for i, g in enumerate(GENES)}, "LUAD": {"CD3D": 0.3}},
    }
    return _bundle(tmp_path_factory.mktemp("m3") / "three.safetensors", 3, meta)


@pytest.fixture
def slow_batches(slowed_batches):
    """An empty feature cache and 60 ms more per batch: the run lasts long enough to be watched."""
    slowed_batches(0.06)


def _setup(make_napari_viewer, sample_slide, model):
    viewer = make_napari_viewer(show=True)
    slide_layer = viewer.open(str(sample_slide), plugin="napari-he2rna")[0]
    widget = ModelWidget(viewer, model_path=model)
    viewer.window.add_dock_widget(widget, name="Model")
    return viewer, slide_layer, widget


def _finished_raster(sample_slide, model: Path, name: str) -> np.ndarray:
    """The map a plain (not progressive) run gives, from the feature cache the viewer's run wrote: the
    percentile within the slide, clipped to the slide's tissue (map_display)."""
    with slide_session.SlideSession(open_slide(sample_slide), load_bundle(model)) as s:
        s.compute_features(device="cpu")
        return map_display.map_view(s, name, cover=map_display.tissue_cover(s.slide, s.grid)).raster


def test_progressive_run_paints_before_the_end_and_matches_a_finished_run(
    make_napari_viewer, qtbot, sample_slide, one_fold, slow_batches
):
    viewer, slide_layer, widget = _setup(make_napari_viewer, sample_slide, one_fold)
    state = widget.current_state()
    assert widget.run() is not None
    # picked before the first tiles: painted as they arrive
    assert widget.paint("CD3D") is None
    assert state.extra["gene"] == "CD3D"
    qtbot.waitUntil(lambda: widget.active_layer(state) is not None, timeout=TIMEOUT_MS)
    layer = widget.active_layer(state)
    done, total = state.session.n_scored()
    assert widget.running and 0 < done < total  # painted while the extraction goes on
    assert "% of tiles" in layer.name
    # the whole slide: a coarse map fills the rest
    assert np.isfinite(heatmaps.tile_values(layer.data, state.session.current_grid())).sum() == total
    # the picker works during the run, on the same layer
    assert widget.paint("MKI67") is layer and layer_info(layer)["name"] == "MKI67"
    assert widget.paint("CD3D") is layer
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert state.session.ready and widget.active_layer(state) is layer
    assert layer.name == "CD3D"
    np.testing.assert_allclose(
        layer.data, _finished_raster(sample_slide, one_fold, "CD3D"), rtol=1e-5, atol=1e-6, equal_nan=True
    )


def test_cancel_keeps_the_painted_tiles_and_run_resumes(
    make_napari_viewer, qtbot, sample_slide, one_fold, slow_batches
):
    viewer, slide_layer, widget = _setup(make_napari_viewer, sample_slide, one_fold)
    state = widget.current_state()
    widget.run()
    widget.paint("CD3D")
    qtbot.waitUntil(lambda: state.session.n_scored()[0] >= 24, timeout=TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    layer = widget.active_layer(state)
    done, total = state.session.n_scored()
    assert layer is not None and layer in viewer.layers and 0 < done < total
    assert np.isfinite(layer.data).any() and "kept" in widget.status_label.text()
    assert widget.paint("MKI67") is layer  # genes can still be switched on what is painted
    # Run again: it resumes from the cache and ends with every tile
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert state.session.ready and widget.active_layer(state) is layer
    np.testing.assert_allclose(
        layer.data, _finished_raster(sample_slide, one_fold, "MKI67"), rtol=1e-5, atol=1e-6, equal_nan=True
    )


def test_pin_uncertainty_units_r_and_hover(make_napari_viewer, qtbot, sample_slide, one_fold, three_folds):
    viewer, slide_layer, widget = _setup(make_napari_viewer, sample_slide, one_fold)
    state = widget.current_state()
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    layer = widget.paint("CD3D")
    pinned = widget.pin()
    assert pinned is not None and pinned is not layer and pinned.name == "CD3D (pinned)"
    before = np.array(pinned.data, copy=True)
    assert widget.paint("MKI67") is layer
    assert pinned in viewer.layers and np.array_equal(pinned.data, before, equal_nan=True)
    assert not np.array_equal(layer.data, before, equal_nan=True)

    # the fold spread of a one-fold bundle is zero on every tile
    widget.spread_check.setChecked(True)
    spread = widget.active_layer(state, "uncertainty")
    assert spread is not None and layer_info(spread)["name"] == "MKI67"
    vals = spread.data[np.isfinite(spread.data)]
    assert vals.size and np.all(vals == 0)

    # hover: the tile's scores of every painted name (active + pinned) and the truth value
    session = state.session
    grid = session.grid
    i = 5
    size = grid.tile_px * grid.mpp
    pos = ((grid.table["row"].iloc[i] + 0.5) * size, (grid.table["col"].iloc[i] + 0.5) * size)
    truth = np.arange(len(grid.table), dtype=float)
    state.extra["truth"] = ("cells", "CD3+ cells", truth)
    text = layer.get_status(pos, world=True)["value"]
    for name in ("MKI67", "CD3D"):
        pct = readout.ordinal(map_style.percentile_of(session.scores(name), i))
        assert f"{name} {pct} percentile (tile score {session.scores(name)[i]:.3g})" in text
    assert "truth CD3+ cells: 5" in text

    # a 3-fold bundle with its own unit and validation R
    widget.load_model(three_folds)
    assert widget.type_combo.isVisibleTo(widget) and widget.type_combo.count() == 3
    labels = widget.gene_model.stringList()
    assert any(lbl.startswith("GAPDH   R 0.90 ★") for lbl in labels)
    widget.sort_check.setChecked(True)
    genes_sorted = [readout.name_from_label(lbl) for lbl in widget.gene_model.stringList()]
    assert genes_sorted.index("GAPDH") < genes_sorted.index("ACTB") < genes_sorted.index("CD3D")
    widget.reliable_check.setChecked(True)  # R >= 0.4 only (this bundle has no evaluation)
    assert "CD3D" not in [readout.name_from_label(lbl) for lbl in widget.gene_model.stringList()]
    widget.reliable_check.setChecked(False)
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    layer = widget.paint("GAPDH")
    assert layer.name.startswith("GAPDH · R 0.90 ★")
    assert layer.metadata["units"] == map_style.PERCENTILE_UNITS  # what the map paints
    assert "slide prediction" in layer.metadata["legend"] and "fraction" in layer.metadata["legend"]
    assert state.session.units("GAPDH") == readout.tile_score_units("predicted fraction")
    spread = widget.active_layer(state, "uncertainty")
    assert spread is not None and np.nanmax(spread.data) > 0  # three different fold models


def test_panel_tabs_and_slide_tab_follows_viewer_open(make_napari_viewer, qtbot, sample_slide, one_fold):
    viewer = make_napari_viewer(show=True)
    panel = HE2RNAPanel(viewer, model_path=one_fold)
    viewer.window.add_dock_widget(panel, name="HE2RNA")
    assert [panel.tabs.tabText(i) for i in range(panel.tabs.count())] == [
        "Slide",
        "Model",
        "Compare",
        "Export",
    ]
    assert panel.slide.facts.value == "No slide open."
    slide_layer = viewer.open(str(sample_slide), plugin="napari-he2rna")[0]
    facts = panel.slide.facts.value
    assert "dimensions" in facts and "µm/px" in facts and slide_layer.name in facts
    assert panel.slide.mpp.value == f"{slide_layer.metadata['slide'].mpp:g}"
    panel.model.run()
    qtbot.waitUntil(lambda: not panel.model.running, timeout=TIMEOUT_MS)
    heat = panel.model.paint("CD3D")
    assert viewer.layers.selection.active is heat
    assert slide_layer.name in panel.slide.facts.value  # a heatmap's slide
    assert get_registry(viewer).state_of_layer(heat).layer is slide_layer
