"""Ground truth per tile: QuPath detections, masks and annotations, on the synthetic cohort's planted truth
and on real QuPath exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.errors import DataError
from napari_he2rna.slides.tiling import TileGrid
from napari_he2rna.validation import cells as cell_io
from napari_he2rna.validation.annotations import (
    annotation_fraction_per_tile,
    annotation_labels,
    annotation_shapes_um,
    read_annotations,
)
from napari_he2rna.validation.cells import cell_counts_per_tile, read_qupath_detections
from napari_he2rna.validation.masks import mask_fraction_per_tile, read_mask
from napari_he2rna.validation.transform import Alignment
from napari_he2rna.validation.truth import load_truth

REPO = Path(__file__).resolve().parents[1]


def grid_from_truth_table(tiles: pd.DataFrame, dims: tuple[int, int], mpp: float, tile_px: int) -> TileGrid:
    table = tiles[["row", "col", "x", "y", "size", "tissue_fraction"]].copy()
    n_rows, n_cols = int(tiles["row"].max()) + 1, int(tiles["col"].max()) + 1
    table.insert(0, "tile_id", (table["row"] * n_cols + table["col"]).to_numpy())
    return TileGrid(table, tile_px, tile_px * mpp, mpp, n_rows, n_cols, dims)


def square_grid(n_rows: int, n_cols: int, tile_px: int = 100, mpp: float = 0.5, dims=None) -> TileGrid:
    rr, cc = np.mgrid[0:n_rows, 0:n_cols]
    table = pd.DataFrame({"tile_id": (rr * n_cols + cc).ravel(), "row": rr.ravel(), "col": cc.ravel()})
    table["x"], table["y"], table["size"] = table["col"] * tile_px, table["row"] * tile_px, tile_px
    table["tissue_fraction"] = 1.0
    dims = dims or (n_cols * tile_px, n_rows * tile_px)
    return TileGrid(table, tile_px, tile_px * mpp, mpp, n_rows, n_cols, dims)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """One small synthetic slide with its truth files (the sample cohort's generator)."""
    from napari_he2rna import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    t = synthetic.make_slide(out / "s1.tiff", seed=11, size_px=(1120, 896))
    tiles = pd.read_csv(out / "s1_tiles.csv")
    grid = grid_from_truth_table(tiles, t.dimensions, t.mpp, t.tile_px)
    return {"dir": out, "tiles": tiles, "grid": grid, "mpp": t.mpp, "dims": t.dimensions, "id": "s1"}


# ---------------------------------------------------------------------------------------------------------
# Cell detections


def test_cd3_counts_equal_planted_truth(synthetic_slide):
    s = synthetic_slide
    cells = read_qupath_detections(
        s["dir"] / "s1_CD3.tsv", s["mpp"], classes="Positive", slide_dimensions=s["dims"]
    )
    counts = cell_counts_per_tile(cells, s["grid"])
    assert counts.sum() > 20  # the slide has T cells to count
    np.testing.assert_array_equal(counts, s["tiles"]["t_cells"].to_numpy())
    assert cells.attrs["unit"] == "µm"
    assert set(cells.attrs["classes"]) == {"Positive", "Negative"}


def test_committed_sample_counts_equal_truth():
    tsv = REPO / "sample_data" / "sample_slide_CD3.tsv"
    tiles_csv = REPO / "sample_data" / "sample_slide_tiles.csv"
    side = REPO / "sample_data" / "sample_slide_epithelium_mask.json"
    assert tsv.is_file() and tiles_csv.is_file() and side.is_file(), "committed sample truth files missing"
    meta = json.loads(side.read_text())
    tiles = pd.read_csv(tiles_csv)
    mpp = float(meta["mpp"]) / float(meta["downsample"])
    grid = grid_from_truth_table(tiles, tuple(meta["slide_dimensions"]), mpp, int(tiles["size"].iloc[0]))
    cells = read_qupath_detections(tsv, mpp, classes="Positive", slide_dimensions=grid.slide_dimensions)
    np.testing.assert_array_equal(cell_counts_per_tile(cells, grid), tiles["t_cells"].to_numpy())
    b_cells = load_truth(REPO / "sample_data" / "sample_slide_CD20.tsv", mpp, classes="Positive")
    np.testing.assert_array_equal(b_cells.per_tile(grid), tiles["b_cells"].to_numpy())
    mask = load_truth(REPO / "sample_data" / "sample_slide_epithelium_mask.png", mpp)
    np.testing.assert_allclose(mask.per_tile(grid), tiles["epithelium_fraction"], atol=1e-4)
    polys = read_annotations(REPO / "sample_data" / "sample_slide_tumor.geojson", classes="Tumor")
    frac = annotation_fraction_per_tile(polys, grid, samples_per_tile=16)
    np.testing.assert_allclose(frac, tiles["tumor_fraction"], atol=0.03)


def test_table_variants_read_alike(synthetic_slide, tmp_path):
    """Greek mu, `Classification`, pixel columns, CSV, empty class cells and NaN centroids."""
    s = synthetic_slide
    src = s["dir"] / "s1_CD3.tsv"
    expected = s["tiles"]["t_cells"].to_numpy()
    text = src.read_text(encoding="utf-8")
    greek = tmp_path / "greek.tsv"
    greek.write_text(text.replace("\u00b5", "\u03bc"), encoding="utf-8")
    assert "\u03bc" in greek.read_text(encoding="utf-8")
    cells = read_qupath_detections(greek, s["mpp"], classes="Positive")
    np.testing.assert_array_equal(cell_counts_per_tile(cells, s["grid"]), expected)

    table = pd.read_csv(src, sep="\t")
    px = table.rename(columns={"Class": "Classification"})
    px["Centroid X px"] = px.pop("Centroid X µm") / s["mpp"]
    px["Centroid Y px"] = px.pop("Centroid Y µm") / s["mpp"]
    extra = px.iloc[:2].copy()
    extra["Classification"] = ""  # unclassified: empty cell
    extra.loc[extra.index[0], "Centroid X px"] = np.nan  # written `NaN` by QuPath
    px = pd.concat([px, extra], ignore_index=True)
    path = tmp_path / "px.csv"
    px.to_csv(path, index=False, na_rep="NaN")
    cells = read_qupath_detections(path, None, classes="Positive")
    assert cells.attrs["unit"] == "px"
    np.testing.assert_array_equal(cell_counts_per_tile(cells, s["grid"]), expected)
    everything = read_qupath_detections(path, None)
    assert everything.attrs["classes"]["Unclassified"] == 1  # the NaN-centroid row is dropped
    assert everything.attrs["n_missing_centroid"] == 1


def test_geojson_cell_polygons_count_by_centroid(synthetic_slide, tmp_path):
    """QuPath GeoJSON cells (polygons, derived `names` classes, bare list) are counted at their centroid."""
    s = synthetic_slide
    table = pd.read_csv(s["dir"] / "s1_CD3.tsv", sep="\t")
    feats = []
    for _, r in table.iterrows():
        x, y = r["Centroid X µm"] / s["mpp"], r["Centroid Y µm"] / s["mpp"]
        # an L-shaped cell whose area-weighted centroid is (x, y): a vertex mean would be off
        ring = np.array([[0, 0], [6, 0], [6, 2], [2, 2], [2, 6], [0, 6], [0, 0]], float)
        ring -= np.array([11 / 5, 11 / 5])  # the L's centroid, to put it at (x, y)
        ring += [x, y]
        cls = {"names": ["Tumor", r["Class"]]} if r["Class"] == "Positive" else {"name": "Negative"}
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                "properties": {"objectType": "cell", "classification": cls},
            }
        )
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps(feats))  # a bare list, as QuPath scripts write
    cells = read_qupath_detections(path, s["mpp"], classes="Positive", slide_dimensions=s["dims"])
    assert set(cells["cls"]) == {"Tumor: Positive"}
    counts = cell_counts_per_tile(cells, s["grid"])
    np.testing.assert_array_equal(counts, s["tiles"]["t_cells"].to_numpy())


