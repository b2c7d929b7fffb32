"""Tissue mask and tile grid on real slides and thumbnails, and on the synthetic slide with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_he2rna import settings
from napari_he2rna.errors import TissueError
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.slides.tiling import (
    TileGrid,
    pen_mask,
    read_tile,
    read_tiles,
    tile_fractions,
    tile_grid,
    tissue_mask,
)


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    with open_slide(cmu_slide) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu_grid(cmu) -> TileGrid:
    return tile_grid(cmu)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The bundled sample slide and its per-tile truth, or one drawn the same way when not bundled yet."""
    bundled = settings.sample_data_dir() / "sample_slide.tiff"
    truth = settings.sample_data_dir() / "sample_slide_tiles.csv"
    if bundled.is_file() and truth.is_file():
        return bundled, pd.read_csv(truth)
    from napari_he2rna.synthetic import make_slide

    path = tmp_path_factory.mktemp("synthetic") / "slide.tiff"
    made = make_slide(path, seed=3, size_px=(1792, 1568), write_truth=False)
    return path, made.tiles


def test_cmu_grid_covers_the_slide_and_tiles_land_on_tissue(cmu, cmu_grid):
    g = cmu_grid
    assert g.tile_px == round(112 / 0.499) == 224
    assert (g.n_cols, g.n_rows) == (10, 14)  # ceil(2220/224), ceil(2967/224): edge tiles included
    t = g.table
    assert list(t.columns) == ["tile_id", "row", "col", "x", "y", "size", "tissue_fraction"]
    assert t["tile_id"].is_monotonic_increasing and (t["tile_id"] == t["row"] * g.n_cols + t["col"]).all()
    assert (t["x"] == t["col"] * 224).all() and (t["y"] == t["row"] * 224).all()
    assert (t["tissue_fraction"] >= 0.5).all()
    assert 20 < len(t) < 100
    # Kept tiles are stained, dropped ones mostly glass: compare mean saturation of the pixels.
    tiles = read_tiles(cmu, g)
    sat = (tiles.max(-1).astype(float) - tiles.min(-1)) / 255
    inside = np.zeros(sat.shape, bool)  # edge tiles: judge the part inside the slide, not the white padding
    for k, (x, y) in enumerate(t[["x", "y"]].to_numpy()):
        inside[k, : 2967 - y, : 2220 - x] = True
    dropped = TileGrid(
        pd.DataFrame({"x": [0, 224 * 9], "y": [0, 0]}), 224, 112.0, 0.499, 14, 10, (2220, 2967)
    )
    glass = read_tiles(cmu, dropped)
    glass_sat = (glass.max(-1).astype(float) - glass.min(-1)) / 255
    tile_sat = (sat * inside).sum(axis=(1, 2)) / inside.sum(axis=(1, 2))
    assert tile_sat.min() > glass_sat.mean() + 0.05


