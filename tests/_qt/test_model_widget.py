"""The Model dock widget in a real napari viewer (Xvfb + Mesa): run, cancel, paint genes and sets, free.

Run with ``xvfb-run -a .venv/bin/python -m pytest tests/_qt/test_model_widget.py``. Features of the sample
slide are computed once (hed-stats backbone) and come from the session-wide feature cache after that.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_he2rna.maps import gene_sets, heatmaps, map_style
from napari_he2rna.model.bundle import save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._model_widget import DEMO_WARNING, ModelWidget, tile_outline
from napari_he2rna.napari._state import get_registry, layer_info

REPO = Path(__file__).resolve().parents[2]
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67", "TP63", "KRT8", "KRT18", "ACTB", "GAPDH"]
RUN_TIMEOUT_MS = 240_000


def _bundle(path: Path, demo: bool) -> Path:
    torch.manual_seed(0)
    net = HE2RNA(33, len(GENES), hidden=(16,), dropout=0.0)  # hed-stats gives 33 features per tile
    net.eval()
    return save_bundle(path, [net], GENES, "hed-stats", 33, 112.0, ks=[1, 10], demo=demo)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("model") / "test_model.safetensors", demo=False)


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("demo") / "demo_like.safetensors", demo=True)


def _open(viewer, path: Path):
    layers = viewer.open(str(path), plugin="napari-he2rna")
    assert len(layers) == 1
    return layers[0]


def _widget(viewer, model: Path) -> ModelWidget:
    widget = ModelWidget(viewer, model_path=model)
    viewer.window.add_dock_widget(widget, name="Model")
    return widget


def _run(widget: ModelWidget, qtbot) -> None:
    assert widget.run() is not None
    # never a busy bar: Qt animates it ~30 times a second, and on software OpenGL each frame recomposes
    # the window while the slide is tiled
    assert widget.progress_bar.maximum() > 0
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def test_run_then_paint_gene_and_set(make_napari_viewer, qtbot, sample_slide, model_path, notifications):
    viewer = make_napari_viewer(show=True)
    slide_layer = _open(viewer, sample_slide)
    widget = _widget(viewer, model_path)
    assert widget.slide_layer is slide_layer
    assert widget.bundle is not None and widget.bundle.genes == GENES
    assert "12 genes" in widget.model_label.text() and not widget.demo_label.isVisibleTo(widget)
    # gene sets first, then the model's genes
    model = widget.gene_model.stringList()
    assert model[:4] == list(gene_sets.GENE_SETS) and model[4:] == GENES

    # painting before Run is a clear message, not an exception
    assert widget.paint("CD3D") is None
    assert any("Press Run" in m for _, m in notifications)

    viewer.reset_view()
    qtbot.wait(200)
    before = viewer.screenshot(canvas_only=True, flash=False)

    _run(widget, qtbot)
    state = get_registry(viewer).get(slide_layer)
    session = state.session
    assert session.ready
    grid = session.grid
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    # the tissue-tile outline layer lines up with the tile grid
    tiles = get_registry(viewer).layers_of(state, "tiles")
    assert len(tiles) == 1
    raster, scale, translate = tile_outline(grid)
    f = raster.shape[0] // grid.n_rows
    assert tiles[0].data.shape == (grid.n_rows * f, grid.n_cols * f)
    assert tuple(tiles[0].scale) == pytest.approx(scale)

    layer = widget.paint("cd3d")  # case-insensitive; the layer carries the model's spelling
    assert layer is not None and layer.name == "CD3D"
    f = heatmaps.display_factor(grid)  # f x f pixels per tile: clipped to the slide and its tissue
    assert layer.data.shape == (grid.n_rows * f, grid.n_cols * f)
    want_scale, want_translate = heatmaps.display_transform(grid, f)
    assert tuple(layer.scale) == pytest.approx(want_scale)
    assert tuple(layer.translate) == pytest.approx(want_translate)
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    rows, cols = grid.table["row"].to_numpy(), grid.table["col"].to_numpy()
    kept = np.zeros((grid.n_rows, grid.n_cols), dtype=bool)
    kept[rows, cols] = True
    assert np.isnan(layer.data[~np.kron(kept, np.ones((f, f), dtype=bool))]).all()
    shown = heatmaps.tile_values(layer.data, grid)
    assert np.isfinite(shown).all()
    # what is painted: the tile score's percentile within the slide (map_style)
    np.testing.assert_allclose(shown, map_style.percentile_within(session.scores("CD3D")), rtol=1e-6)
    assert shown.std() > 0
    assert tuple(layer.contrast_limits) == (0.0, 100.0)
    assert layer.colormap.name.startswith("magma") and 0 < layer.opacity < 1
    assert layer.colorbar.visible

    # hovering a kept tile: the status names the gene and shows that tile's score
    i = int(np.argmax(session.scores("CD3D")))
    tile_um = grid.tile_side_um
    y_um = (rows[i] + 0.5) * tile_um
    x_um = (cols[i] + 0.5) * tile_um
    assert session.tile_at(x_um, y_um) == i
    status = layer.get_status((y_um, x_um), world=True)
    assert status["layer_name"] == "CD3D"
    # the readout: the tile, every painted name's percentile and score of that tile
    assert f"CD3D 100th percentile (tile score {float(session.scores('CD3D')[i]):.3g})" in status["value"]
    assert status["value"].startswith(f"tile {int(grid.table['tile_id'].iloc[i])}")

    # a gene set: the mean of its genes, in the same layer (its data updated in place)
    t_layer = widget.paint("T cells")
    assert t_layer is layer and t_layer.name == "T cells"
    assert len(get_registry(viewer).layers_of(state, "heatmap")) == 1
    assert "CD3D" not in session.cached_names()  # the gene no layer shows any more is dropped
    expect = np.mean([session.scores(g) for g in ["CD3D", "CD3E", "CD3G", "CD247"]], axis=0)
    np.testing.assert_allclose(session.scores("T cells"), expect, rtol=1e-5)
    np.testing.assert_allclose(
        heatmaps.tile_values(t_layer.data, grid), map_style.percentile_within(expect), rtol=1e-4, atol=1e-3
    )
    assert t_layer.colorbar.visible

    # painting the same name again replaces the layer rather than adding one
    n_layers = len(viewer.layers)
    assert widget.paint("T cells") is t_layer and len(viewer.layers) == n_layers

    # the heatmap is drawn over the tissue
    viewer.reset_view()
    qtbot.wait(300)
    after = viewer.screenshot(canvas_only=True, flash=False)
    assert after.shape == before.shape
    rgb = after[..., :3].astype(float)
    assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    assert np.abs(after.astype(float) - before.astype(float)).mean() > 2

    # an unknown gene: a notification naming it, no layer, no exception
    n_layers = len(viewer.layers)
    assert widget.paint("NOTAGENE1") is None
    assert len(viewer.layers) == n_layers
    assert any(sev == "error" and "NOTAGENE1" in m for sev, m in notifications)

    # typing in the gene box + Enter paints
    widget.gene_combo.setFocus()
    widget.gene_combo.lineEdit().clear()
    qtbot.keyClicks(widget.gene_combo.lineEdit(), "MKI67")
    qtbot.keyClick(widget.gene_combo.lineEdit(), "\r")
    qtbot.waitUntil(lambda: widget.heatmap_layer(state, "MKI67") is not None, timeout=5000)
    assert len([ly for ly in viewer.layers if ly.name.startswith("MKI67")]) == 1

    # a user-defined set is offered and painted
    assert widget.add_gene_set("Bmix=CD19+MS4A1+NOPE") == ["Bmix"]
    assert "Bmix" in widget.gene_model.stringList()
    bmix = widget.heatmap_layer(state, "Bmix")
    assert bmix is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gene_sets.PartialGeneSetWarning)  # NOPE, reported above
        bmix_scores = session.scores("Bmix")
    np.testing.assert_allclose(bmix_scores, (session.scores("CD19") + session.scores("MS4A1")) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        heatmaps.tile_values(bmix.data, grid), map_style.percentile_within(bmix_scores), rtol=1e-6
    )
    assert any("NOPE" in m for _, m in notifications)  # partial set: a warning naming the missing gene
    # a set named like a gene of the model is refused when it is added, in one sentence naming it
    assert widget.add_gene_set("CD3D=MKI67") == []
    assert "CD3D" not in [n for n in widget.registry.gene_sets]
    assert any(sev == "error" and "CD3D" in m for sev, m in notifications)

    # removing a heatmap layer drops its cached scores
    assert "Bmix" in session.cached_names()
    viewer.layers.remove(layer)
    assert "Bmix" not in session.cached_names()

    # removing the slide layer frees its session and takes its heatmaps along
    viewer.layers.remove(slide_layer)
    assert get_registry(viewer).get(slide_layer) is None
    assert session.features is None and session.cached_names() == []
    assert session.slide.closed
    assert not [ly for ly in viewer.layers if layer_info(ly)]
    assert widget.slide_layer is None


def test_cancel_leaves_nothing_half_made(
    make_napari_viewer, qtbot, sample_slide, model_path, notifications, monkeypatch
):
    viewer = make_napari_viewer()
    slide_layer = _open(viewer, sample_slide)
    widget = _widget(viewer, model_path)

    # Hold the job once the grid is known until Cancel is pressed, so the cancel lands mid-run every time.
    from napari_he2rna.maps.session import SlideSession

    real_compute = SlideSession.compute_features

    def held_compute(self, *args, cancel=None, grid_ready=None, **kwargs):
        def hold(grid):
            grid_ready(grid)
            assert cancel is not None and cancel.wait(60)

        return real_compute(self, *args, cancel=cancel, grid_ready=hold, **kwargs)

    monkeypatch.setattr(SlideSession, "compute_features", held_compute)
    worker = widget.run()
    assert worker is not None and widget.running
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    state = get_registry(viewer).get(slide_layer)
    # the tissue-tile outline shows up while the run is still going
    qtbot.waitUntil(lambda: len(get_registry(viewer).layers_of(state, "tiles")) == 1, timeout=60_000)
    assert widget.running
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    assert not state.session.ready
    assert not [ly for ly in viewer.layers if layer_info(ly)]  # no outline, no heatmap left
    assert any("cancelled" in m for _, m in notifications)
    assert not any(sev == "error" for sev, _ in notifications)
    assert "Cancelled" in widget.status_label.text()
    # the widget is usable afterwards
    monkeypatch.setattr(SlideSession, "compute_features", real_compute)
    assert widget.run_button.isEnabled()
    _run(widget, qtbot)
    assert state.session.ready
    assert widget.paint("MKI67") is not None


def test_two_slides_keep_their_own_sessions(make_napari_viewer, qtbot, sample_slide, model_path):
    viewer = make_napari_viewer()
    first = _open(viewer, sample_slide)
    second = _open(viewer, sample_slide)
    widget = _widget(viewer, model_path)
    registry = get_registry(viewer)
    for slide_layer in (first, second):
        widget.slide_picker.value = slide_layer
        _run(widget, qtbot)
        assert widget.paint("CD19") is not None
    s1, s2 = registry.get(first), registry.get(second)
    assert s1.session is not s2.session and s1.session.ready and s2.session.ready
    assert len(registry.layers_of(s1, "heatmap")) == 1 and len(registry.layers_of(s2, "heatmap")) == 1
    viewer.layers.remove(first)
    assert registry.get(first) is None and registry.layers_of(s1) == []
    assert s2.session.ready and len(registry.layers_of(s2, "heatmap")) == 1


def test_model_description_demo_warning_and_devices(
    make_napari_viewer, demo_model_path, tmp_path, notifications
):
    viewer = make_napari_viewer()
    widget = _widget(viewer, demo_model_path)
    assert widget.demo_label.text() == DEMO_WARNING
    assert widget.demo_label.isVisibleTo(widget)
    assert "hed-stats" in widget.model_label.text()
    cuda_item = widget.device_combo.model().item(1)
    assert widget.device_combo.itemText(1) == "cuda"
    assert cuda_item.isEnabled() == torch.cuda.is_available()
    # Run without a slide, and a broken model file: messages, no exceptions
    assert widget.run() is None
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    assert widget.load_model(bad) is None
    assert widget.bundle is not None and widget.bundle.demo  # the previous model stays
    messages = [m for sev, m in notifications if sev == "error"]
    assert any("Open a slide" in m for m in messages)
    assert any("broken.safetensors" in m for m in messages)


def test_demo_model_paints_the_planted_t_cell_tiles(make_napari_viewer, qtbot, sample_slide):
    """The bundled demo model (preselected) puts the hot "T cells" tiles where the sample planted T cells."""
    from scipy.stats import spearmanr

    from napari_he2rna.maps.session import default_model_path

    truth_path = sample_slide.with_name("sample_slide_tiles.csv")
    assert default_model_path().is_file() and truth_path.is_file(), "committed demo model or truth missing"
    import pandas as pd

    viewer = make_napari_viewer()
    slide_layer = _open(viewer, sample_slide)
    widget = ModelWidget(viewer)  # the demo model is preselected
    viewer.window.add_dock_widget(widget, name="Model")
    assert widget.bundle is not None and widget.bundle.demo and widget.demo_label.isVisibleTo(widget)
    _run(widget, qtbot)
    layer = widget.paint("T cells")
    assert layer is not None
    grid = get_registry(viewer).get(slide_layer).session.grid
    truth = pd.read_csv(truth_path).set_index(["row", "col"])
    keys = list(zip(grid.table["row"], grid.table["col"], strict=True))
    planted = truth.loc[keys, "t_cells"].to_numpy(dtype=float)
    painted = heatmaps.tile_values(layer.data, grid)
    rho = spearmanr(painted, planted).statistic
    assert rho > 0.3, f"T-cell heatmap vs planted T cells: Spearman {rho:.2f}"


def test_slide_picker_follows_the_active_slide_through_napari_plugin_proxy(make_napari_viewer, sample_slide):
    # napari hands a plugin widget a PublicOnlyProxy of the viewer: its layers are proxies, never `is` the
    # layer objects in the picker's choices
    from napari.utils._proxies import PublicOnlyProxy

    from napari_he2rna.napari._pickers import SlideLayerPicker

    viewer = make_napari_viewer()
    first = _open(viewer, sample_slide)
    second = _open(viewer, sample_slide)
    picker = SlideLayerPicker(PublicOnlyProxy(viewer))
    viewer.layers.selection.active = first
    assert picker.value == first
    viewer.layers.selection.active = second
    assert picker.value == second and picker.value is not first