def test_centroid_without_shapely_matches(monkeypatch):
    geom = {
        "type": "Polygon",
        "coordinates": [
            [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
            [[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]],  # a hole in the top-left quarter
        ],
    }
    with_lib = cell_io._polygon_centroid(geom)
    monkeypatch.setattr(cell_io, "shapely", None)
    own = cell_io._polygon_centroid(geom)
    np.testing.assert_allclose(own, with_lib)
    np.testing.assert_allclose(own, (35 / 6, 35 / 6))  # (100*5 - 25*2.5) / 75


def test_real_qupath_geojson_imports(shared_data):
    q = shared_data / "qupath"
    cells = read_qupath_detections(q / "Single_cells.geojson", None)
    assert len(cells) == 121  # the cells; its point annotations are not cells when detections exist
    assert set(cells["cls"]) == {"single_cells_demo"}
    assert cells["x_px"].between(0, 1000).all() and cells["y_px"].between(0, 900).all()
    points = read_qupath_detections(q / "TD_01_verysmall_mIF.geojson", None)
    assert len(points) == 3  # a file with only point annotations: a manual count
    polys = read_annotations(q / "TD_01_verysmall_mIF.geojson")
    assert len(polys) == 6
    assert sorted({p.cls for p in polys}) == ["class_1", "class_2"]
    circles = read_annotations(q / "Single_cells.geojson", classes="circles")
    assert len(circles) == 4 and all(p.cls == "circles" for p in circles)
    shapely = pytest.importorskip("shapely")
    grid = square_grid(10, 10, tile_px=100)
    frac = annotation_fraction_per_tile(polys, grid, samples_per_tile=20)
    union = shapely.union_all([shapely.Polygon(p.exterior, p.holes) for p in polys])
    assert frac.sum() * 100 * 100 == pytest.approx(union.area, rel=0.03)


def test_real_table_without_centroids_is_explained(shared_data):
    with pytest.raises(DataError, match="no centroid columns"):
        read_qupath_detections(shared_data / "qupath" / "MKProject_measurements.tsv", 0.5)


@pytest.mark.parametrize("name", ["P1_S1.geojson", "multiclass_cells.geojson"])
def test_zero_byte_files_are_explained(shared_data, name):
    with pytest.raises(DataError, match="empty"):
        read_qupath_detections(shared_data / "qupath" / name, 0.5)
    with pytest.raises(DataError, match="empty"):
        read_annotations(shared_data / "qupath" / name)


def test_cells_from_another_image_are_detected(synthetic_slide, tmp_path):
    s = synthetic_slide
    table = pd.read_csv(s["dir"] / "s1_CD3.tsv", sep="\t")
    table["Centroid X µm"] += 3000.0  # a region 3 mm away on another slide
    table["Centroid Y µm"] += 1500.0
    path = tmp_path / "other.tsv"
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match=r"another image \(\d+ of \d+ centroids fall outside the 560x448 µm"):
        read_qupath_detections(path, s["mpp"], slide_dimensions=s["dims"])
    cells = read_qupath_detections(path, s["mpp"])
    with pytest.raises(DataError, match="another image"):
        cell_counts_per_tile(cells, s["grid"])  # checked when binning too


