"""The Compare dock widget in a real napari viewer (Xvfb) on the committed sample slide and its planted truth.

The slide's session is built directly (the Model widget's job): the real tile grid of the sample slide, random
"hed-stats"-shaped features and a tiny random-weight model bundle, registered in the viewer's shared registry.
The truth files are the generator's (``sample_data/sample_slide_*``), so the per-tile counts must equal its
``sample_slide_tiles.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.features.hed_stats import HED_STATS_FEATURES
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.napari._compare_widget import ALL_CLASSES, NO_SCORE, CompareWidget
from napari_he2rna.napari._state import get_registry
from napari_he2rna.slides.tiling import tile_grid

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"
SLIDE = SAMPLE / "sample_slide.tiff"
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67"]


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(0)
    dim = len(HED_STATS_FEATURES)
    model = HE2RNA(dim, len(GENES), hidden=(16,), dropout=0.0).eval()
    path = save_bundle(tmp_path / "tiny.safetensors", [model], GENES, "hed-stats", dim, 112.0, ks=[10])
    return load_bundle(path)


@pytest.fixture(scope="module")
def grid():
    """The sample slide's tile grid (112 µm tiles), computed once for the module."""
    from napari_he2rna.slides.slide import open_slide

    with open_slide(SLIDE) as slide:
        return tile_grid(slide, tile_um=112.0)


@pytest.fixture
def setup(make_napari_viewer, bundle, grid):
    """(viewer, slide layer, session, widget): the sample slide with a ready session, and the widget."""
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(SLIDE), plugin="napari-he2rna")
    session = get_registry(viewer).state_for(layer).session
    session.set_model(bundle)
    features = np.random.default_rng(0).normal(size=(len(grid.table), bundle.feature_dim))
    session.set_features(grid, features, "hed-stats")
    session.scores("T cells")  # "painted"
    widget = CompareWidget(viewer)
    return viewer, layer, session, widget


def _tiles_truth(grid, column: str, shift_cols: int = 0) -> np.ndarray:
    """The generator's per-tile truth for the grid's tiles, read at (row, col - shift_cols)."""
    tiles = pd.read_csv(SAMPLE / "sample_slide_tiles.csv").set_index(["row", "col"])[column]
    keys = zip(grid.table["row"], grid.table["col"] - shift_cols, strict=True)
    return np.array([tiles.get((r, c), 0) for r, c in keys])


def _table_values(widget: CompareWidget, column: int = 2) -> dict[str, str]:
    t = widget.table
    return {
        f"{t.item(i, 0).text()} {t.item(i, 1).text()}": t.item(i, column).text() for i in range(t.rowCount())
    }


def test_cells_land_in_microns_counts_match_and_metrics_follow_the_gene(setup, qtbot):
    viewer, slide_layer, session, widget = setup
    assert widget.slide_combo.currentText() == slide_layer.name
    assert widget.score_a.currentText() == "T cells"  # the painted name comes first
    assert widget.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    assert widget.truth_kind == "cells"
    # the class combo lists the file's classes; QuPath's "Positive" is picked by default
    classes = [widget.class_combo.itemText(i) for i in range(widget.class_combo.count())]
    assert classes[0] == ALL_CLASSES and {"Positive", "Negative"} <= set(classes)
    assert widget.class_combo.currentText() == "Positive"

    points = widget.truth_layer
    assert points in viewer.layers and type(points).__name__ == "Points"
    tsv = pd.read_csv(SAMPLE / "sample_slide_CD3.tsv", sep="\t")
    pos = tsv[tsv["Class"] == "Positive"]
    expected_yx = pos[["Centroid Y µm", "Centroid X µm"]].to_numpy(float)
    np.testing.assert_allclose(points.data, expected_yx, atol=1e-6)
    # world coordinates (what is drawn over the slide, whose layer is scaled in µm) are the same µm
    np.testing.assert_allclose(points.data_to_world(points.data[0]), expected_yx[0], atol=1e-6)
    assert tuple(slide_layer.scale) == pytest.approx((0.5, 0.5))

    qtbot.waitUntil(lambda: bool(widget.results), timeout=3000)  # the debounced recompute ran by itself
    np.testing.assert_array_equal(widget.truth_values, _tiles_truth(session.grid, "t_cells"))
    assert widget.truth_values.sum() > 100

    before = _table_values(widget)
    assert set(before) >= {"Pearson R ", "Spearman ρ ", "tiles "}
    assert any(k.startswith("ROC-AUC p75") for k in before)
    assert before["tiles "] == str(len(session.grid.table))
    tip = widget.table.item(2, 2).toolTip()
    assert "neighbouring tiles are correlated" in tip.lower()
    assert widget.figure.axes and widget.figure.axes[0].lines  # ROC curves drawn

    widget.score_a.setCurrentText("B cells")
    qtbot.waitUntil(lambda: "B cells" in widget.results, timeout=3000)
    after = _table_values(widget)
    assert after["Pearson R "] != before["Pearson R "]
    assert widget.figure.axes[0].get_title() == "B cells"

    # side by side: a second score gets its own column and its own ROC panel
    widget.score_b.setCurrentText("T cells")
    widget.recompute()
    assert list(widget.results) == ["B cells", "T cells"]
    assert widget.table.horizontalHeaderItem(3).text() == "T cells"
    assert _table_values(widget, column=3)["Pearson R "] == before["Pearson R "]
    assert len(widget.figure.axes) == 2

    # a user threshold adds an AUC row
    widget.threshold_edit.setText("3")
    widget.recompute()
    assert any(k.startswith("ROC-AUC >3") for k in _table_values(widget))

    # the class filter re-bins: all classes count more cells and the Points layer follows
    widget.class_combo.setCurrentText(ALL_CLASSES)
    widget.recompute()
    assert len(points.data) == len(tsv)
    assert widget.truth_values.sum() > _tiles_truth(session.grid, "t_cells").sum()


