"""maps/session.py (SlideSession), maps/spatialize.py and the ``he2rna spatialize`` / ``he2rna view``
commands."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.cli import main
from napari_he2rna.errors import Cancelled, GeneError, ModelError
from napari_he2rna.maps import exports, gene_sets, progressive, spatialize
from napari_he2rna.maps import session as slide_session
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA

GENES = ["CD3D", "CD3E", "CD3G", "CD247", "CD19", "MKI67", "KRT8", "GAPDH"]


def make_bundle(path: Path, dim: int, backbone: str = "hed-stats", tile_um: float = 112.0, demo=True):
    import torch

    torch.manual_seed(0)
    models = [HE2RNA(dim, len(GENES), hidden=(16,), dropout=0.0)]
    return save_bundle(path, models, GENES, backbone, dim, tile_um, [1, 2, 5], demo=demo)


# ----------------------------------------------------------------------------- SlideSession (real slide)
@pytest.fixture(scope="module")
def cmu_grid(cmu_slide):
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.slides.tiling import tile_grid

    with open_slide(cmu_slide) as s:
        return tile_grid(s, tile_um=112.0)


@pytest.fixture()
def session(cmu_slide, cmu_grid, tmp_path):
    """The real CMU slide, its real tile grid and random features of a made-up 6-d backbone."""
    bundle = load_bundle(make_bundle(tmp_path / "m.safetensors", 6, backbone="toy"))
    s = slide_session.SlideSession.open(cmu_slide, model=bundle)
    grid = cmu_grid
    feats = np.random.default_rng(0).normal(size=(len(grid.table), 6)).astype(np.float32)
    s.set_features(grid, feats, "toy")
    yield s
    s.close()


def test_session_scores_are_per_name_cached_and_droppable(session):
    bundle = session.bundle
    asked = []
    expected = bundle.tile_scores(session.features, ["MKI67"])[:, 0]
    original = bundle.scores_from_hidden

    def spy(hidden, genes=None):
        asked.append(list(genes))
        return original(hidden, genes)

    # the session scores from its own cached hidden layers: one last-layer product per name
    bundle.scores_from_hidden = spy
    a = session.scores("mki67")
    b = session.scores("MKI67")
    assert a is b and asked == [["MKI67"]]  # computed once, for that gene only
    np.testing.assert_allclose(a, expected, rtol=1e-5)
    with pytest.warns(gene_sets.PartialGeneSetWarning):  # the model lacks nothing here but B cells' MS4A1
        session.scores("B cells")
    assert sorted(session.cached_names()) == ["B cells", "MKI67"]
    session.drop("mki67")
    assert session.cached_names() == ["B cells"]
    session.scores("MKI67")
    assert len(asked) == 3


def test_session_raster_and_transform_match_the_grid(session):
    grid = session.grid
    raster = session.raster("T cells")
    assert raster.shape == (grid.n_rows, grid.n_cols) == (14, 10)
    t = grid.table
    np.testing.assert_allclose(raster[t["row"], t["col"]], session.scores("T cells"), rtol=1e-6)
    assert np.isnan(raster).sum() == grid.n_rows * grid.n_cols - len(t)
    scale, translate = session.heatmap_transform()
    assert scale == pytest.approx((224 * 0.499, 224 * 0.499))
    assert translate == pytest.approx((223 / 2 * 0.499,) * 2)
    lo, hi = session.contrast_limits("T cells")
    assert lo < hi
    first = t.iloc[0]
    assert session.tile_at((first.x + 10) * 0.499, (first.y + 200) * 0.499) == 0
    assert session.tile_at(-5.0, -5.0) is None


def test_session_exports_and_unknown_gene(session, tmp_path):
    csv, side = session.export_csv(tmp_path / "out.csv", ["MKI67", "T cells"])
    df = pd.read_csv(csv)
    assert list(df.columns[-2:]) == ["MKI67", "T cells"] and len(df) == len(session.grid.table)
    assert pd.read_csv(side)["name"].tolist() == ["MKI67", "T cells"]
    meta = json.loads(exports.tile_metadata_path(csv).read_text())
    assert meta["slide"] == "cmu-1-small-region.svs" and meta["score_columns"][:2] == ["MKI67", "T cells"]
    tif = session.export_heatmap_tiff(tmp_path / "h.tif", "MKI67")
    geo = session.export_geojson(tmp_path / "t.geojson", ["MKI67"])
    assert tif.stat().st_size > 0 and geo.stat().st_size > 0
    with pytest.raises(GeneError, match="Did you mean 'MKI67'"):
        session.scores("MKI76")


def test_set_model_with_another_backbone_drops_features(session, tmp_path):
    session.scores("MKI67")
    grid, feats = session.grid, session.features
    other = load_bundle(make_bundle(tmp_path / "o.safetensors", 6, backbone="other"))
    session.set_model(other)
    assert session.features is None and not session.ready and session.cached_names() == []
    with pytest.raises(ModelError, match="Run"):
        session.scores("MKI67")
    with pytest.raises(ModelError, match="backbone"):
        session.set_features(grid, feats, "toy")  # features of another backbone are refused


def test_missing_demo_model_is_a_clear_error(monkeypatch, tmp_path):
    from napari_he2rna import settings

    monkeypatch.setattr(settings, "sample_data_dir", lambda: tmp_path)
    with pytest.raises(ModelError, match="demo model is missing"):
        slide_session.load_model(None)


def test_output_paths_are_distinct_per_name():
    paths = spatialize.output_paths("/x/slide.svs", ["T cells", "T_cells", "MKI67"], "/out")
    pngs = [p.name for p in paths["png"].values()]
    assert pngs == ["slide_T_cells.png", "slide_T_cells_2.png", "slide_MKI67.png"]
    assert paths["slide_csv"].name == "slide_tile_scores_slide.csv"


# ------------------------------------------------------------------------------------ end to end (features)
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic sample slide and a random-weight demo bundle for the hed-stats backbone."""
    from napari_he2rna.features import backbones
    from napari_he2rna.synthetic import make_slide

    root = tmp_path_factory.mktemp("syn")
    slide = root / "sample.tiff"
    make_slide(slide, seed=3, size_px=(1120, 896), write_truth=False)
    dim = backbones.get_backbone("hed-stats").dim
    model = make_bundle(root / "demo.safetensors", dim)
    return slide, model


