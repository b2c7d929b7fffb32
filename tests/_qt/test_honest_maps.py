"""Issue 22 in a real napari viewer (Xvfb + Mesa): what a pathologist sees on the canvas.

The colour bar's label names the gene or set and its unit (the percentile within the slide, with the slide
prediction in the target's unit); low scores fade to transparent; the fold spread has its own colour bar;
the canvas says when the slide is outside the training data (and the map turns grey); tiles stop at the
slide's edge; the Run bar and the layer names count the same tiles; "Painted" only once painting is done.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_he2rna.maps import heatmaps, map_style, readout
from napari_he2rna.maps.gene_sets import DISTANCE_NAME
from napari_he2rna.model import ood
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._canvas_notes import LEGEND_OVERLAY, WARNING_OVERLAY
from napari_he2rna.napari._canvas_notes import canvas_text as wrapped_text
from napari_he2rna.napari._model_widget import ModelWidget
from napari_he2rna.napari._state import layer_info

GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67", "TP63", "KRT8", "KRT18", "ACTB", "GAPDH"]
TIMEOUT_MS = 240_000


def canvas_text(viewer, key: str) -> str:
    """A canvas text as one line (it wraps to the canvas's width)."""
    return " ".join(wrapped_text(viewer, key).split())


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Two hed-stats folds with the demo model's feature reference (synthetic slides), validation R and a
    unit: like the training data on the sample slide, outside it on the real CMU-1 region."""
    from napari_he2rna.maps.session import default_model_path

    torch.manual_seed(0)
    nets = [HE2RNA(33, len(GENES), hidden=(16,), dropout=0.0).eval() for _ in range(2)]
    meta = {
        ood.REFERENCE_KEY: ood.bundle_reference(load_bundle(default_model_path())),
        "output_unit": "log10(1+FPKM-UQ)",
        "validation_r": {"BRCA": {g: (0.8 if g.startswith("CD3") else 0.05) for g in GENES}},
    }
    path = tmp_path_factory.mktemp("honest") / "honest.safetensors"
    return save_bundle(path, nets, GENES, "hed-stats", 33, 112.0, ks=[1, 10], metadata=meta)


def _setup(make_napari_viewer, slide: Path, model: Path):
    viewer = make_napari_viewer(show=True)
    slide_layer = viewer.open(str(slide), plugin="napari-he2rna")[0]
    widget = ModelWidget(viewer, model_path=model)
    viewer.window.add_dock_widget(widget, name="Model")
    return viewer, slide_layer, widget


def _run(widget, qtbot) -> None:
    assert widget.run() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def test_colour_bar_label_fade_and_fold_spread(make_napari_viewer, qtbot, sample_slide, model):
    viewer, _, widget = _setup(make_napari_viewer, sample_slide, model)
    # the model label: the median R of the marked genes, with their count, not one dragged down by controls
    assert f"median 0.80 over the 3 {readout.MARK} genes" in widget.model_label.text()
    _run(widget, qtbot)
    state = widget.current_state()
    session = state.session
    layer = widget.paint("T cells")
    assert layer is not None
    assert widget.status_label.text().startswith("Painted T cells")

    # the number painted: the tile score's percentile within the slide, 0 to 100
    assert tuple(layer.contrast_limits) == (0.0, 100.0)
    np.testing.assert_allclose(
        heatmaps.tile_values(layer.data, session.grid),
        map_style.percentile_within(session.scores("T cells")),
        rtol=1e-6,
    )
    # the colour bar's label: the set, its genes, the unit, the slide prediction in the target's unit
    label = canvas_text(viewer, LEGEND_OVERLAY)
    assert layer.colorbar.visible
    prediction = float(session.slide_predictions(["T cells"]).iloc[0])
    for part in ("T cells", "mean of CD3D, CD3E, CD3G", "percentile of this slide's tiles"):
        assert part in label
    assert f"slide prediction {map_style.number(prediction)} log10(1+FPKM-UQ)" in label
    assert canvas_text(viewer, WARNING_OVERLAY) == ""  # within the training data: no warning

    # low scores fade to transparent: the colormap's low end has no alpha, its high end is opaque
    colors = np.asarray(layer.colormap.colors)
    assert colors[0, 3] == 0.0 and colors[-1, 3] == 1.0
    assert 0 < layer.opacity < 1

    # hover: the percentile and the tile score
    i = int(np.argmax(session.scores("T cells")))
    size = session.grid.tile_side_um
    table = session.grid.table
    pos = ((table["row"].iloc[i] + 0.5) * size, (table["col"].iloc[i] + 0.5) * size)
    assert "T cells 100th percentile (tile score" in layer.get_status(pos, world=True)["value"]

    # the fold spread: its own (viridis) colour bar and label while it is the active layer
    widget.spread_check.setChecked(True)
    spread = widget.active_layer(state, "uncertainty")
    assert spread is not None and "viridis" in spread.colormap.name
    viewer.layers.selection.active = spread
    assert spread.colorbar.visible and not layer.colorbar.visible
    assert "T cells fold spread" in canvas_text(viewer, LEGEND_OVERLAY)
    assert "percentile points" in canvas_text(viewer, LEGEND_OVERLAY)
    viewer.layers.selection.active = layer
    assert layer.colorbar.visible and not spread.colorbar.visible

    # the short name of the feature distance works in the gene box
    widget.spread_check.setChecked(False)
    distance = widget.paint("feature distance")
    assert distance is layer and layer_info(layer)["name"] == DISTANCE_NAME
    assert "tile threshold of the training data" in canvas_text(viewer, LEGEND_OVERLAY)
    # the threshold is marked on the colour bar: a white band at its place in the colour range
    thr = float(ood.bundle_reference(session.bundle)["tile_threshold"])
    lo, hi = layer.contrast_limits
    at = int(round((thr - lo) / (hi - lo) * (len(layer.colormap.colors) - 1)))
    np.testing.assert_allclose(np.asarray(layer.colormap.colors)[at], [1.0, 1.0, 1.0, 1.0])
    # removing the map takes its label along
    viewer.layers.remove(layer)
    assert canvas_text(viewer, LEGEND_OVERLAY) == ""


def test_outside_the_training_data_the_canvas_says_so_and_tiles_stop_at_the_edge(
    make_napari_viewer, qtbot, cmu_slide, model
):
    viewer, slide_layer, widget = _setup(make_napari_viewer, cmu_slide, model)
    assert canvas_text(viewer, WARNING_OVERLAY) == ""
    _run(widget, qtbot)
    session = widget.current_state().session
    assert session.cached_assessment.outside
    warning = canvas_text(viewer, WARNING_OVERLAY)
    assert "OUTSIDE THE MODEL'S TRAINING DATA" in warning and "not predictions" in warning
    layer = widget.paint("MKI67")
    # the map is grey and its colour bar's label says it is not a prediction
    rgb = np.asarray(layer.colormap.colors)[:, :3]
    np.testing.assert_allclose(rgb, np.repeat(rgb[:, :1], 3, axis=1), atol=1e-6)
    assert canvas_text(viewer, LEGEND_OVERLAY).startswith("NOT A PREDICTION")

    # the tiles of the last row and column stop at the slide's edge (level-0 pixel edges, in µm)
    grid = session.grid
    width, height = grid.slide_dimensions
    mpp = float(grid.mpp)
    assert grid.n_cols * grid.tile_px > width and grid.n_rows * grid.tile_px > height  # tiles overhang
    painted = np.isfinite(layer.data)
    last_col = int(np.flatnonzero(painted.any(axis=0))[-1])
    last_row = int(np.flatnonzero(painted.any(axis=1))[-1])
    (sy, sx), (ty, tx) = tuple(layer.scale), tuple(layer.translate)
    assert (last_col + 0.5) * sx + tx <= (width - 0.5) * mpp + 1e-6
    assert (last_row + 0.5) * sy + ty <= (height - 0.5) * mpp + 1e-6
    kept_last_row = (grid.table["row"] == grid.n_rows - 1).any()
    assert not kept_last_row or (last_row + 1) * sy > (grid.n_rows - 1) * grid.tile_px * mpp  # painted to it

    # the distance is a measurement: in colour, under the canvas's warning
    distance = widget.paint("feature distance")
    top = np.asarray(distance.colormap.colors)[-1]
    assert abs(top[0] - top[2]) > 0.2 and "grey" not in distance.colormap.name
    assert canvas_text(viewer, WARNING_OVERLAY)


@pytest.fixture
def slow_batches(slowed_batches):
    """An empty feature cache and 0.25 s more per batch: the run lasts long enough to be checked."""
    slowed_batches(0.25)


def test_run_bar_and_layer_name_agree_and_painted_only_at_the_end(
    make_napari_viewer, qtbot, sample_slide, model, slow_batches
):
    viewer, _, widget = _setup(make_napari_viewer, sample_slide, model)
    state = widget.current_state()
    assert widget.run() is not None
    widget.paint("CD3D")
    qtbot.waitUntil(lambda: widget.active_layer(state) is not None, timeout=TIMEOUT_MS)
    layer = widget.active_layer(state)
    assert widget.running and not widget.status_label.text().startswith("Painted")
    # a progress report that lags behind the painted tiles (reports queue up while the window redraws)
    run_box = widget.run_box
    run_box._on_progress(1, state.session.n_scored()[1], "1.0 tiles/s")
    run_box._show_progress()
    run_box._live_repaint()
    if not state.session.ready:  # (the run cannot have ended unseen: it is 0.25 s a batch)
        shown = re.search(r"(\d+)% of tiles", layer.name)
        assert shown is not None and widget.progress_bar.text() == f"{shown.group(1)}%"
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert widget.status_label.text().startswith("Painted CD3D")
    assert widget.progress_bar.text() == "100%"


def test_canvas_texts_rewrap_when_the_canvas_narrows(make_napari_viewer):
    # a window made smaller (napari's first-launch size) must not cut the warning or the label off
    from napari_he2rna.napari._canvas_notes import WARNING_TEXT, show_legend, show_warning

    viewer = make_napari_viewer()
    viewer.canvas.size = (1000, 1400)
    show_warning(viewer, True)
    label = (
        "B cells\npercentile of this slide's tiles (100 = highest)\nslide prediction 1.45 log10(1+FPKM-UQ)"
    )
    show_legend(viewer, label)
    wide = [wrapped_text(viewer, key).split("\n") for key in (WARNING_OVERLAY, LEGEND_OVERLAY)]
    viewer.canvas.size = (600, 300)  # about what is left of a 1089 x 630 window beside the docks
    narrow = [wrapped_text(viewer, key).split("\n") for key in (WARNING_OVERLAY, LEGEND_OVERLAY)]
    for before, after in zip(wide, narrow, strict=True):
        assert len(after) > len(before)
        assert max(len(line) for line in after) < max(len(line) for line in before)
    assert " ".join(wrapped_text(viewer, WARNING_OVERLAY).split()) == " ".join(WARNING_TEXT.split())


def _slide_on_canvas(viewer, layer) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of ``layer`` on the canvas, in pixels from its top-left corner."""
    from napari_he2rna.napari._view_fit import camera

    (y0, x0), (y1, x1) = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    cy, cx = camera(viewer).center[-2:]
    zoom, (h, w) = camera(viewer).zoom, viewer.canvas.size
    return (
        (y0 - cy) * zoom + h / 2,
        (x0 - cx) * zoom + w / 2,
        (y1 - cy) * zoom + h / 2,
        (x1 - cx) * zoom + w / 2,
    )


@pytest.mark.parametrize("which", ["sample", "cmu"])
def test_the_view_keeps_the_slide_clear_of_the_canvas_texts_until_the_user_moves_it(
    make_napari_viewer, sample_slide, cmu_slide, which
):
    # napari's first-launch window leaves a canvas of about 355 x 580 px: its Home put the slide under the
    # label, the warning and the colour bar; the plugin fits it into what they leave free
    from napari_he2rna.napari._canvas_notes import TEXT_OVERLAYS, show_legend, show_warning, watch_view
    from napari_he2rna.napari._view_fit import camera, overlay_footprint

    viewer = make_napari_viewer(show=True)
    watch_view(viewer)
    slide = sample_slide if which == "sample" else cmu_slide  # synthetic, and a real H&E region (tall)
    layer = viewer.open(str(slide), plugin="napari-he2rna")[0]
    layer.colorbar.visible = True
    viewer.canvas.size = (580, 355)
    viewer.reset_view()
    home_top, *_ = _slide_on_canvas(viewer, layer)
    show_warning(viewer, True)
    show_legend(viewer, "CD3E\npercentile of this slide's tiles (100 = highest)\nslide prediction 2.23")
    text_bottom, bar_w, bar_bottom = overlay_footprint(viewer, TEXT_OVERLAYS)
    assert text_bottom > home_top and bar_w > 0  # napari's Home would put the texts over the slide
    top, left, bottom, right = _slide_on_canvas(viewer, layer)
    assert top >= text_bottom - 1 and bottom <= 580 + 1 and left >= -1
    assert right <= 355 - bar_w + 1 or top >= bar_bottom - 1  # beside the colour bar or under it
    assert bottom - top > 0.5 * (580 - text_bottom) or right - left > 0.5 * (355 - bar_w)  # and not tiny

    # when the texts go, the whole canvas is free again (napari's Home); they come back: under them again
    show_warning(viewer, False)
    show_legend(viewer, None)
    layer.colorbar.visible = False
    show_legend(viewer, None)
    t, lft, b, r = _slide_on_canvas(viewer, layer)
    assert abs(t - (580 - b)) < 1 and abs(lft - (355 - r)) < 1  # centred on the whole canvas
    assert max((b - t) / 580, (r - lft) / 355) > 0.9 and t < text_bottom
    layer.colorbar.visible = True
    show_warning(viewer, True)
    show_legend(viewer, "CD3E\npercentile of this slide's tiles (100 = highest)\nslide prediction 2.23")
    assert _slide_on_canvas(viewer, layer)[0] >= text_bottom - 1

    # a resized canvas refits; once the user zooms, their view stays through new texts and resizes
    viewer.canvas.size = (900, 1200)
    top_wide, *_ = _slide_on_canvas(viewer, layer)
    assert top_wide >= overlay_footprint(viewer, TEXT_OVERLAYS)[0] - 1
    camera(viewer).zoom *= 2.0
    zoom, center = camera(viewer).zoom, tuple(camera(viewer).center)
    show_warning(viewer, False)
    show_legend(viewer, "B cells")
    viewer.canvas.size = (580, 355)
    assert camera(viewer).zoom == zoom and tuple(camera(viewer).center) == center
    # napari's Home gives the fit clear of the texts back
    viewer.reset_view()
    top, *_ = _slide_on_canvas(viewer, layer)
    assert top >= overlay_footprint(viewer, TEXT_OVERLAYS)[0] - 1