def test_alignment_moves_the_points_and_the_counts(setup, qtbot):
    viewer, slide_layer, session, widget = setup
    assert widget.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    assert widget.recompute()
    points = widget.truth_layer
    first = np.asarray(points.data_to_world(points.data[0]))
    counts = widget.truth_values.copy()

    widget.offset_x.setValue(112.0)  # one tile (112 µm) to the right
    qtbot.waitUntil(
        lambda: widget.truth_values is not None and not np.array_equal(widget.truth_values, counts)
    )
    np.testing.assert_allclose(points.data_to_world(points.data[0]), first + [0.0, 112.0], atol=1e-6)
    np.testing.assert_array_equal(widget.truth_values, _tiles_truth(session.grid, "t_cells", shift_cols=1))

    widget.reset_alignment()
    widget.recompute()
    np.testing.assert_allclose(points.data_to_world(points.data[0]), first, atol=1e-6)
    np.testing.assert_array_equal(widget.truth_values, counts)


def test_wrong_file_notifies_and_the_widget_stays_usable(setup, shared_data, notifications):
    viewer, slide_layer, session, widget = setup
    assert widget.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    assert widget.recompute()
    n_layers = len(viewer.layers)
    bad = shared_data / "qupath" / "MKProject_measurements.tsv"
    assert widget.load_truth_file(bad) is False
    assert any(sev == "error" and "no centroid columns" in msg for sev, msg in notifications)
    # nothing changed: same truth, same layers, metrics still computed
    assert widget.truth_path.name == "sample_slide_CD3.tsv" and len(viewer.layers) == n_layers
    assert widget.recompute()

    # a gene the model lacks: a notification, then a good pick works again
    widget.score_a.setCurrentText("NOTAGENE")
    assert widget.recompute() is False
    assert any(sev == "error" and "NOTAGENE" in msg for sev, msg in notifications)
    widget.score_a.setCurrentText("MKI67")
    assert widget.recompute() and "MKI67" in widget.results

    # truth shifted off the slide: explained, not turned into zeros
    widget.set_alignment((50_000.0, 0.0))
    assert widget.recompute() is False
    assert any("outside" in msg for _, msg in notifications)
    widget.reset_alignment()
    assert widget.recompute()


def test_annotations_and_mask(setup):
    viewer, slide_layer, session, widget = setup
    assert widget.load_truth_file(SAMPLE / "sample_slide_tumor.geojson")
    assert widget.truth_kind == "annotations" and type(widget.truth_layer).__name__ == "Shapes"
    assert widget.class_combo.currentText() == "Tumor"
    assert widget.recompute()
    labels = widget.truth_values
    tumour = _tiles_truth(session.grid, "tumor_fraction") >= 0.5
    assert np.mean((labels > 0.5) == tumour) > 0.9
    values = _table_values(widget)
    assert "inside-vs-outside AUC inside vs outside" in values
    assert any(k.startswith("share inside top") for k in values)
    # the outlines sit where the polygons are, in µm (level-0 px x 0.5), one per ring
    poly = widget._polygons_all[0]
    shapes = widget.truth_layer
    assert len(shapes.data) == sum(1 + len(p.holes) for p in widget._polygons_all)
    np.testing.assert_allclose(shapes.data[0][0], poly.exterior[0, ::-1] * 0.5)
    lo, hi = shapes.data[0].min(0), shapes.data[0].max(0)
    np.testing.assert_allclose(lo, poly.exterior[:, ::-1].min(0) * 0.5, atol=1.0)
    np.testing.assert_allclose(hi, poly.exterior[:, ::-1].max(0) * 0.5, atol=1.0)

    assert widget.load_truth_file(SAMPLE / "sample_slide_epithelium_mask.png")
    assert widget.truth_kind == "mask" and type(widget.truth_layer).__name__ == "Image"
    assert len([ly for ly in viewer.layers if "truth" in ly.name]) == 1  # the old truth layer went
    assert widget.recompute()
    expected = _tiles_truth(session.grid, "epithelium_fraction")
    np.testing.assert_allclose(widget.truth_values, expected, atol=0.05)
    # the 504 px mask is stretched over the 4032 px slide: 8 slide px = 4 µm per mask px
    assert tuple(widget.truth_layer.scale) == pytest.approx((4.0, 4.0))


