"""The Qt-free Comparison: the state the Compare dock and ``he2rna compare`` share."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.errors import DataError
from napari_he2rna.slides.tiling import TileGrid
from napari_he2rna.validation import metrics
from napari_he2rna.validation.comparison import Comparison
from napari_he2rna.validation.transform import Alignment

REPO = Path(__file__).resolve().parents[1]


def square_grid(n_rows: int, n_cols: int, tile_px: int = 100, mpp: float = 0.5) -> TileGrid:
    rr, cc = np.mgrid[0:n_rows, 0:n_cols]
    table = pd.DataFrame({"tile_id": (rr * n_cols + cc).ravel(), "row": rr.ravel(), "col": cc.ravel()})
    table["x"], table["y"], table["size"] = table["col"] * tile_px, table["row"] * tile_px, tile_px
    table["tissue_fraction"] = 1.0
    return TileGrid(table, tile_px, tile_px * mpp, mpp, n_rows, n_cols, (n_cols * tile_px, n_rows * tile_px))


def write_cells(path: Path, xy_um: np.ndarray, classes: list[str]) -> Path:
    pd.DataFrame({"Class": classes, "Centroid X µm": xy_um[:, 0], "Centroid Y µm": xy_um[:, 1]}).to_csv(
        path, sep="\t", index=False
    )
    return path


def test_cells_metrics_filters_and_tables(tmp_path):
    grid = square_grid(4, 5)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=len(grid.table))
    xy, cls = [], []
    for (x, y), n in zip(grid.centers() * grid.mpp, counts, strict=True):
        xy += [(x, y)] * int(n) + [(x + 1, y + 1)]
        cls += ["Positive"] * int(n) + ["Negative"]
    path = write_cells(tmp_path / "cells.tsv", np.asarray(xy, float), cls)
    c = Comparison.for_grid(grid, classes=("Positive",))
    c.load(path)
    assert c.kind == "cells" and c.label == "cell count (Positive)"
    assert c.class_names() == ["Positive", "Negative"]  # most frequent first
    np.testing.assert_array_equal(c.truth_per_tile(), counts)
    assert len(c.points_um()) == counts.sum()
    scores = {"good": counts + rng.normal(scale=0.1, size=len(counts)), "noise": rng.normal(size=len(counts))}
    results = c.compute(scores)
    expected = metrics.tile_metrics(scores["good"], counts)
    assert results["good"].pearson_r == pytest.approx(expected.pearson_r)
    assert results["good"].as_dict() == pytest.approx(expected.as_dict(), nan_ok=True)
    table = c.metrics_table()
    assert set(table["score"]) == {"good", "noise"} and set(table["truth"]) == {"cell count (Positive)"}
    tiles = c.per_tile_table()
    np.testing.assert_array_equal(tiles["cell count (Positive)"], counts)
    # the cache follows the filters: all classes count one more cell per tile
    c.classes = None
    np.testing.assert_array_equal(c.truth_per_tile(), counts + 1)
    # a class that is not there is explained with the classes present
    c.classes = ("CD8+",)
    with pytest.raises(DataError, match="classes present"):
        c.truth_per_tile()
    assert len(c.selected_cells()) == 0  # drawing never raises


def test_alignment_moves_the_counts(tmp_path):
    grid = square_grid(3, 4)
    path = write_cells(tmp_path / "one.tsv", np.array([[25.0, 25.0]]), ["Positive"])  # tile (0, 0)
    c = Comparison.for_grid(grid)
    c.load(path)
    assert c.truth_per_tile()[0] == 1
    c.alignment = Alignment.from_offset_scale((50.0, 0.0))  # one tile (50 µm) to the right
    assert c.truth_per_tile()[1] == 1 and c.truth_per_tile().sum() == 1
    np.testing.assert_allclose(c.layer_affine()[:2, 2], [0.0, 50.0])  # (y, x) µm


@pytest.mark.parametrize(
    "settings",
    [{}, {"mask_downsample": 25.0}, {"mask_mpp": 10.0}, {"mask_downsample": 20.0, "alignment": (30.0, 15.0)}],
)
def test_the_drawn_mask_and_the_fractions_share_one_geometry(tmp_path, settings):
    """A single positive mask pixel: where the drawn layer puts it is the tile that counts it."""
    from skimage import io

    grid = square_grid(4, 6)
    settings = dict(settings)
    offset = settings.pop("alignment", None)
    h, w = (16, 24) if not settings else (12, 20)
    mask = np.zeros((h, w), np.uint8)
    i, j = h // 3, w // 2
    mask[i, j] = 255
    io.imsave(tmp_path / "mask.png", mask, check_contrast=False)
    c = Comparison.for_grid(grid, **settings)
    if offset is not None:
        c.alignment = Alignment.from_offset_scale(offset)
    c.load(tmp_path / "mask.png")
    scale, translate = c.mask_placement()
    g = c.mask_geometry()
    assert scale == pytest.approx((g.sy * grid.mpp, g.sx * grid.mpp))
    # the centre of mask pixel (i, j) as drawn (layer data -> world: scale, translate, then the affine), µm
    yx = np.array([i * scale[0] + translate[0], j * scale[1] + translate[1], 1.0])
    world_y, world_x = (c.layer_affine() @ yx)[:2]
    # napari's pixel centres sit on integer coordinates: slide px k is centred at k * mpp µm
    col, row = (
        int((world_x / grid.mpp + 0.5) // grid.tile_px),
        int((world_y / grid.mpp + 0.5) // grid.tile_px),
    )
    frac = c.truth_per_tile()
    hit = np.flatnonzero((grid.table["row"] == row) & (grid.table["col"] == col))
    assert hit.size == 1 and frac[hit[0]] > 0
    assert np.nansum(frac > 0) == 1


def test_mask_aspect_mismatch_is_drawn_but_not_binned(tmp_path):
    from skimage import io

    grid = square_grid(4, 6)
    io.imsave(tmp_path / "m.png", np.full((10, 10), 255, np.uint8), check_contrast=False)
    c = Comparison.for_grid(grid)
    c.load(tmp_path / "m.png")
    assert c.mask_geometry().problem and c.mask_placement()  # stretched over the slide for display
    with pytest.raises(DataError, match="does not cover the same area"):
        c.truth_per_tile()


def test_annotations_roles_and_labels(tmp_path):
    import json

    grid = square_grid(4, 4)
    square = [[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]
    other = [[200, 200], [400, 200], [400, 400], [200, 400], [200, 200]]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }
        for ring, name in ((square, "Tumor"), (other, "Stroma"))
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    c = Comparison.for_grid(grid, classes=("Tumor",))
    c.load(path)
    assert c.kind == "annotations" and c.label == "Tumor" and c.class_names() == ["Tumor", "Stroma"]
    assert c.polygon_roles() == ["inside", "other"]
    labels = c.truth_per_tile().reshape(4, 4)
    assert labels[:2, :2].sum() == 4 and labels.sum() == 4
    c.negative_classes = ("Stroma",)
    assert c.polygon_roles() == ["inside", "outside"]
    labels = c.truth_per_tile().reshape(4, 4)
    assert np.isnan(labels[0, 3]) and labels[3, 3] == 0.0
    res = c.compute({"s": np.arange(16.0)})["s"]
    assert isinstance(res, metrics.AnnotationMetrics) and res.n_tiles == 8


def test_comparison_runs_without_qt(tmp_path):
    """The comparison (and what it draws) is pure compute: no Qt, no napari in the process."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np, pandas as pd
        from napari_he2rna.validation.comparison import Comparison
        from napari_he2rna.slides.tiling import TileGrid
        rr, cc = np.mgrid[0:3, 0:4]
        t = pd.DataFrame({{"tile_id": (rr * 4 + cc).ravel(), "row": rr.ravel(), "col": cc.ravel()}})
        t["x"], t["y"], t["size"], t["tissue_fraction"] = t["col"] * 100, t["row"] * 100, 100, 1.0
        grid = TileGrid(t, 100, 50.0, 0.5, 3, 4, (400, 300))
        cells = {{"Class": ["Positive"] * 3, "Centroid X µm": [10, 60, 70], "Centroid Y µm": [10, 10, 60]}}
        pd.DataFrame(cells).to_csv({str(tmp_path / "c.tsv")!r}, sep="\\t", index=False)
        c = Comparison.for_grid(grid)
        c.load({str(tmp_path / "c.tsv")!r})
        res = c.compute({{"s": np.arange(12.0)}})
        assert c.truth_per_tile().tolist()[:3] == [1, 1, 0], c.truth_per_tile()
        c.points_um(); c.layer_affine(); c.metrics_table(); c.per_tile_table()
        qt = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "vispy")
        bad = [m for m in qt if m in sys.modules]
        assert not bad, bad
        print("ok", res["s"].n_tiles)
        """
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 12"