def test_spatialize_end_to_end(synthetic, tmp_path):
    slide, model = synthetic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gene_sets.PartialGeneSetWarning)
        res = spatialize.spatialize(slide, model, "CD3D, T cells,MKI67", tmp_path / "out", device="cpu")
    assert res.demo and list(res.scores.columns) == ["CD3D", "T cells", "MKI67"]
    df = pd.read_csv(res.csv_path)
    assert len(df) == res.n_tiles > 0
    meta = json.loads(res.metadata_path.read_text())
    assert meta["demo"] is True and meta["backbone"] == "hed-stats" and meta["tile_px"] == res.grid.tile_px
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(res.h5ad_path)
    np.testing.assert_array_equal(adata.obsm["spatial"], df[["x_px", "y_px"]].to_numpy())
    assert list(adata.var_names) == ["CD3D", "T cells", "MKI67"] and adata.uns["napari_he2rna"]["demo"]
    np.testing.assert_allclose(df["T cells"], res.scores["T cells"], rtol=1e-5)
    bundle = load_bundle(model)
    from napari_he2rna.features.backbones import get_backbone
    from napari_he2rna.features.cache import load_or_extract
    from napari_he2rna.slides.slide import open_slide

    with open_slide(slide) as s:  # the cache is reused: same features, same scores
        grid, feats = load_or_extract(s, get_backbone("hed-stats"), tile_um=112.0)
    np.testing.assert_allclose(df["MKI67"], bundle.tile_scores(feats, ["MKI67"])[:, 0], rtol=1e-4)
    assert set(res.png_paths) == {"CD3D", "T cells", "MKI67"}
    assert all(p.is_file() for p in res.png_paths.values())
    side = pd.read_csv(res.slide_csv_path)
    assert side["name"].tolist() == ["CD3D", "T cells", "MKI67"]
    assert res.geojson_path.is_file()
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_spatialize_cancel_in_the_middle_leaves_nothing(synthetic, tmp_path):
    import threading

    slide, model = synthetic
    cancel = threading.Event()
    calls = []

    def progress(done, total, message=""):
        calls.append(done)
        cancel.set()  # the user presses Cancel once extraction has started

    with pytest.raises(Cancelled):
        spatialize.spatialize(
            slide,
            model,
            ["MKI67"],
            tmp_path / "out",
            cancel=cancel,
            progress=progress,
            device="cpu",
            cache_dir=tmp_path / "fresh-cache",  # not the shared cache: extraction must really run
        )
    assert calls  # it was cancelled during extraction, not before
    assert os.listdir(tmp_path / "out") == []