def test_exports_ask_before_overwriting(setup, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, slide_layer, session, widget = setup
    widget.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    widget.score_b.setCurrentText("B cells")
    assert widget.recompute()
    metrics_csv = widget.export_metrics(tmp_path / "metrics.csv")
    metrics = pd.read_csv(metrics_csv)
    assert set(metrics["score"]) == {"T cells", "B cells"}
    assert set(metrics["truth"]) == {"cell count (Positive)"}
    assert {"pearson_r", "roc_auc", "median_truth_top_n"} <= set(metrics["metric"])

    tiles_csv = widget.export_tiles(tmp_path / "tiles.csv")
    tiles = pd.read_csv(tiles_csv)
    assert list(tiles.columns[:3]) == ["tile_id", "row", "col"]
    np.testing.assert_array_equal(tiles["cell count (Positive)"], _tiles_truth(session.grid, "t_cells"))
    np.testing.assert_allclose(tiles["T cells"], session.scores("T cells"), rtol=1e-6)

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.No)
    tiles_csv.write_text("keep me")
    assert widget.export_tiles(tiles_csv) is None and asked
    assert tiles_csv.read_text() == "keep me"
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    assert widget.export_tiles(tiles_csv) == tiles_csv
    assert "tile_id" in tiles_csv.read_text()


class _TruthSession:
    """A session whose scores are given: the count itself is a perfect score."""

    def __init__(self, grid, scores: dict[str, np.ndarray]) -> None:
        self.grid, self.features, self.bundle = grid, np.zeros((len(grid.table), 1)), None
        self._scores = scores

    def cached_names(self):
        return list(self._scores)

    def canonical(self, name):
        return name

    def scores(self, name):
        return self._scores[name]

    def units(self, name):
        return "cells per tile"


def test_session_provider_and_a_perfect_score(make_napari_viewer, grid):
    viewer = make_napari_viewer()
    viewer.open(str(SLIDE), plugin="napari-he2rna")
    counts = _tiles_truth(grid, "t_cells").astype(float)
    fake = _TruthSession(grid, {"perfect": counts, "constant": np.ones(len(counts))})
    widget = CompareWidget(viewer, session_provider=lambda ly: fake)
    assert widget.score_a.currentText() == "perfect" and widget.score_b.currentText() == NO_SCORE
    assert widget.load_truth_file(SAMPLE / "sample_slide_CD3.tsv")
    assert widget.recompute()
    res = widget.results["perfect"]
    assert res.pearson_r == pytest.approx(1.0) and res.spearman_rho == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in res.auc.values())
    # constant scores: the AUC is undefined and the table says why instead of showing 0.5
    widget.score_a.setCurrentText("constant")
    assert widget.recompute()
    rows = {widget.table.item(i, 0).text(): i for i in range(widget.table.rowCount())}
    i = rows["ROC-AUC"]
    assert widget.table.item(i, 2).text() == "—"
    assert "constant" in widget.table.item(i, 2).toolTip() and "constant" in widget.table.notes.text()


@pytest.mark.parametrize("downsample", [0.0, 16.0])
def test_the_drawn_mask_and_the_numbers_come_from_one_geometry(setup, tmp_path, downsample):
    """One positive mask pixel: the tile under it on screen is the tile whose fraction counts it."""
    from skimage import io

    viewer, slide_layer, session, widget = setup
    shape = io.imread(SAMPLE / "sample_slide_epithelium_mask.png").shape[:2]
    # a pixel under a tissue tile's centre once the truth is shifted by (30, -20) µm
    grid, mpp = session.grid, 0.5
    s = downsample or slide_layer.metadata["slide"].dimensions[0] / shape[1]
    x, y = grid.table[["x", "y"]].to_numpy()[len(grid.table) // 2] + grid.tile_px / 2
    i, j = int((y + 20 / mpp) // s), int((x - 30 / mpp) // s)
    mask = np.zeros(shape, np.uint8)
    mask[i, j] = 255
    io.imsave(tmp_path / "one_pixel.png", mask, check_contrast=False)
    assert widget.load_truth_file(tmp_path / "one_pixel.png")
    widget.downsample_spin.setValue(downsample)
    widget.set_alignment((30.0, -20.0))
    assert widget.recompute()
    layer = widget.truth_layer
    scale, translate = widget.comparison.mask_placement()
    assert tuple(layer.scale) == pytest.approx(scale) and tuple(layer.translate) == pytest.approx(translate)
    world_y, world_x = layer.data_to_world((i, j))  # µm, over the slide layer (scale = mpp)
    row, col = slide_layer.world_to_data((world_y, world_x))
    tile = np.flatnonzero(
        (grid.table["row"] == int((row + 0.5) // grid.tile_px))
        & (grid.table["col"] == int((col + 0.5) // grid.tile_px))
    )
    assert tile.size == 1 and widget.truth_values[tile[0]] > 0
    assert np.nansum(widget.truth_values > 0) == 1
