"""``he2rna predict`` writes the tile table, sidecar and AnnData of ``spatialize``, and takes gene sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from napari_he2rna.cli import main
from napari_he2rna.features.hed_stats import HED_STATS_FEATURES
from napari_he2rna.maps.exports import TILE_CSV_COLUMNS
from napari_he2rna.model.bundle import save_bundle
from napari_he2rna.model.network import HE2RNA

SLIDE = Path(__file__).resolve().parents[1] / "sample_data" / "sample_slide.tiff"
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "MKI67"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    dim = len(HED_STATS_FEATURES)
    models = [HE2RNA(dim, len(GENES), hidden=(8,), dropout=0.0).eval()]
    out = tmp_path_factory.mktemp("model") / "m.safetensors"
    return save_bundle(out, models, GENES, "hed-stats", dim, 112.0, ks=[5])


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    args = ["predict", str(SLIDE), "--model", str(model), "--genes", "MKI67,CD3D+CD3E,T cells,T2=CD3G+CD247"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_the_tile_csv_is_a_plain_table_with_the_documented_columns(predicted):
    tiles = pd.read_csv(predicted / "sample_slide_tile_scores.csv")  # no options: one header row
    assert list(tiles.columns) == [*TILE_CSV_COLUMNS, "MKI67", "CD3D+CD3E", "T cells", "T2"]
    assert len(tiles) > 20 and tiles["x_um"].to_numpy() == pytest.approx(tiles["x_px"].to_numpy() * 0.5)
    meta = json.loads((predicted / "sample_slide_tile_scores.json").read_text())
    assert meta["format"] == "napari-he2rna tile scores" and meta["slide"] == "sample_slide.tiff"
    assert meta["score_columns"] == ["MKI67", "CD3D+CD3E", "T cells", "T2"]
    assert meta["tile_px"] == 224 and meta["backbone"] == "hed-stats"
    slide = pd.read_csv(predicted / "sample_slide_prediction.csv")
    assert list(slide["gene"]) == ["MKI67", "CD3D+CD3E", "T cells", "T2"]
    written = dict(zip(slide["gene"], slide["prediction"], strict=True))
    assert meta["slide_predictions"] == pytest.approx(written, abs=1e-5)
    assert not (predicted / "sample_slide_tile_scores_slide.csv").exists()  # predict's own slide table


def test_the_h5ad_reads_back_and_its_spatial_coordinates_are_the_csv_px(predicted):
    import anndata

    tiles = pd.read_csv(predicted / "sample_slide_tile_scores.csv")
    adata = anndata.read_h5ad(predicted / "sample_slide_tiles.h5ad")
    assert adata.shape == (len(tiles), 4) and list(adata.var_names) == ["MKI67", "CD3D+CD3E", "T cells", "T2"]
    np.testing.assert_array_equal(adata.obsm["spatial"], tiles[["x_px", "y_px"]].to_numpy(float))
    np.testing.assert_allclose(adata.obsm["spatial_um"], tiles[["x_um", "y_um"]].to_numpy(float))
    np.testing.assert_allclose(adata.X, tiles[list(adata.var_names)].to_numpy(), rtol=1e-5)  # %.6g
    assert adata.uns["napari_he2rna"]["slide"] == "sample_slide.tiff"


def test_the_tile_scores_read_back_as_a_grid(predicted):
    from napari_he2rna.validation import metrics

    grid, scores = metrics.read_tile_scores(predicted / "sample_slide_tile_scores.csv")
    assert grid.tile_px == 224 and grid.tile_side_um == pytest.approx(112.0)
    assert list(scores.columns) == ["MKI67", "CD3D+CD3E", "T cells", "T2"]


def test_sets_are_the_mean_of_their_genes_and_unknown_names_are_refused(model, predicted, tmp_path, capsys):
    out = tmp_path / "genes"
    assert (
        main(["predict", str(SLIDE), "--model", str(model), "--genes", "CD3G,CD247", "--out", str(out)]) == 0
    )
    genes = pd.read_csv(out / "sample_slide_tile_scores.csv")
    sets = pd.read_csv(predicted / "sample_slide_tile_scores.csv")
    np.testing.assert_allclose(sets["T2"], genes[["CD3G", "CD247"]].mean(axis=1), rtol=1e-5, atol=1e-5)
    args = [
        "predict",
        str(SLIDE),
        "--model",
        str(model),
        "--genes",
        "CD3D+NOPE2",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(args) == 0  # a set partly in the model: scored with the genes present, and said
    assert "NOPE2" in capsys.readouterr().err
    args = ["predict", str(SLIDE), "--model", str(model), "--genes", "NOPE", "--out", str(tmp_path / "y")]
    assert main(args) == 2
    assert "'NOPE' is not a gene of this model" in capsys.readouterr().err


def test_an_existing_h5ad_or_sidecar_is_refused_before_any_work(model, tmp_path, capsys):
    for name in ("sample_slide_tiles.h5ad", "sample_slide_tile_scores.json"):
        out = tmp_path / name.split(".")[-1]
        out.mkdir()
        (out / name).write_bytes(b"mine\n")
        assert main(["predict", str(SLIDE), "--model", str(model), "--genes", "CD3D", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(out / name) in err and "--overwrite" in err
        assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes() == b"mine\n"


def test_predict_in_memory_is_what_the_command_writes(model, predicted):
    from napari_he2rna import predict

    result = predict(SLIDE, model, "MKI67,CD3D+CD3E,T cells,T2=CD3G+CD247", device="cpu")
    slide = pd.read_csv(predicted / "sample_slide_prediction.csv")
    assert result.names == list(slide["gene"]) == list(result.predictions.index)
    np.testing.assert_allclose(result.predictions.to_numpy(), slide["prediction"], atol=1e-5)  # %.5f
    tiles = pd.read_csv(predicted / "sample_slide_tile_scores.csv")
    assert len(result.scores) == len(tiles) == result.n_tiles == len(result.grid.table)
    np.testing.assert_allclose(result.scores[result.names], tiles[result.names], rtol=1e-5, atol=1e-6)
    assert result.resolved["T2"] == ["CD3G", "CD247"] and not result.demo
    assert result.slide_info["slide"] == "sample_slide.tiff" and not result.assessment.outside


def test_predict_scores_every_tile_only_for_a_few_genes_or_those_asked_for(tmp_path):
    from napari_he2rna.maps.predict import MAX_TILE_GENES_BY_DEFAULT, predict

    genes = [*GENES, *(f"G{i}" for i in range(MAX_TILE_GENES_BY_DEFAULT))]
    dim = len(HED_STATS_FEATURES)
    torch.manual_seed(4)
    models = [HE2RNA(dim, len(genes), hidden=(8,), dropout=0.0).eval()]
    big = save_bundle(tmp_path / "big.safetensors", models, genes, "hed-stats", dim, 112.0, ks=[5])
    every = predict(SLIDE, big, device="cpu")
    assert every.names == genes and every.scores is None  # too many genes for per-tile scores by default
    asked = predict(SLIDE, big, ["G7", "MKI67"], device="cpu")
    assert list(asked.scores.columns) == ["G7", "MKI67"]
    assert asked.predictions.to_dict() == pytest.approx({g: every.predictions[g] for g in ("G7", "MKI67")})