def test_cli_spatialize(synthetic, tmp_path, capsys):
    slide, model = synthetic
    out = tmp_path / "cli"
    args = ["spatialize", str(slide), "--model", str(model), "--genes", 'MKI67,"B cells"', "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "DEMO model" in captured.err and "MS4A1" in captured.err  # demo and partial-set warnings
    assert str(out / "sample_tile_scores.csv") in captured.out
    assert (out / "sample_MKI67.png").is_file() and (out / "sample_B_cells.png").is_file()
    before = (out / "sample_tile_scores.csv").read_bytes()
    assert main(args) == 2  # refuses to overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "sample_tile_scores.csv").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main([*args[:4], "--genes", "MKI76", "--out", str(tmp_path / "bad")]) == 2
    assert "Did you mean 'MKI67'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_view_reads_widget_names_from_manifest(tmp_path):
    from napari_he2rna.napari import viewer as view

    manifest = tmp_path / "napari.yaml"
    manifest.write_text(
        "name: napari-he2rna\ncontributions:\n  widgets:\n"
        "    - command: napari-he2rna.model\n      display_name: Model\n"
        "    - command: napari-he2rna.genes\n      display_name: Gene picker\n"
    )
    assert view.manifest_widgets(manifest) == ["Model", "Gene picker"]
    assert view.manifest_widgets(tmp_path / "missing.yaml") == []


def test_warm_up_runs_small_backbones_and_skips_huge_ones_on_the_cpu(monkeypatch):
    import torch

    from napari_he2rna.features import extraction as features

    calls = []

    class Runner:
        def __init__(self, backbone, batch_size, precision, resize=True):
            calls.append((batch_size, precision))

        def __call__(self, tiles):
            calls[-1] = (*calls[-1], tiles.shape)

    class Fake(torch.nn.Module):
        input_px = 16

        def __init__(self, n):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(n), requires_grad=False)

        @property
        def device(self):
            return torch.device("cpu")

    monkeypatch.setattr(features, "BatchRunner", Runner)
    progressive.warm_up_extraction(Fake(10), 8)
    assert calls == [(8, "auto", (8, 16, 16, 3))]  # same batch shape as the extraction's first batch
    monkeypatch.setattr(progressive, "WARM_UP_MAX_CPU_PARAMS", 5)
    progressive.warm_up_extraction(Fake(10), 8)
    assert len(calls) == 1  # a backbone over the limit is not run on blank tiles


def test_progressive_run_imports_the_last_steps_library_after_the_coarse_map(monkeypatch, tmp_path):
    """The supertile step's import (1.5-2 s) neither delays the first tiles nor waits for the end."""
    import threading

    from napari_he2rna.maps.progressive import first_pass_size
    from napari_he2rna.slides.slide import open_slide

    at_import: list[int] = []
    imported = threading.Event()
    batches: list[int] = []
    opened = {}

    def fake_import():
        at_import.append(opened["session"].live.n_done)  # tiles extracted when the import starts
        imported.set()

    monkeypatch.setattr(progressive, "import_supertile_libraries", fake_import)
    sample = Path(slide_session.default_model_path()).parent / "sample_slide.tiff"
    with slide_session.SlideSession(open_slide(sample), slide_session.load_model(None)) as s:
        opened["session"] = s
        s.compute_features(
            device="cpu",
            cache_dir=tmp_path,
            progressive=True,
            batch_size=4,
            batch_ready=lambda d, t: batches.append(d),
        )
        coarse = first_pass_size(s.grid)
    assert imported.wait(10)
    assert len(at_import) == 1 and at_import[0] >= coarse  # started once, when the coarse map was done
    assert batches[0] < coarse < batches[-1]  # ...not before the first tiles, not after the last


def test_a_new_model_gets_its_own_gene_index_and_the_old_one_is_freed(cmu_slide):
    import gc
    import weakref

    from napari_he2rna.slides.slide import open_slide

    first = slide_session.load_model(None)
    gone = weakref.ref(first)
    with open_slide(cmu_slide) as slide:
        s = slide_session.SlideSession(slide, first)
        assert s.resolve("cd3d") == {"CD3D": ["CD3D"]}
        second = load_bundle(slide_session.default_model_path())
        second.genes = [g if g != "CD3D" else "CD3D_NEW" for g in second.genes]
        s.set_model(second)
        del first
        gc.collect()
        assert gone() is None  # nothing of the session (its gene index included) keeps the old model
        assert s.resolve("cd3d_new") == {"CD3D_NEW": ["CD3D_NEW"]}
        with pytest.raises(GeneError):
            s.resolve("CD3D")