def test_pixels_mistaken_for_microns_are_detected(synthetic_slide, tmp_path):
    s = synthetic_slide
    table = pd.read_csv(s["dir"] / "s1_CD3.tsv", sep="\t")
    table["Centroid X µm"] /= s["mpp"]  # QuPath without a pixel size: "µm" that are pixels
    table["Centroid Y µm"] /= s["mpp"]
    path = tmp_path / "nopixelsize.tsv"
    table.to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match="all fit when read as pixels"):
        read_qupath_detections(path, s["mpp"], slide_dimensions=s["dims"])


def test_empty_class_lists_classes_present(synthetic_slide):
    s = synthetic_slide
    classes = r"(Negative \(\d+\), Positive|Positive \(\d+\), Negative) \(\d+\)"
    with pytest.raises(DataError, match=r"'CD8\+'.*classes present are: " + classes):
        read_qupath_detections(s["dir"] / "s1_CD3.tsv", s["mpp"], classes="CD8+")
    cells = read_qupath_detections(s["dir"] / "s1_CD3.tsv", s["mpp"], classes="positive")
    assert len(cells) == s["tiles"]["t_cells"].sum()  # case-insensitive fallback


def test_alignment_recovers_shifted_scan(synthetic_slide, tmp_path):
    s = synthetic_slide
    table = pd.read_csv(s["dir"] / "s1_CD3.tsv", sep="\t")
    table["Centroid X µm"] -= 20.0  # the IHC scan is 20 µm left, 10 µm up of the H&E
    table["Centroid Y µm"] -= 10.0
    path = tmp_path / "shifted.tsv"
    table.to_csv(path, sep="\t", index=False)
    cells = read_qupath_detections(path, s["mpp"], classes="Positive")
    expected = s["tiles"]["t_cells"].to_numpy()
    assert not np.array_equal(cell_counts_per_tile(cells, s["grid"], check=False), expected)
    align = Alignment.from_offset_scale((20.0, 10.0))
    np.testing.assert_array_equal(cell_counts_per_tile(cells, s["grid"], alignment=align), expected)


