"""maps/gene_sets, scoring, heatmaps and exports: gene sets, tile scores, heatmap geometry and the exports
(CSV, GeoJSON, TIFF, PNG)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import napari_he2rna
from napari_he2rna.errors import GeneError, He2rnaError
from napari_he2rna.maps import exports, gene_sets, heatmaps, readout, scoring
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.slides.tiling import TileGrid

GENES = ["CD3D", "CD3E", "CD3G", "CD19", "MKI67", "KRT8", "GAPDH", "ACTB"]  # no CD247/MS4A1/TP63/KRT18
DIM = 12


def make_grid(tiles: list[tuple[int, int]], tile_px: int = 224, mpp: float = 0.5, n_rows=4, n_cols=5):
    """A TileGrid with the given (row, col) tiles kept."""
    rows = np.array([r for r, _ in tiles])
    cols = np.array([c for _, c in tiles])
    table = pd.DataFrame(
        {
            "tile_id": np.arange(len(tiles)),
            "row": rows,
            "col": cols,
            "x": cols * tile_px,
            "y": rows * tile_px,
            "size": np.full(len(tiles), tile_px),
            "tissue_fraction": np.linspace(0.5, 1.0, len(tiles)),
        }
    )
    return TileGrid(
        table=table,
        tile_px=tile_px,
        tile_um=tile_px * mpp,
        mpp=mpp,
        n_rows=n_rows,
        n_cols=n_cols,
        slide_dimensions=(n_cols * tile_px, n_rows * tile_px),
    )


TILES = [(0, 1), (1, 1), (1, 2), (2, 0), (3, 4), (2, 3)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    models = [HE2RNA(DIM, len(GENES), hidden=(8,), dropout=0.0) for _ in range(2)]
    path = save_bundle(
        tmp_path_factory.mktemp("model") / "m.safetensors",
        models,
        GENES,
        "hed-stats",
        DIM,
        112.0,
        [1, 2],
        demo=True,
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(1).normal(size=(len(TILES), DIM)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- geometry
def test_heatmap_raster_puts_each_tile_at_its_row_col_and_nan_elsewhere():
    grid = make_grid(TILES)
    values = np.arange(len(TILES), dtype=np.float64) + 10
    raster = heatmaps.heatmap_raster(grid, values)
    assert raster.shape == (4, 5) and raster.dtype == np.float32
    for (r, c), v in zip(TILES, values, strict=True):
        assert raster[r, c] == v
    assert np.isnan(raster).sum() == 4 * 5 - len(TILES)
    with pytest.raises(ValueError):
        heatmaps.heatmap_raster(grid, values[:-1])


def test_heatmap_transform_puts_pixel_centre_on_tile_centre_in_um():
    tile_px, mpp = 224, 0.4987
    grid = make_grid(TILES, tile_px=tile_px, mpp=mpp)
    (sy, sx), (ty, tx) = heatmaps.heatmap_transform(grid)
    assert sy == sx == pytest.approx(tile_px * mpp)
    assert ty == tx == pytest.approx((tile_px - 1) / 2 * mpp)
    for _, t in grid.table.iterrows():
        # Slide layer (scale = mpp): level-0 pixel i is centred at i * mpp µm; the tile's centre pixel
        # coordinate is x + (T - 1) / 2.
        centre_x_um = (t.x + (tile_px - 1) / 2) * mpp
        centre_y_um = (t.y + (tile_px - 1) / 2) * mpp
        assert t.col * sx + tx == pytest.approx(centre_x_um)
        assert t.row * sy + ty == pytest.approx(centre_y_um)


def test_robust_limits():
    v = np.r_[np.arange(101, dtype=float), np.nan, np.inf]
    lo, hi = heatmaps.robust_limits(v, (1, 99))
    assert (lo, hi) == pytest.approx((1.0, 99.0))
    assert heatmaps.robust_limits(np.full(5, 2.0)) == (1.5, 2.5)
    assert heatmaps.robust_limits(np.full(3, np.nan)) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------- names
def test_resolve_genes_sets_and_case(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gene_sets.PartialGeneSetWarning)
        out = gene_sets.resolve_names(bundle.genes, ["mki67", "T cells", "proliferation"])
    assert out == {"MKI67": ["MKI67"], "T cells": ["CD3D", "CD3E", "CD3G"], "proliferation": ["MKI67"]}


def test_unknown_gene_raises_with_suggestion(bundle):
    with pytest.raises(GeneError, match="CD3DX.*Did you mean 'CD3D'"):
        gene_sets.resolve_names(bundle.genes, ["CD3DX"])
    with pytest.raises(GeneError, match="Did you mean 'T cells'"):
        gene_sets.resolve_names(bundle.genes, ["T-cells"])
    with pytest.raises(GeneError):
        gene_sets.resolve_names(bundle.genes, ["  "])


def test_partial_set_warns_and_empty_set_errors(bundle):
    with pytest.warns(gene_sets.PartialGeneSetWarning, match="CD247"):
        out = gene_sets.resolve_names(bundle.genes, ["T cells"])
    assert out["T cells"] == ["CD3D", "CD3E", "CD3G"]
    with pytest.raises(GeneError, match="none of the genes"):
        gene_sets.resolve_names(bundle.genes, ["mine"], gene_sets={"mine": ["FOO1", "BAR2"]})


def test_parse_gene_sets_inline_json_gmt(tmp_path):
    assert gene_sets.parse_gene_sets("immune=CD3D+CD19; prolif = MKI67,TOP2A") == {
        "immune": ["CD3D", "CD19"],
        "prolif": ["MKI67", "TOP2A"],
    }
    j = tmp_path / "sets.json"
    j.write_text(json.dumps({"a": ["X", "Y", "X"]}))
    assert gene_sets.parse_gene_sets(j) == {"a": ["X", "Y"]}
    g = tmp_path / "sets.gmt"
    g.write_text("# comment\nHALLMARK_X\thttp://x\tG1\tG2\n\nmine=G3+G4\n")
    assert gene_sets.parse_gene_sets(str(g)) == {"HALLMARK_X": ["G1", "G2"], "mine": ["G3", "G4"]}
    for bad in ("justtext", "=G1", "empty="):
        with pytest.raises(GeneError):
            gene_sets.parse_gene_sets(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(GeneError, match="not valid JSON"):
        gene_sets.parse_gene_sets(broken)


def test_split_names_keeps_spaces_inside_names():
    assert gene_sets.split_names('CD3D, MKI67,"T cells" ,') == ["CD3D", "MKI67", "T cells"]


# ---------------------------------------------------------------------------------------------- scores
def test_score_tiles_set_is_mean_and_only_needed_genes_are_computed(bundle, features):
    asked = []

    class Spy:
        genes = bundle.genes

        def tile_scores(self, f, genes):
            asked.append(list(genes))
            return bundle.tile_scores(f, genes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gene_sets.PartialGeneSetWarning)
        df = scoring.score_tiles(Spy(), features, ["MKI67", "T cells", "CD3D"])
    assert asked == [["MKI67", "CD3D", "CD3E", "CD3G"]]
    assert list(df.columns) == ["MKI67", "T cells", "CD3D"] and len(df) == len(features)
    full = bundle.tile_scores(features, ["CD3D", "CD3E", "CD3G", "MKI67"])
    np.testing.assert_allclose(df["T cells"], full[:, :3].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(df["MKI67"], full[:, 3], rtol=1e-6)
    np.testing.assert_allclose(df["CD3D"], full[:, 0], rtol=1e-6)


def test_slide_predictions_set_is_mean_of_gene_predictions(bundle, features):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gene_sets.PartialGeneSetWarning)
        p = scoring.slide_predictions(bundle, features, ["B cells", "KRT8"])
    genes = bundle.slide_prediction(features, ["CD19", "KRT8"])
    assert p["B cells"] == pytest.approx(float(genes[0]), rel=1e-5)
    assert p["KRT8"] == pytest.approx(float(genes[1]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- exports
@pytest.fixture()
def scored(bundle, features):
    grid = make_grid(TILES)
    scores = scoring.score_tiles(bundle, features, ["MKI67", "CD3D"])
    preds = scoring.slide_predictions(bundle, features, ["MKI67", "CD3D"])
    return grid, scores, preds


def test_tile_csv_round_trip_and_side_file(tmp_path, scored):
    grid, scores, preds = scored
    path, side = exports.write_tile_scores_csv(
        tmp_path / "s.csv", grid, scores, {"slide": "a.svs", "mpp": 0.5}, preds
    )
    assert side == tmp_path / "s_slide.csv"
    assert path.read_text().splitlines()[0] == ",".join(exports.TILE_CSV_COLUMNS + ["MKI67", "CD3D"])
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["format"] == exports.TILE_METADATA_FORMAT and meta["slide"] == "a.svs" and meta["mpp"] == 0.5
    # the score columns are tile scores; only the slide predictions are in the target's unit
    assert meta["units"] == readout.tile_score_units(scoring.SCORE_UNITS)
    assert meta["slide_prediction_units"] == scoring.SCORE_UNITS
    assert meta["package_version"] == napari_he2rna.__version__
    assert meta["score_columns"] == ["MKI67", "CD3D"]
    assert meta["slide_predictions"]["MKI67"] == pytest.approx(float(preds["MKI67"]))
    df = pd.read_csv(path)  # a plain table: no comment line, one header row
    assert list(df.columns) == exports.TILE_CSV_COLUMNS + ["MKI67", "CD3D"]
    np.testing.assert_array_equal(df["tile_id"], grid.table["tile_id"])
    np.testing.assert_array_equal(df["x_px"], grid.table["x"])
    np.testing.assert_allclose(df["y_um"], grid.table["y"] * 0.5)
    np.testing.assert_allclose(df["size_um"], 112.0)
    np.testing.assert_allclose(df["MKI67"], scores["MKI67"], rtol=1e-5)
    s = pd.read_csv(side)
    assert list(s["name"]) == ["MKI67", "CD3D"]
    np.testing.assert_allclose(s["slide_prediction"], preds.to_numpy(), rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.json", "s_slide.csv"]  # no temp files left
    assert path.stat().st_mode & 0o644 == 0o644  # readable by others, not the temp file's 0600


def test_tile_csv_refuses_to_overwrite_unless_asked(tmp_path, scored):
    grid, scores, preds = scored
    target = tmp_path / "s.csv"
    target.write_text("keep me")
    with pytest.raises(exports.OutputExistsError, match="already exists"):
        exports.write_tile_scores_csv(target, grid, scores, None, preds)
    assert target.read_text() == "keep me" and not (tmp_path / "s_slide.csv").exists()
    assert not (tmp_path / "s.json").exists()
    exports.write_tile_scores_csv(target, grid, scores, None, preds, overwrite=True)
    assert len(pd.read_csv(target)) == len(TILES)


def test_unwritable_export_path_is_a_clear_error(tmp_path, scored):
    grid, scores, _ = scored
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for bad in (a_file / "s.csv", tmp_path / "missing" / "s.csv"):
        with pytest.raises(exports.ExportError, match="cannot write"):
            exports.write_tile_scores_csv(bad, grid, scores)
    with pytest.raises(He2rnaError, match="is a folder"):
        exports.write_tile_scores_csv(tmp_path, grid, scores)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        exports.atomic_write(target, failing, overwrite=True)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_geojson_tiles_are_squares_with_measurements(tmp_path, scored):
    grid, scores, _ = scored
    path = exports.write_geojson_tiles(tmp_path / "t.geojson", grid, scores)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(TILES)
    for feat, (_, t), (_, s) in zip(doc["features"], grid.table.iterrows(), scores.iterrows(), strict=True):
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert feat["geometry"]["type"] == "Polygon" and ring.shape == (5, 2)
        assert (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() == t.x and ring[:, 0].max() == t.x + t["size"]
        assert ring[:, 1].min() == t.y and ring[:, 1].max() == t.y + t["size"]
        props = feat["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["MKI67"] == pytest.approx(s["MKI67"], rel=1e-5)
    with pytest.raises(exports.OutputExistsError):
        exports.write_geojson_tiles(path, grid, scores)


def test_anndata_round_trips_and_matches_the_csv(tmp_path, scored):
    anndata = pytest.importorskip("anndata")
    grid, scores, preds = scored
    csv, _ = exports.write_tile_scores_csv(tmp_path / "s.csv", grid, scores, {"slide": "a.svs"}, preds)
    meta = exports.tile_metadata(grid, list(scores.columns), {"slide": "a.svs", "model": None}, preds)
    path = exports.write_anndata(tmp_path / "s.h5ad", grid, scores, meta)
    adata = anndata.read_h5ad(path)
    table = pd.read_csv(csv)
    assert adata.shape == (len(TILES), 2) and list(adata.var_names) == ["MKI67", "CD3D"]
    np.testing.assert_allclose(adata.X, table[["MKI67", "CD3D"]].to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(adata.obsm["spatial"], table[["x_px", "y_px"]].to_numpy())
    np.testing.assert_allclose(adata.obsm["spatial_um"], table[["x_um", "y_um"]].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(adata.obs["tile_id"], table["tile_id"])
    assert list(adata.obs_names) == [str(i) for i in table["tile_id"]]
    uns = adata.uns["napari_he2rna"]
    assert uns["slide"] == "a.svs" and uns["model"] == "" and uns["mpp"] == pytest.approx(0.5)
    assert uns["slide_predictions"]["CD3D"] == pytest.approx(float(preds["CD3D"]))
    with pytest.raises(exports.OutputExistsError):
        exports.write_anndata(path, grid, scores, meta)


def test_geojson_carries_the_metadata_beside_the_features(tmp_path, scored):
    grid, scores, preds = scored
    meta = exports.tile_metadata(grid, list(scores.columns), {"slide": "a.svs", "demo": True}, preds)
    doc = json.loads(
        exports.write_geojson_tiles(tmp_path / "t.geojson", grid, scores, metadata=meta).read_text()
    )
    assert doc["napari_he2rna"]["slide"] == "a.svs" and doc["napari_he2rna"]["demo"] is True
    assert len(doc["features"]) == len(TILES)


def test_heatmap_tiff_is_georeferenced_float32(tmp_path, scored):
    import tifffile

    grid, scores, _ = scored
    raster = heatmaps.heatmap_raster(grid, scores["MKI67"])
    path = exports.write_heatmap_tiff(tmp_path / "h.tif", raster, grid, name="MKI67")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        xres = page.tags["XResolution"].value
        unit = page.tags["ResolutionUnit"].value
        meta = tif.shaped_metadata[0]
    assert arr.dtype == np.float32 and arr.shape == (4, 5)
    np.testing.assert_array_equal(np.isnan(arr), np.isnan(raster))
    assert unit == tifffile.RESUNIT.CENTIMETER
    assert 1e4 / (xres[0] / xres[1]) == pytest.approx(112.0, rel=1e-6)  # µm per heatmap pixel
    assert meta["pixel_size_um"] == pytest.approx(112.0) and meta["origin_um"] == [0.0, 0.0]
    assert meta["name"] == "MKI67"


def test_png_shows_heatmap_over_real_thumbnail(tmp_path, shared_data, scored):
    from PIL import Image

    grid, scores, _ = scored
    thumb = np.asarray(Image.open(shared_data / "thumbnails" / "tcga-lung-rgb.png").convert("RGB"))
    ds = 5 * 224 / thumb.shape[1]  # the thumbnail spans the 5 x 4 tile grid's width
    plain = heatmaps.render_heatmap_png(
        tmp_path / "a.png", thumb, ds, grid, scores["MKI67"], "MKI67", slide_name="lung"
    )
    demo = heatmaps.render_heatmap_png(
        tmp_path / "b.png", thumb, ds, grid, scores["MKI67"], "MKI67", slide_name="lung", demo=True
    )
    img = np.asarray(Image.open(plain).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank, not one colour
    assert not np.array_equal(img, np.asarray(Image.open(demo).convert("RGB")))  # the demo notice shows
    with pytest.raises(exports.OutputExistsError):
        heatmaps.render_heatmap_png(plain, thumb, ds, grid, scores["MKI67"], "MKI67")
