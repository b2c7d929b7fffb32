"""The sample cohort generator: slides open as real WSIs with the right pixel size, and the truth agrees
with the image and with itself."""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from napari_he2rna import synthetic
from napari_he2rna.errors import DataError
from napari_he2rna.synthetic import SlideParams, load_cohort, load_tile_truth, make_cohort, make_slide

SIZE = (1344, 1120)  # 6 x 5 tiles of 224 px
PARAMS = SlideParams(
    cancer_type="SYN-COAD",
    tissue_fraction=0.7,
    epithelium=0.3,
    fat=0.1,
    t_level=1.5,
    follicles_per_mm2=6.0,
    proliferating=0.2,
)


@pytest.fixture(scope="module")
def slide_truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return make_slide(out / "syn.tiff", seed=3, size_px=SIZE, params=PARAMS)


@pytest.fixture(scope="module")
def slide_rgb(slide_truth) -> np.ndarray:
    with openslide.OpenSlide(str(slide_truth.path)) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions))[..., :3]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=30, seed=0, size_px=(896, 896))


def _tile_of(x_px: np.ndarray, y_px: np.ndarray, n_cols: int, tile_px: int = 224) -> np.ndarray:
    return np.floor(y_px / tile_px).astype(int) * n_cols + np.floor(x_px / tile_px).astype(int)