def test_alignment_affine_and_landmarks():
    a = Alignment.from_offset_scale((5.0, -3.0), scale=(2.0, 0.5), rotation_deg=30)
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [7.0, 3.0]])
    moved = a.apply_um(pts)
    np.testing.assert_allclose(moved[0], (5.0, -3.0))
    np.testing.assert_allclose(a.inverse().apply_um(moved), pts, atol=1e-9)
    fitted = Alignment.from_landmarks(pts, moved)
    np.testing.assert_allclose(fitted.affine, a.affine, atol=1e-9)
    assert Alignment().is_identity and not a.is_axis_aligned
    with pytest.raises(DataError):
        Alignment.from_affine(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# Masks


def test_mask_fraction_equals_planted_epithelium(synthetic_slide):
    s = synthetic_slide
    mask = read_mask(s["dir"] / "s1_epithelium_mask.png")
    assert mask.ndim == 2
    expected = s["tiles"]["epithelium_fraction"].to_numpy()
    assert expected.max() > 0.2
    by_size = mask_fraction_per_tile(mask, s["grid"])
    by_mpp = mask_fraction_per_tile(mask, s["grid"], mask_mpp=8 * s["mpp"])
    np.testing.assert_allclose(by_size, expected, atol=1e-4)
    np.testing.assert_allclose(by_mpp, expected, atol=1e-4)


def test_mask_aspect_mismatch_is_detected(synthetic_slide):
    s = synthetic_slide
    mask = read_mask(s["dir"] / "s1_epithelium_mask.png")
    with pytest.raises(DataError, match="aspect"):
        mask_fraction_per_tile(mask[:, : mask.shape[1] // 2], s["grid"])
    # within 2 %: a one-pixel rounding of a downsampled export is fine
    mask_fraction_per_tile(mask[:-1], s["grid"])
    far = Alignment.from_offset_scale((10_000.0, 0.0))
    with pytest.raises(DataError, match="covers none of the slide"):
        mask_fraction_per_tile(mask, s["grid"], mask_downsample=8, alignment=far)


def test_label_mask_and_coarse_mask():
    grid = square_grid(4, 6, tile_px=100)
    labels = np.zeros((400, 600), np.uint16)
    labels[:200, :300] = 3  # tiles (0-1, 0-2)
    labels[200:, 300:] = 7
    frac3 = mask_fraction_per_tile(labels, grid, positive=3)
    raster = frac3.reshape(4, 6)
    np.testing.assert_array_equal(raster[:2, :3], 1.0)
    assert raster.sum() == 6
    np.testing.assert_array_equal(mask_fraction_per_tile(labels, grid), (labels > 0)[::100, ::100].ravel())
    coarse = np.zeros((2, 3), bool)  # one mask pixel per 2x2 tiles: coarser than the tiles
    coarse[0, 0] = True
    frac = mask_fraction_per_tile(coarse, grid).reshape(4, 6)
    np.testing.assert_array_equal(frac[:2, :2], 1.0)
    assert frac.sum() == 4


def test_real_ki67_colour_mask(shared_data):
    path = shared_data / "ihc_ki67" / "groundtruth" / "22_2.png"
    with pytest.raises(DataError, match="colour image"):
        read_mask(path)
    red = read_mask(path, channel="red")
    assert red.shape == (512, 512)
    grid = square_grid(4, 4, tile_px=128, dims=(512, 512))
    frac = mask_fraction_per_tile(red, grid)
    expected = (red > 0).reshape(4, 128, 4, 128).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(frac, expected)
    assert 0 < frac.mean() < 0.2


# ---------------------------------------------------------------------------------------------------------
# Annotations


def _write_features(path: Path, geoms: list[tuple[dict, str]]) -> Path:
    feats = [
        {
            "type": "Feature",
            "geometry": g,
            "properties": {"objectType": "annotation", "classification": {"name": c, "color": [1, 2, 3]}},
        }
        for g, c in geoms
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_annotation_holes_are_honoured(tmp_path):
    outer = [[0, 0], [600, 0], [600, 600], [0, 600], [0, 0]]
    hole = [[200, 200], [400, 200], [400, 400], [200, 400], [200, 200]]
    normal = [[600, 0], [800, 0], [800, 200], [600, 200], [600, 0]]
    path = _write_features(
        tmp_path / "a.geojson",
        [
            ({"type": "Polygon", "coordinates": [outer, hole]}, "Tumor"),
            ({"type": "Polygon", "coordinates": [normal]}, "Normal"),
        ],
    )
    tumour = read_annotations(path, classes="Tumor")
    assert len(tumour) == 1 and len(tumour[0].holes) == 1
    grid = square_grid(8, 8, tile_px=100)
    frac = annotation_fraction_per_tile(tumour, grid).reshape(8, 8)
    np.testing.assert_array_equal(frac[2:4, 2:4], 0.0)  # the hole
    np.testing.assert_array_equal(frac[:2, :6], 1.0)
    assert frac.sum() == 36 - 4
    labels = annotation_labels(grid, tumour, negative=read_annotations(path, classes="Normal"))
    labels = labels.reshape(8, 8)
    assert labels[0, 0] == 1.0 and labels[0, 6] == 0.0 and np.isnan(labels[7, 7]) and labels[2, 2] != 1.0
    shapes, classes = annotation_shapes_um(tumour, mpp=0.5)
    assert classes == ["Tumor", "Tumor (hole)"]
    np.testing.assert_allclose(shapes[1][0], (100.0, 100.0))  # (y, x) µm


def test_invalid_polygon_is_repaired(tmp_path):
    pytest.importorskip("shapely")
    bowtie = [[0, 0], [400, 400], [400, 0], [0, 400], [0, 0]]  # self-intersecting
    path = _write_features(
        tmp_path / "bow.geojson", [({"type": "Polygon", "coordinates": [bowtie]}, "Tumor")]
    )
    polys = read_annotations(path)
    assert polys and all(p.repaired for p in polys)
    frac = annotation_fraction_per_tile(polys, square_grid(4, 4, tile_px=100), samples_per_tile=8)
    assert frac.sum() == pytest.approx(8.0, abs=0.5)  # two triangles of 4 tiles' area each


def test_annotation_fraction_matches_planted_tumour(synthetic_slide):
    s = synthetic_slide
    polys = read_annotations(s["dir"] / "s1_tumor.geojson", classes="Tumor")
    frac = annotation_fraction_per_tile(polys, s["grid"], samples_per_tile=16)
    expected = s["tiles"]["tumor_fraction"].to_numpy()
    assert expected.max() > 0.5
    np.testing.assert_allclose(frac, expected, atol=0.03)


def test_annotations_only_file_is_not_cells(tmp_path):
    sq = [[0, 0], [10, 0], [10, 10], [0, 0]]
    path = _write_features(tmp_path / "ann.geojson", [({"type": "Polygon", "coordinates": [sq]}, "Tumor")])
    with pytest.raises(DataError, match="load it as annotations"):
        read_qupath_detections(path, 0.5)


def test_load_truth_guesses_kind_and_rebins(synthetic_slide, shared_data):
    s = synthetic_slide
    cells = load_truth(s["dir"] / "s1_CD3.tsv", s["mpp"], classes="Positive")
    assert cells.kind == "cells" and cells.label == "cell count (Positive)"
    np.testing.assert_array_equal(cells.per_tile(s["grid"]), s["tiles"]["t_cells"].to_numpy())
    mask = load_truth(s["dir"] / "s1_epithelium_mask.png", s["mpp"])
    assert mask.kind == "mask"
    np.testing.assert_allclose(mask.per_tile(s["grid"]), s["tiles"]["epithelium_fraction"], atol=1e-4)
    tumour = load_truth(s["dir"] / "s1_tumor.geojson", s["mpp"], classes="Tumor")
    assert tumour.kind == "annotations"
    labels = tumour.per_tile(s["grid"])
    np.testing.assert_array_equal(labels, (s["tiles"]["tumor_fraction"].to_numpy() >= 0.5).astype(float))
    moved = cells.per_tile(s["grid"], alignment=Alignment.from_offset_scale((112.0, 0.0)))
    assert moved.sum() < cells.per_tile(s["grid"]).sum()  # a column of tiles shifted off the slide edge
    real = load_truth(shared_data / "qupath" / "Single_cells.geojson", 0.5)
    assert real.kind == "cells" and len(real.cells) == 121