def test_tile_pixels_equal_a_direct_read(cmu, cmu_grid):
    i = len(cmu_grid.table) // 2
    x, y = cmu_grid.table[["x", "y"]].iloc[i]
    direct = cmu.read_region((int(x), int(y)), 0, (224, 224))
    np.testing.assert_array_equal(read_tile(cmu, cmu_grid, i), direct)
    # Asked at another size, the same region resized (PIL bilinear, antialiased).
    small = np.asarray(Image.fromarray(direct).resize((112, 112), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(read_tile(cmu, cmu_grid, i, out_px=112), small)
    many = read_tiles(cmu, cmu_grid, [0, i], num_workers=2)
    np.testing.assert_array_equal(many[1], direct)


def test_edge_tile_is_padded_white(cmu):
    grid = TileGrid(pd.DataFrame({"x": [224 * 9], "y": [224 * 13]}), 224, 112.0, 0.499, 14, 10, (2220, 2967))
    tile = read_tile(cmu, grid, 0)
    inside_w, inside_h = 2220 - 224 * 9, 2967 - 224 * 13  # 204 x 55 px inside the slide
    np.testing.assert_array_equal(
        tile[:inside_h, :inside_w], cmu.read_region((2016, 2912), 0, (inside_w, inside_h))
    )
    assert (tile[inside_h:] == 255).all() and (tile[:, inside_w:] == 255).all()


def test_edge_tiles_are_judged_on_their_part_inside_the_slide():
    mask = np.ones((250, 300), dtype=bool)  # all tissue, at level-0 resolution of a 300x250 slide
    fractions = tile_fractions(mask, (300, 250), 224)
    assert fractions.shape == (2, 2)
    np.testing.assert_allclose(fractions, 1.0)  # the slivers are tissue where they are inside the slide
    mask[:, 224:] = False
    assert tile_fractions(mask, (300, 250), 224)[0, 1] == 0.0


def test_blue_pen_is_not_tissue(shared_data):
    rgb = _rgb(shared_data / "thumbnails" / "wsi-blue-pen.png")
    mask, pens = tissue_mask(rgb), pen_mask(rgb)
    blue_ink = (rgb[..., 2].astype(int) - rgb[..., 0] > 60) & (rgb[..., 2] > 120)  # saturated blue
    assert blue_ink.sum() > 300
    assert pens[blue_ink].mean() > 0.9
    assert mask[blue_ink].mean() < 0.02
    pink = (rgb[..., 0].astype(int) - rgb[..., 1] > 25) & (rgb[..., 2].astype(int) - rgb[..., 1] > 10)
    assert mask[pink].mean() > 0.7  # the pink tissue is found
    assert 0.1 < mask.mean() < 0.5


def test_tissue_mask_on_real_tissue_and_glass(shared_data):
    tissue = _rgb(shared_data / "tiles" / "histolab" / "tissue-level0-7352-11762-7864-12274.png")
    assert tissue_mask(tissue).mean() > 0.5
    glass = _rgb(shared_data / "tiles" / "histolab" / "no-tissue.png")
    assert tissue_mask(glass).mean() < 0.01
    green = _rgb(shared_data / "tiles" / "histolab" / "no-tissue-green-pen.png")
    assert tissue_mask(green).mean() < 0.1
    assert not tissue_mask(np.full((64, 64, 3), 245, np.uint8)).any()


def test_no_tissue_raises(shared_data, tmp_path):
    white = tmp_path / "white.png"
    Image.fromarray(np.full((600, 800, 3), 250, np.uint8)).save(white)
    with open_slide(white, mpp=0.5) as slide, pytest.raises(TissueError, match="no tissue"):
        tile_grid(slide)
    with open_slide(shared_data / "slides" / "openslide-fixtures" / "boxes.png", mpp=0.5) as slide:
        with pytest.raises(TissueError):
            tile_grid(slide)


def test_max_tiles_sampling_is_reproducible(cmu, cmu_grid):
    a = tile_grid(cmu, max_tiles=10, seed=1)
    b = tile_grid(cmu, max_tiles=10, seed=1)
    c = tile_grid(cmu, max_tiles=10, seed=2)
    assert len(a.table) == 10
    pd.testing.assert_frame_equal(a.table, b.table)
    assert not a.table["tile_id"].equals(c.table["tile_id"])
    assert set(a.table["tile_id"]) <= set(cmu_grid.table["tile_id"])
    assert a.table["tile_id"].is_monotonic_increasing


def test_tile_um_follows_the_pixel_size(cmu_slide):
    with open_slide(cmu_slide, mpp=0.25) as slide:  # pretend 40x: a 112 µm tile is 448 px
        grid = tile_grid(slide, max_tiles=3)
        assert grid.tile_px == 448 and grid.n_cols == 5
        x, y = grid.table[["x", "y"]].iloc[0]
        direct = slide.read_region((int(x), int(y)), 0, (448, 448))
        expected = np.asarray(Image.fromarray(direct).resize((224, 224), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(read_tile(slide, grid, 0), expected)


def test_synthetic_kept_tiles_match_the_planted_tissue(synthetic):
    path, truth = synthetic
    with open_slide(path) as slide:
        grid = tile_grid(slide, max_tiles=None)
    assert grid.n_rows * grid.n_cols == len(truth)
    truth = truth.assign(tile_id=truth["row"] * grid.n_cols + truth["col"]).set_index("tile_id")
    # Fat counts as tissue in the truth but is white vacuoles on the slide, like glass: the mask finds the
    # stained tissue, as Otsu did in the paper.
    stained = (truth["tissue_fraction"] - truth["fat_fraction"]).to_numpy()
    kept = truth.index.isin(grid.table["tile_id"])
    should = stained >= 0.5
    clear = np.abs(stained - 0.5) > 0.1  # away from the threshold
    assert should.sum() > 20
    assert (kept[clear] == should[clear]).mean() >= 0.97
    assert abs(kept.sum() - should.sum()) <= 0.1 * should.sum() + 1
    est = grid.table.set_index("tile_id")["tissue_fraction"]
    err = (est - pd.Series(stained, index=truth.index).loc[est.index]).abs()
    assert err.mean() < 0.1


def _ink_case(shared_data, name):
    from napari_he2rna.slides.tiling import tissue_and_ink_masks

    image = np.asarray(Image.open(shared_data / name))
    return tissue_and_ink_masks(image), tissue_and_ink_masks(image, remove_ink=False)


@pytest.mark.parametrize("name", ["no-tissue-red-pen.png", "no-tissue-green-pen.png", "no-tissue-line.png"])
def test_pen_tiles_without_tissue_are_under_5_percent_tissue(shared_data, name):
    (tissue, ink), _ = _ink_case(shared_data, f"tiles/histolab/{name}")
    assert tissue.mean() < 0.05
    assert not (tissue & ink).any()


def test_red_pen_halo_is_removed_but_not_kept_as_tissue(shared_data):
    (tissue, ink), (old, _) = _ink_case(shared_data, "tiles/histolab/no-tissue-red-pen.png")
    assert old.mean() > 0.5  # the halo the old mask kept (58 %)
    assert ink.mean() > 0.5 and ink[old].mean() > 0.85


def test_red_pen_thumbnail_loses_its_ink(shared_data):
    (tissue, ink), (old, _) = _ink_case(shared_data, "thumbnails/diagnostic-slide-thumb-rgb.png")
    rgb = _rgb(shared_data / "thumbnails" / "diagnostic-slide-thumb-rgb.png").astype(int)
    vivid_red = (rgb[..., 0] - rgb[..., 1] > 90) & (rgb[..., 0] > 140)  # the red pen lines and dots
    assert vivid_red.sum() > 10_000
    assert old[vivid_red].mean() > 0.9  # kept as tissue before
    assert tissue[vivid_red].mean() < 0.5
    removed = (old & ~tissue).mean()
    assert 0.03 < removed < 0.15  # the ink, not the tissue it outlines
    assert tissue[150:350, 150:400].mean() > 0.85  # the middle of the section stays tissue


@pytest.mark.parametrize(
    "name",
    [
        "tiles/histolab/tissue-level0-4302-10273-4814-10785.png",
        "tiles/histolab/tissue-level0-7352-11762-7864-12274.png",
        "tiles/histolab/high-nuclei-score-level0.png",
        "thumbnails/tcga-lung-rgb.png",
        "thumbnails/wsi-blue-pen.png",
        "tiles/nct-crc-he-100k/MUS-AACVWIEK.tif",
        "tiles/nct-crc-he-100k/STR-AACRYYNQ.tif",
        "tiles/nct-crc-he-100k/DEB-ACHGAMCT.tif",
        "tiles/nct-crc-he-100k/LYM-AATTSRNN.tif",
        "tiles/nct-crc-he-100k/NORM-AAAWMSFI.tif",
        "tiles/nct-crc-he-100k/TUM-AACHEHDV.tif",
        "tiles/nct-crc-he-100k/ADI-AAQEFMRI.tif",
        "he_regions/tiatoolbox_target_image.png",
    ],
)
def test_ink_removal_keeps_the_tissue_of_stained_images(shared_data, name):
    (tissue, _), (old, _) = _ink_case(shared_data, name)
    assert abs(tissue.mean() - old.mean()) < 0.01


def test_ink_removal_keeps_the_cmu_tiles(cmu, cmu_grid):
    from napari_he2rna.slides.tiling import mask_method

    old = tile_grid(cmu, remove_ink=False)
    pd.testing.assert_frame_equal(old.table[["tile_id"]], cmu_grid.table[["tile_id"]])
    assert mask_method() != mask_method(remove_ink=False)


def test_a_grid_from_its_exported_tile_table():
    from napari_he2rna.maps import exports

    rows, cols = np.array([0, 0, 1, 2]), np.array([1, 2, 2, 0])
    table = pd.DataFrame(
        {"tile_id": rows * 3 + cols, "row": rows, "col": cols, "x": cols * 225, "y": rows * 225, "size": 225}
    )
    table["tissue_fraction"] = [0.5, 1.0, 0.75, 1.0]
    grid = TileGrid(table, 225, 112.0, 0.5, 3, 3, (675, 600))
    assert grid.tile_side_um == pytest.approx(112.5) and grid.tile_um == 112.0
    exported = exports.tile_table(grid, pd.DataFrame({"G": [1.0, 2.0, 3.0, 4.0]}))
    back = TileGrid.from_table(exported, 0.5, slide_dimensions=(675, 600))
    pd.testing.assert_frame_equal(back.table, grid.table, check_dtype=False)
    assert (back.tile_px, back.n_rows, back.n_cols, back.mpp) == (225, 3, 3, 0.5)
    assert back.tile_um == pytest.approx(112.5)  # the requested size is not in a table: the actual side
    # no size column: the tile side is the spacing of the tiles
    bare = TileGrid.from_table(table.drop(columns=["size", "tissue_fraction"]), 0.5)
    assert bare.tile_px == 225 and np.isnan(bare.table["tissue_fraction"]).all()