def test_slide_opens_in_openslide_with_mpp(slide_truth):
    with openslide.OpenSlide(str(slide_truth.path)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.dimensions == SIZE
        assert osr.level_count >= 2
        assert osr.level_downsamples[1] == pytest.approx(2.0)
        assert osr.properties["openslide.level[0].tile-width"] == "256"


def test_slide_opens_with_library(slide_truth):
    from napari_he2rna.slides import slide as slide_mod

    with slide_mod.open_slide(slide_truth.path) as slide:
        assert slide.dimensions == SIZE
        assert slide.mpp == pytest.approx(0.5)
        region = slide.read_region((0, 0), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_same_seed_same_files(slide_truth, tmp_path):
    again = make_slide(tmp_path / "syn.tiff", seed=3, size_px=SIZE, params=PARAMS)
    for key, path in slide_truth.files.items():
        assert filecmp.cmp(path, again.files[key], shallow=False), key
    other = make_slide(tmp_path / "other.tiff", seed=4, size_px=SIZE, params=PARAMS, write_truth=False)
    assert not filecmp.cmp(slide_truth.path, other.path, shallow=False)
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_tile_table_covers_the_grid(slide_truth):
    tiles = load_tile_truth(slide_truth.files["tiles"])
    n_cols, n_rows = math.ceil(SIZE[0] / 224), math.ceil(SIZE[1] / 224)
    assert len(tiles) == n_rows * n_cols
    assert (tiles["x"] == tiles["col"] * 224).all() and (tiles["y"] == tiles["row"] * 224).all()
    assert (tiles["size"] == 224).all()
    cells = slide_truth.cells
    assert tiles["t_cells"].sum() == (cells["type"] == "T cell").sum() > 50
    assert tiles["b_cells"].sum() == (cells["type"] == "B cell").sum() > 50
    assert tiles["tumor_cells"].sum() > 50
    assert 0 < tiles["proliferating_cells"].sum() < tiles["tumor_cells"].sum()
    for col in (
        "tissue_fraction",
        "epithelium_fraction",
        "tumor_fraction",
        "stroma_fraction",
        "fat_fraction",
    ):
        assert tiles[col].between(0, 1).all(), col


def test_qupath_tables_count_what_the_tiles_say(slide_truth):
    tiles = load_tile_truth(slide_truth.files["tiles"])
    n_cols = int(tiles["col"].max()) + 1
    for marker, column in (("CD3", "t_cells"), ("CD20", "b_cells")):
        raw = slide_truth.files[marker].read_bytes()
        assert "Centroid X \u00b5m".encode() in raw  # U+00B5, UTF-8
        tab = pd.read_csv(slide_truth.files[marker], sep="\t", encoding="utf-8")
        for col in (
            "Image",
            "Object ID",
            "Object type",
            "Name",
            "Class",
            "Parent",
            "ROI",
            "Centroid X µm",
            "Centroid Y µm",
            "Nucleus: Area µm^2",
            "DAB: Mean",
        ):
            assert col in tab.columns, col
        assert set(tab["Class"]) == {"Positive", "Negative"}
        assert len(tab) == tiles["total_cells"].sum()
        pos = tab[tab["Class"] == "Positive"]
        idx = _tile_of(pos["Centroid X µm"].to_numpy() / 0.5, pos["Centroid Y µm"].to_numpy() / 0.5, n_cols)
        counts = np.bincount(idx, minlength=len(tiles))
        np.testing.assert_array_equal(counts, tiles[column].to_numpy())
        assert pos["DAB: Mean"].min() > tab.loc[tab["Class"] == "Negative", "DAB: Mean"].max()


def test_lymphocyte_tiles_are_bluer(slide_truth, slide_rgb):
    from skimage.color import rgb2hed

    tiles = load_tile_truth(slide_truth.files["tiles"])
    hema = []
    for r in tiles.itertuples():
        patch = slide_rgb[r.y : r.y + 224, r.x : r.x + 224]
        hema.append(rgb2hed(patch)[..., 0].mean() if patch.size else np.nan)
    tiles["hema"] = hema
    stroma = tiles[(tiles["tissue_fraction"] > 0.9) & (tiles["epithelium_fraction"] < 0.05)]
    dense = stroma[stroma["lymphocytes"] >= stroma["lymphocytes"].quantile(0.75)]
    sparse = stroma[stroma["lymphocytes"] <= stroma["lymphocytes"].quantile(0.25)]
    assert len(dense) and len(sparse)
    assert dense["hema"].mean() > sparse["hema"].mean()
    r = np.corrcoef(stroma["lymphocytes"], stroma["hema"])[0, 1]
    assert r > 0.5


def _nucleus_h(rgb: np.ndarray, cells: pd.DataFrame) -> np.ndarray:
    """Mean haematoxylin (scikit-image HED) of each nucleus' central disk (radius 2 px = 1 µm)."""
    from skimage.color import rgb2hed

    hema = rgb2hed(rgb)[..., 0]
    yy, xx = np.mgrid[-2:3, -2:3]
    disk = yy**2 + xx**2 <= 4
    ys = np.clip(cells["y"].to_numpy().astype(int)[:, None] + yy[disk], 0, hema.shape[0] - 1)
    xs = np.clip(cells["x"].to_numpy().astype(int)[:, None] + xx[disk], 0, hema.shape[1] - 1)
    return hema[ys, xs].mean(axis=1)


def test_t_and_b_nuclei_share_their_colour(slide_truth, slide_rgb):
    # The painted T and B nuclei come from one optical-density law: their mean H agrees within 5 % and the
    # central H of a nucleus ranks T above B little better than chance (the old generator: 26 %, AUC 1.0).
    cells = slide_truth.cells
    t_h = _nucleus_h(slide_rgb, cells[cells["type"] == "T cell"])
    b_h = _nucleus_h(slide_rgb, cells[cells["type"] == "B cell"])
    assert len(t_h) > 300 and len(b_h) > 300
    assert abs(t_h.mean() / b_h.mean() - 1.0) < 0.05
    ranks = pd.Series(np.concatenate([t_h, b_h])).rank().to_numpy()
    auc = (ranks[: len(t_h)].sum() - len(t_h) * (len(t_h) + 1) / 2) / (len(t_h) * len(b_h))
    assert 0.3 < auc < 0.7
    # sizes overlap: T 3.0-3.5 µm, B 3.2-3.7 µm
    t_r = cells.loc[cells["type"] == "T cell", "radius_um"]
    b_r = cells.loc[cells["type"] == "B cell", "radius_um"]
    assert t_r.between(3.0, 3.5).all() and b_r.between(3.2, 3.7).all()


def test_aggregates_hold_t_and_b_cells(slide_truth):
    from scipy.spatial import cKDTree

    tiles = slide_truth.tiles
    b_rich = tiles[tiles["b_cells"] >= 40]
    assert len(b_rich) >= 3
    assert (b_rich["t_cells"] >= 5).all()  # the core's own T cells, the rim
    share = b_rich["t_cells"].sum() / b_rich["lymphocytes"].sum()
    assert 0.05 < share < 0.6
    cells = slide_truth.cells
    t_xy = cells.loc[cells["type"] == "T cell", ["x", "y"]].to_numpy()
    b_xy = cells.loc[cells["type"] == "B cell", ["x", "y"]].to_numpy()
    dist, _ = cKDTree(b_xy).query(t_xy)
    assert (dist < 20).mean() > 0.2  # T cells next to B cells (within 10 µm): inside and around aggregates
    # and T cells elsewhere too: tumour-infiltrating (inside the epithelium mask) and in stroma
    mask = slide_truth.epithelium_mask
    ds = synthetic.MASK_DOWNSAMPLE

    def in_epithelium(xy: np.ndarray) -> np.ndarray:
        return mask[(xy[:, 1] // ds).astype(int), (xy[:, 0] // ds).astype(int)]

    assert in_epithelium(t_xy).mean() > 0.03
    assert in_epithelium(b_xy).mean() < 0.02
    assert (dist > 100).mean() > 0.2  # T cells over 50 µm from any B cell


def test_lymphocyte_levels_do_not_depend_on_cancer_type():
    # The same generator state gives the same lymphocyte levels whatever the cancer type ...
    keys = list(synthetic.IMMUNE_PRIOR)
    for seed in range(5):
        drawn = [synthetic.draw_params(np.random.default_rng(seed), t) for t in synthetic.CANCER_TYPES]
        for key in keys:
            assert len({getattr(p, key) for p in drawn}) == 1, key
        assert len({p.epithelium for p in drawn}) == 3  # ... while the composition differs
    # ... and over many draws they do not follow the composition nor each other.
    rng = np.random.default_rng(0)
    rows = [vars(synthetic.draw_params(rng, synthetic.CANCER_TYPES[i % 3])) for i in range(3000)]
    d = pd.DataFrame(rows)
    for key, (median, _sigma) in synthetic.IMMUNE_PRIOR.items():
        assert d[key].median() == pytest.approx(median, rel=0.08), key
        for other in ("epithelium", "fat", *(k for k in keys if k != key)):
            assert abs(np.corrcoef(np.log(d[key]), d[other])[0, 1]) < 0.08, (key, other)
    by_type = d.groupby("cancer_type")[keys].median()
    assert (by_type.max() / by_type.min()).max() < 1.15
    composition = d.groupby("cancer_type")[["fat", "epithelium"]].mean()  # which still differs by type
    assert composition.loc["SYN-BRCA", "fat"] > 3 * composition.loc["SYN-COAD", "fat"]
    assert composition.loc["SYN-COAD", "epithelium"] > 1.5 * composition.loc["SYN-LUAD", "epithelium"]


def test_labels_are_per_patient(cohort):
    s = cohort.samples
    twice = s["patient_id"].value_counts()
    assert (twice == 2).sum() >= 2
    per_patient = s.groupby("patient_id")[["msi_status", "cancer_type"]].nunique()
    assert (per_patient == 1).all().all()
    assert s.drop_duplicates("patient_id")["msi_status"].nunique() == 2


def test_control_genes():
    assert synthetic.control_genes(20) == synthetic.HOUSEKEEPING
    assert list(synthetic.control_genes(3)) == list(synthetic.HOUSEKEEPING)[:3]
    many = synthetic.control_genes(130)
    assert len(many) == 130 and list(many)[:20] == list(synthetic.HOUSEKEEPING)
    assert list(many)[20:23] == ["CTRL0001", "CTRL0002", "CTRL0003"]
    assert all(5.0 <= v <= 2000.0 for v in many.values())
    assert synthetic.control_genes(25)["CTRL0005"] == many["CTRL0005"]  # a name always has the same base
    assert synthetic.is_control_gene("CTRL0042") and synthetic.is_control_gene("GAPDH")
    assert not synthetic.is_control_gene("CD3D") and not synthetic.is_control_gene("CTRLX")
    for bad in (-1, 2.5, True):
        with pytest.raises(DataError):
            synthetic.control_genes(bad)


def test_cohort_with_more_controls(tmp_path):
    info = make_cohort(tmp_path, n_slides=3, seed=2, size_px=(448, 448), n_controls=26)
    genes = list(info.expression.columns)
    assert genes == [*synthetic.GENE_PANEL, *synthetic.control_genes(26)]
    ctrl = info.expression[[f"CTRL{k:04d}" for k in range(1, 7)]]
    assert np.isfinite(ctrl.to_numpy()).all() and (ctrl.std() > 0).all()
    assert list(load_cohort(tmp_path).expression.columns) == genes
    # written through a staging folder: nothing of it is left, and the truths name the committed files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for truth in info.truths:
        assert truth.path.parent == tmp_path and truth.path.is_file()
        assert all(Path(f).is_file() and Path(f).parent == tmp_path for f in truth.files.values())
    with pytest.raises(DataError):
        make_cohort(tmp_path / "bad", n_slides=1, n_controls=-3)
    assert not (tmp_path / "bad").exists()


def test_background_tiles_are_white(slide_truth, slide_rgb):
    tiles = load_tile_truth(slide_truth.files["tiles"])
    empty = tiles[tiles["tissue_fraction"] == 0]
    tissue = tiles[tiles["tissue_fraction"] > 0.9]
    assert len(empty) and len(tissue)
    for r in empty.itertuples():
        patch = slide_rgb[r.y : r.y + 224, r.x : r.x + 224].astype(float)
        assert patch.mean() > 230 and patch.std() < 8
    dark = [slide_rgb[r.y : r.y + 224, r.x : r.x + 224].mean() for r in tissue.itertuples()]
    assert max(dark) < 225


def test_epithelium_mask_holds_the_tumour_cells(slide_truth, slide_rgb):
    mask = np.asarray(Image.open(slide_truth.files["epithelium_mask"]))
    side = json.loads(slide_truth.files["epithelium_mask_json"].read_text())
    ds = side["downsample"]
    assert mask.shape == (math.ceil(SIZE[1] / ds), math.ceil(SIZE[0] / ds))
    assert set(np.unique(mask)) == {0, 255}
    cells = slide_truth.cells

    def inside(kind: str) -> float:
        c = cells[cells["type"] == kind]
        return float((mask[(c["y"] // ds).astype(int), (c["x"] // ds).astype(int)] == 255).mean())

    assert inside("tumor") > 0.9
    assert inside("stromal") < 0.1 and inside("B cell") < 0.1
    # epithelium is purple-pink cytoplasm, not white glass
    up = np.kron(mask == 255, np.ones((ds, ds), bool))[: SIZE[1], : SIZE[0]]
    assert slide_rgb[up].mean() < 215
    tiles = load_tile_truth(slide_truth.files["tiles"])
    block = (mask == 255).astype(float)[: 5 * 28, : 6 * 28].reshape(5, 28, 6, 28).mean(axis=(1, 3))
    np.testing.assert_allclose(block.ravel(), tiles["epithelium_fraction"].to_numpy(), atol=1e-4)


def test_tumor_geojson_is_qupath_shaped(slide_truth):
    gj = json.loads(slide_truth.files["tumor"].read_text(encoding="utf-8"))
    assert gj["type"] == "FeatureCollection" and gj["features"]
    polys = []
    for feat in gj["features"]:
        assert feat["geometry"]["type"] == "Polygon"
        assert feat["properties"]["objectType"] == "annotation"
        assert feat["properties"]["classification"]["name"] == "Tumor"
        rings = [np.asarray(r, float) for r in feat["geometry"]["coordinates"]]
        for ring in rings:
            assert ring.shape[1] == 2 and np.array_equal(ring[0], ring[-1])
            assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= SIZE[0]).all()
        polys.append(rings)
    inside = synthetic.rasterize_polygons(polys, (SIZE[1], SIZE[0]))
    tumor = slide_truth.cells[slide_truth.cells["type"] == "tumor"]
    assert inside[tumor["y"].astype(int), tumor["x"].astype(int)].mean() > 0.95
    tiles = load_tile_truth(slide_truth.files["tiles"])
    assert tiles.loc[tiles["tumor_fraction"] == 0, "tumor_cells"].sum() <= 0.02 * len(tumor)


def test_cohort_tables(cohort):
    again = load_cohort(cohort.out_dir)
    pd.testing.assert_frame_equal(again.samples, cohort.samples, check_dtype=False)
    pd.testing.assert_frame_equal(again.expression, cohort.expression, atol=1e-4)
    s = again.samples
    assert set(s.columns) >= {"sample_id", "patient_id", "cancer_type", "slide", "msi_status"}
    assert s["patient_id"].value_counts().max() == 2 and s["patient_id"].nunique() < len(s)
    assert set(s["cancer_type"]) == set(synthetic.CANCER_TYPES)
    assert set(s["msi_status"]) == {"MSI-H", "MSS"}
    assert all((cohort.out_dir / f).is_file() for f in s["slide"])
    assert list(again.expression.index) == list(s["sample_id"])
    assert set(synthetic.GENES) == set(again.expression.columns)
    assert again.expression.to_numpy().min() >= 0 and again.expression.to_numpy().max() < 5


def test_expression_follows_the_planted_cells(cohort):
    e = cohort.expression
    t_count = np.array([load_tile_truth(cohort.out_dir / f"{i}_tiles.csv")["t_cells"].sum() for i in e.index])
    a = cohort.abundance
    assert np.corrcoef(e["CD3D"], t_count)[0, 1] > 0.7
    assert np.corrcoef(e["CD3E"], a["t_density"])[0, 1] > 0.7
    assert np.corrcoef(e["KRT8"], a["epithelium"])[0, 1] > 0.7
    assert np.corrcoef(e["MKI67"], a["proliferating_density"])[0, 1] > 0.7
    if a["b_density"].std() > 0:
        assert np.corrcoef(e["MS4A1"], a["b_density"])[0, 1] > 0.7
    hk = [abs(np.corrcoef(e[g], a["t_density"])[0, 1]) for g in synthetic.HOUSEKEEPING]
    assert np.median(hk) < 0.3
    msi = cohort.samples.set_index("sample_id")["msi_status"]
    assert a.loc[msi == "MSI-H", "t_density"].mean() > a.loc[msi == "MSS", "t_density"].mean()


def test_cancer_types_differ_in_tissue(cohort):
    a = cohort.abundance.join(cohort.samples.set_index("sample_id")["cancer_type"])
    means = a.groupby("cancer_type")[["fat", "epithelium"]].mean()
    assert means.loc["SYN-BRCA", "fat"] > means.loc["SYN-COAD", "fat"]
    assert means.loc["SYN-COAD", "epithelium"] > means.loc["SYN-LUAD", "epithelium"]


def test_cli_make_sample(tmp_path, capsys):
    from napari_he2rna.cli import main

    code = main(
        [
            "make-sample",
            str(tmp_path / "c"),
            "--n-slides",
            "2",
            "--size",
            "448",
            "448",
            "--seed",
            "1",
            "--names",
            "a",
            "b",
            "--cancer-types",
            "SYN-BRCA",
            "SYN-COAD",
            "--n-controls",
            "130",
            "--quiet",
        ]
    )
    assert code == 0
    assert (tmp_path / "c" / "a.tiff").is_file() and (tmp_path / "c" / "b_CD20.tsv").is_file()
    out = capsys.readouterr().out
    assert "wrote 2 slides" in out and "147 genes" in out
    cohort = load_cohort(tmp_path / "c")
    assert cohort.expression.shape == (2, 17 + 130) and "CTRL0110" in cohort.expression.columns
    assert set(cohort.samples["cancer_type"]) == {"SYN-BRCA", "SYN-COAD"}
    assert main(["make-sample", str(tmp_path / "e"), "--n-slides", "1", "--n-controls", "-1"]) == 2
    assert "control genes" in capsys.readouterr().err
    assert main(["make-sample", str(tmp_path / "d"), "--n-slides", "1", "--cancer-types", "SYN-XXX"]) == 2
    assert "SYN-XXX" in capsys.readouterr().err


def test_bad_input_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        make_slide(tmp_path / "x.tiff", size_px=(10, 10))
    with pytest.raises(DataError):
        make_slide(tmp_path / "x.tiff", cancer_type="SYN-XXX")
    with pytest.raises(DataError):
        load_cohort(tmp_path)
    with pytest.raises(DataError):
        load_tile_truth(tmp_path / "missing_tiles.csv")


def test_bundled_sample_slide():
    from napari_he2rna.settings import sample_data_dir

    path = sample_data_dir() / "sample_slide.tiff"
    assert path.is_file(), "sample_data/sample_slide.tiff is committed and must be there"
    with openslide.OpenSlide(str(path)) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        w, h = osr.dimensions
    tiles = load_tile_truth(Path(path).with_name("sample_slide_tiles.csv"))
    assert len(tiles) == math.ceil(w / 224) * math.ceil(h / 224)
    assert (tiles[["t_cells", "b_cells", "tumor_cells"]].sum() > 500).all()
    assert tiles["fat_fraction"].sum() > 1


# ------------------------------------------------------------------------------------ immune phenotypes
def test_immune_phenotypes_t_only_has_no_b_cell_and_shares_are_kept_per_type(tmp_path):
    from napari_he2rna.errors import DataError
    from napari_he2rna.synthetic import make_cohort

    info = make_cohort(
        tmp_path / "c",
        n_slides=8,
        seed=2,
        size_px=(768, 768),
        cancer_types=["SYN-BRCA", "SYN-COAD"],
        second_slide_fraction=0.0,
        phenotypes={"t-only": 1, "aggregates": 1},
    )
    sheet = pd.read_csv(tmp_path / "c" / "samples.tsv", sep="\t")
    # every cancer type gets both phenotypes in the shares asked (in turn, not by chance)
    counts = sheet.groupby(["cancer_type", "immune_phenotype"]).size()
    assert set(counts.to_numpy()) == {2}
    for row in sheet.itertuples():
        cells = pd.read_csv(tmp_path / "c" / f"{row.sample_id}_cells.csv")
        types = cells["type"].value_counts()
        if row.immune_phenotype == "t-only":
            assert types.get("B cell", 0) == 0 and types.get("T cell", 0) > 20
        truth = next(t for t in info.truths if t.slide_id == row.sample_id)
        if row.immune_phenotype == "aggregates":
            assert truth.params.t_level < 0.5 and truth.params.follicles_per_mm2 >= 2.0
    with pytest.raises(DataError, match="Unknown immune phenotype 'b-only'"):
        make_cohort(tmp_path / "d", n_slides=2, size_px=(256, 256), phenotypes={"b-only": 1})


def test_make_sample_refuses_a_phenotype_share_that_is_not_a_number(tmp_path, capsys):
    from napari_he2rna.cli import main

    code = main(["make-sample", str(tmp_path / "x"), "--n-slides", "2", "--phenotypes", "t-only:lots"])
    assert code == 2 and "is not NAME:SHARE" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
