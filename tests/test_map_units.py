"""Issue 22 without Qt: what a map's number is (percentile within the slide, slide prediction in the
target's unit beside it), what the PNG and the tile CSV's sidecar say, maps clipped to the slide, warnings on
the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_he2rna.maps import exports, gene_sets, heatmaps, map_display, map_style, readout, scoring
from napari_he2rna.maps import session as slide_session
from napari_he2rna.model import ood
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.slides.tiling import TileGrid
from napari_he2rna.validation.metrics import read_tile_scores

GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MS4A1", "MKI67", "GAPDH"]
DIM = 6


def _bundle(path: Path, reference: dict | None = None, validation_r: dict | None = None) -> Path:
    import torch

    torch.manual_seed(0)
    meta: dict = {"output_unit": "log10(1+FPKM-UQ)"}
    if reference is not None:
        meta[ood.REFERENCE_KEY] = reference
    if validation_r is not None:
        meta["validation_r"] = validation_r
    nets = [HE2RNA(DIM, len(GENES), hidden=(16,), dropout=0.0).eval() for _ in range(2)]
    return save_bundle(path, nets, GENES, "toy", DIM, 112.0, [1, 2, 5], metadata=meta)


@pytest.fixture(scope="module")
def cmu_grid(cmu_slide):
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.slides.tiling import tile_grid

    with open_slide(cmu_slide) as s:
        return tile_grid(s, tile_um=112.0)


def _session(cmu_slide, grid, model: Path, shift: float = 0.0):
    s = slide_session.SlideSession.open(cmu_slide, model=load_bundle(model))
    feats = np.random.default_rng(0).normal(size=(len(grid.table), DIM)).astype(np.float32) + shift
    s.set_features(grid, feats, "toy")
    return s


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(1)
    return ood.fit_reference(rng.normal(size=(40, DIM)).astype(np.float32) for _ in range(8))


@pytest.fixture()
def like_training(cmu_slide, cmu_grid, reference, tmp_path):
    s = _session(cmu_slide, cmu_grid, _bundle(tmp_path / "m.safetensors", reference))
    yield s
    s.close()


@pytest.fixture()
def far_from_training(cmu_slide, cmu_grid, reference, tmp_path):
    s = _session(cmu_slide, cmu_grid, _bundle(tmp_path / "m.safetensors", reference), shift=25.0)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------ the number
def test_percentile_within_and_of_one_tile_agree():
    v = np.array([3.0, 1.0, np.nan, 2.0, 2.0, -3000.0])
    p = map_style.percentile_within(v)
    assert p[1] == pytest.approx(25.0) and p[0] == 100.0 and p[5] == 0.0 and np.isnan(p[2])
    assert p[3] == p[4] == pytest.approx(62.5)  # ties share their average rank
    for i in range(len(v)):
        assert map_style.percentile_of(v, i) == pytest.approx(p[i], nan_ok=True)
    assert map_style.percentile_within([np.nan, 4.0]).tolist()[1] == 50.0


def test_fade_setting_and_styled_colours(monkeypatch):
    rgba = np.tile([0.9, 0.2, 0.1, 1.0], (256, 1))
    assert map_style.heatmap_fade() == map_style.DEFAULT_FADE
    faded = map_style.styled_colors(rgba, map_style.heatmap_fade())
    assert faded[0, 3] == 0.0 and faded[-1, 3] == 1.0 and faded[64, 3] == pytest.approx(0.5, abs=0.01)
    monkeypatch.setenv(map_style.FADE_ENV, "0")  # no fade: every tile opaque (the layer's opacity stays)
    assert (map_style.styled_colors(rgba, map_style.heatmap_fade())[:, 3] == 1.0).all()
    monkeypatch.setenv(map_style.FADE_ENV, "not a number")
    assert map_style.heatmap_fade() == map_style.DEFAULT_FADE
    grey = map_style.styled_colors(rgba, 0.0, grey=True, band=0.5)
    assert np.allclose(grey[0, :3], grey[0, 0]) and (grey[127] == 1.0).all()  # grey, a white mark


def test_map_of_a_set_is_its_percentile_with_the_slide_prediction_beside_it(like_training):
    s = like_training
    view = map_display.map_view(s, "T cells")
    assert view.limits == (0.0, 100.0) and view.units == map_style.PERCENTILE_UNITS
    shown = heatmaps.tile_values(view.raster, s.grid)
    np.testing.assert_allclose(shown, map_style.percentile_within(s.scores("T cells")), rtol=1e-6)
    prediction = float(s.slide_predictions(["T cells"]).iloc[0])
    assert view.legend.splitlines()[:3] == [
        "T cells",
        "mean of CD3D, CD3E, CD3G, CD247",
        map_style.PERCENTILE_UNITS,
    ]
    assert f"slide prediction {map_style.number(prediction)} log10(1+FPKM-UQ)" in view.legend
    # the fold spread: in percentile points, its own colormap
    spread = map_display.map_view(s, "T cells", "uncertainty")
    assert spread.colormap == "viridis" and spread.units == map_style.SPREAD_UNITS
    assert "fold spread" in spread.legend and np.nanmax(spread.raster) > 0  # two different folds


def test_hover_reads_the_percentile_and_the_tile_score():
    scores = {"T cells": np.array([0.5, 2.0, 1.0]), gene_sets.DISTANCE_NAME: np.array([1.0, 2.5, 0.5])}
    text = readout.hover_text(1, scores, ood.DISTANCE_UNITS, tile_id=7)
    assert text.startswith("tile 7 · T cells 100th percentile (tile score 2)")
    assert f"{gene_sets.DISTANCE_NAME} 2.5" in text
    distance = {gene_sets.DISTANCE_NAME: scores[gene_sets.DISTANCE_NAME]}
    only = readout.hover_text(0, distance, ood.DISTANCE_UNITS)
    assert only.endswith(f"[{ood.DISTANCE_UNITS}]")


def test_short_distance_name_is_accepted():
    for name in ("feature distance", "Feature  Distance", "feature_distance", gene_sets.DISTANCE_NAME):
        assert gene_sets.is_distance_name(name)
    assert not gene_sets.is_distance_name("distance")


def test_model_r_summary_is_over_the_marked_genes(tmp_path, reference):
    vr = {"BRCA": {g: (0.8 if i < 3 else 0.02) for i, g in enumerate(GENES)}}
    bundle = load_bundle(_bundle(tmp_path / "r.safetensors", reference, vr))
    text = readout.r_summary(bundle)
    assert f"median 0.80 over the 3 {readout.MARK} genes" in text and "all 8 genes: 0.02" in text


# ------------------------------------------------------------------------------------------ clipped maps
def test_display_raster_stops_at_the_slide_edge_and_follows_the_tissue():
    table = pd.DataFrame({"tile_id": [0, 3], "row": [0, 1], "col": [0, 1], "x": [0, 100], "y": [0, 100]})
    table["size"], table["tissue_fraction"] = 100, 1.0
    grid = TileGrid(table, 100, 50.0, 0.5, 2, 2, (150, 130))  # the last tiles are half / a third inside
    f = 4
    raster = heatmaps.display_raster(grid, [1.0, 2.0], f)
    assert raster.shape == (8, 8)
    side = 100 / f
    cols = np.flatnonzero(np.isfinite(raster).any(axis=0))
    rows = np.flatnonzero(np.isfinite(raster).any(axis=1))
    assert (cols[-1] + 1) * side <= 150 and (rows[-1] + 1) * side <= 130  # never past the edge
    assert cols[-1] >= 5 and rows[-1] >= 4  # the partial tiles are painted up to it
    mask = np.zeros((130, 150), dtype=bool)
    mask[:, :60] = True  # tissue on the left only
    cover = heatmaps.tissue_cover(grid, mask, f)
    clipped = heatmaps.display_raster(grid, [1.0, 2.0], f, cover)
    assert np.isfinite(clipped[:, :2]).any() and not np.isfinite(clipped[:4, 3:4]).any()
    assert np.isfinite(clipped[4:, 4:]).any()  # a kept tile without tissue in this mask keeps its pixels
    np.testing.assert_allclose(heatmaps.tile_values(clipped, grid), [1.0, 2.0])


# ------------------------------------------------------------------------------------------ files
def _png_text(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def test_png_says_name_unit_set_members_and_prediction(like_training, tmp_path):
    s = like_training
    path = s.render_png(tmp_path / "t.png", "T cells")
    text = _png_text(path)
    assert text["Title"] == f"T cells — {Path(s.slide.path).name}"
    assert "mean of CD3D, CD3E, CD3G, CD247" in text["Description"]
    assert map_style.PERCENTILE_UNITS in text["Description"]
    assert "slide prediction" in text["Description"] and "log10(1+FPKM-UQ)" in text["Description"]
    assert "Warning" not in text and "NOT A PREDICTION" not in text["Description"]
    d = _png_text(s.render_png(tmp_path / "d.png", "feature distance"))
    assert ood.DISTANCE_UNITS in d["Description"]
    assert "tile threshold of the training data" in d["Description"]


def test_png_outside_the_training_data_is_marked_and_grey(far_from_training, tmp_path):
    s = far_from_training
    assert s.assessment().features_outside
    text = _png_text(s.render_png(tmp_path / "t.png", "MKI67"))
    assert text["Description"].startswith("NOT A PREDICTION") and text["Warning"].startswith("WARNING")
    pixels = np.asarray(Image.open(tmp_path / "t.png").convert("RGB")).astype(int)
    # no saturated magma colours: the map is grey (the red warning and hatching aside)
    magma_like = (pixels[..., 0] - pixels[..., 2] > 60) & (pixels[..., 1] < 120) & (pixels[..., 0] > 150)
    assert magma_like.mean() < 0.05
    # the distance is measured, not predicted: in colour, with the warning
    d = _png_text(s.render_png(tmp_path / "d.png", "feature distance"))
    assert "Warning" in d and not d["Description"].startswith("NOT A PREDICTION")


def test_csv_sidecar_gives_each_column_its_unit_and_the_table_reads_back(like_training, tmp_path):
    s = like_training
    csv, _ = s.export_csv(tmp_path / "s.csv", ["T cells", "MKI67"])
    header = csv.read_text().splitlines()[0].split(",")
    assert header == [*exports.TILE_CSV_COLUMNS, "T cells", "MKI67", ood.DISTANCE_COLUMN]  # layout kept
    meta = json.loads(exports.tile_metadata_path(csv).read_text())
    tile_unit = readout.tile_score_units(scoring.SCORE_UNITS)
    want = {"T cells": tile_unit, "MKI67": tile_unit, ood.DISTANCE_COLUMN: ood.DISTANCE_UNITS}
    assert meta["column_units"] == want
    assert meta["units"] == tile_unit and meta["slide_prediction_units"] == scoring.SCORE_UNITS
    assert meta["map_units"] == map_style.PERCENTILE_UNITS
    grid, scores = read_tile_scores(csv)  # TileGrid.from_table still reads it
    assert len(grid.table) == len(s.grid.table) and list(scores.columns)[:2] == ["T cells", "MKI67"]
    np.testing.assert_allclose(scores["MKI67"], s.scores("MKI67"), rtol=1e-5)
