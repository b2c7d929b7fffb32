"""SEQUOIA's preprocessing applied from the bundle: tiles in pixels at a magnification, no resize, k-means.

A model converted with ``--preset sequoia-he2rna`` records 256 px tiles at 20x fed to ResNet50 as they are
and a slide input made of the means of k-means clusters of the tile features. Here two synthetic slides of
the same tissue, one scanned at 40x (0.25 µm/px, objective power in the file) and one at 20x (0.5 µm/px,
no objective power: the magnification comes from the pixel size), go through ``predict``, ``he2rna predict``
and ``spatialize`` with small bundles saved with those settings and a tiny registered backbone that records
the size of what it is fed; the slide-level values are checked against a forward pass written here from
the cached features (k-means of :mod:`napari_he2rna.model.aggregation` + the network), and a bundle without
the new settings against what it gave before (its store keeps its name and old stores still read).
"""

from __future__ import annotations

import json
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from napari_he2rna.cli import main
from napari_he2rna.errors import CacheWarning, ModelError
from napari_he2rna.features import backbones
from napari_he2rna.features.backbone_base import Backbone
from napari_he2rna.features.cache import cache_path, is_cached, load_or_extract, read_cache
from napari_he2rna.features.extraction import ExtractOptions, extract_features
from napari_he2rna.maps.predict import predict
from napari_he2rna.maps.spatialize import spatialize
from napari_he2rna.model.aggregation import Clustering, kmeans_cluster_means
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.slides.tiling import (
    MagnificationWarning,
    slide_magnification,
    tile_grid,
    tile_side_px,
)
from napari_he2rna.synthetic.writers import write_pyramid_tiff

GENES = ["ESR1", "ERBB2", "MKI67", "CD3D", "KRT8"]
KS = (1, 2, 5, 10, 20, 50, 100)
TINY = "tiny-recorder"
#: (B, C, H, W) of every batch the tiny backbone was fed, in order.
SEEN: list[tuple[int, ...]] = []
#: The tissue's side in µm: 6 x 6 tiles of 128 µm (256 px at 20x).
TISSUE_UM = 768

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_kmeans_thread", "tiny_backbone")


@pytest.fixture
def one_kmeans_thread():
    """scikit-learn's k-means on one thread (its spinning threads are slow on a busy shared machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


class TinyRecorder(Backbone):
    """A small fixed convolution, ReLU and global average pool (like ResNet50's end); records its inputs."""

    name = TINY
    dim = 8
    input_px = 224
    weights_hash = "tiny-recorder-v1"
    autocast = False

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.dim, kernel_size=8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.1)
            self.conv.bias.copy_(torch.rand(self.dim, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(tuple(x.shape))
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setitem(
        backbones.BACKBONES,
        TINY,
        backbones.BackboneSpec(TINY, lambda weights, download: TinyRecorder(), TinyRecorder.dim),
    )
    SEEN.clear()
    yield
    SEEN.clear()


def _tiny() -> Backbone:
    return backbones.get_backbone(TINY, device="cpu")


def _tissue(side: int, seed: int = 0) -> np.ndarray:
    """An H&E-like square of tissue (pink stroma, purple nuclei, a few kinds of texture) on white glass."""
    rng = np.random.default_rng(seed)
    margin = side // 8
    img = np.full((side + 2 * margin, side + 2 * margin, 3), 243, dtype=np.uint8)
    coarse = rng.random((12, 12))
    kind = np.kron(coarse, np.ones((side // 12 + 1, side // 12 + 1)))[:side, :side]
    pink = np.array([226, 150, 190], dtype=np.float32)
    purple = np.array([120, 70, 160], dtype=np.float32)
    nuclei = rng.random((side, side)) < 0.05 + 0.25 * kind
    tissue = np.where(nuclei[..., None], purple, pink) + rng.normal(0, 12, (side, side, 3))
    img[margin : margin + side, margin : margin + side] = tissue.clip(0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, object]:
    """The same tissue at 40x (0.25 µm/px, Aperio ``AppMag = 40``) and at 20x (0.5 µm/px, no power)."""
    root = tmp_path_factory.mktemp("sequoia-slides")
    at40 = _tissue(int(TISSUE_UM / 0.25))
    at20 = at40.reshape(at40.shape[0] // 2, 2, at40.shape[1] // 2, 2, 3).mean(axis=(1, 3)).round()
    h, w = at40.shape[:2]
    aperio = (
        f"Aperio Image Library v10.0.0\r\n{w}x{h} [0,0 {w}x{h}] (240x240) JPEG/RGB Q=90"
        "|AppMag = 40|MPP = 0.25"
    )
    return {
        "40x": write_pyramid_tiff(root / "slide40x.svs", at40, mpp=0.25, description=aperio),
        "20x": write_pyramid_tiff(root / "slide20x.tiff", at20.astype(np.uint8), mpp=0.5),
    }


def _folds(dim: int, n_folds: int = 2, hidden=(6, 6)) -> list[HE2RNA]:
    out = []
    for f in range(n_folds):
        torch.manual_seed(10 + f)
        m = HE2RNA(dim, len(GENES), hidden, 0.25)
        with torch.no_grad():
            for layer in m.layers:
                layer.weight.normal_(0, 0.5)
                layer.bias.normal_(0, 0.1)
        out.append(m.eval())
    return out


def _bundle(path, kind: str = "sequoia", backbone: str = TINY, dim: int = TinyRecorder.dim):
    """``sequoia``: 256 px at 20x, not resized, k-means (4 clusters, as the slides have ~36 tiles);
    ``resized``: the same tiles resized to the backbone's input; ``old``: 112 µm, top-k (no new field)."""
    models = _folds(dim)
    if kind == "old":
        return save_bundle(path, models, GENES, backbone, dim, 112.0, KS)
    return save_bundle(
        path,
        models,
        GENES,
        backbone,
        dim,
        128.0,
        KS,
        aggregation="kmeans" if kind == "sequoia" else "topk",
        tile_px=256,
        tile_magnification=20.0,
        input_resize=kind != "sequoia",
        clustering=Clustering(n_clusters=4) if kind == "sequoia" else None,
    )


def _reference_slide_prediction(bundle_path, features: np.ndarray) -> np.ndarray:
    """From the description: the means of the k-means clusters of the tile features, per fold the network
    (ReLU between layers, nothing after the last) on them, per gene the mean over k of the top-k mean,
    then the mean over folds."""
    bundle = load_bundle(bundle_path)
    c = bundle.clustering
    means = kmeans_cluster_means(features, c.n_clusters, c.random_state, c.n_init).astype(np.float64)
    per_fold = []
    for fold in bundle.to_modules():
        h = means
        for i, layer in enumerate(fold.layers):
            w, b = layer.weight.detach().numpy()[:, :, 0], layer.bias.detach().numpy()
            h = h @ w.T.astype(np.float64) + b
            if i < len(fold.layers) - 1:
                h = np.maximum(h, 0.0)
        ranked = np.sort(h, axis=0)[::-1]
        per_fold.append(np.mean([ranked[: min(k, len(ranked))].mean(axis=0) for k in KS], axis=0))
    return np.mean(per_fold, axis=0)


# -------------------------------------------------------------------------------------- the tile size rule
def test_the_tile_size_rule_takes_the_objective_power_else_the_pixel_size():
    def fake(power, mpp):
        return types.SimpleNamespace(path="fake.svs", objective_power=power, require_mpp=lambda: mpp)

    assert tile_side_px(fake(40.0, 0.25), 256, 20) == 512
    assert tile_side_px(fake(20.0, 0.5), 256, 20) == 256
    assert tile_side_px(fake(60.0, 0.17), 256, 20) == 768
    assert tile_side_px(fake(20.0, 0.25), 256, 20) == 256  # the stated power wins over the pixel size
    with pytest.warns(MagnificationWarning, match=r"taken as 40x from its pixel size .*512 level-0 px"):
        assert tile_side_px(fake(None, 0.2527), 256, 20) == 512
    for mpp, power in ((0.5, 20), (0.46, 20), (0.25, 40), (1.0, 10), (2.0, 5), (0.17, 60), (0.125, 80)):
        assert slide_magnification(fake(None, mpp)) == (power, "pixel size")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tile_side_px(fake(None, 0.5), 256, 20, warn=False) == 256


def test_the_grid_of_256_px_at_20x_is_512_level0_px_at_40x_and_256_at_20x(slides):
    options = ExtractOptions(tile_px=256, tile_magnification=20.0, input_px=256)
    with open_slide(slides["40x"]) as s40, open_slide(slides["20x"]) as s20:
        assert s40.objective_power == 40 and s20.objective_power is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the 40x slide states its power: nothing to say
            o40 = options.for_slide(s40)
        with pytest.warns(MagnificationWarning, match="slide20x.tiff does not state its objective power"):
            o20 = options.for_slide(s20)
        g40, g20 = tile_grid(s40, o40.tile_um), tile_grid(s20, o20.tile_um)
    assert (g40.tile_px, g20.tile_px) == (512, 256)
    assert g40.tile_side_um == pytest.approx(128.0) and g20.tile_side_um == pytest.approx(128.0)
    # the same tissue, the same tiles
    tiles40 = set(zip(g40.table["row"], g40.table["col"], strict=True))
    assert tiles40 == set(zip(g20.table["row"], g20.table["col"], strict=True))
    assert 25 <= len(g40) <= 49
    assert list(g40.table.columns) == ["tile_id", "row", "col", "x", "y", "size", "tissue_fraction"]


# ----------------------------------------------------------------------------------- backbone input, cache
def test_the_backbone_is_fed_256_px_tiles_and_the_store_says_so(slides, tmp_path):
    model = _bundle(tmp_path / "sequoia.safetensors")
    cache = tmp_path / "cache"
    result = predict(slides["40x"], model, cache_dir=cache)
    assert SEEN and {s[1:] for s in SEEN} == {(3, 256, 256)}
    assert sum(s[0] for s in SEEN) == result.n_tiles
    assert result.grid.tile_px == 512

    bundle = load_bundle(model)
    options = ExtractOptions.for_model(bundle)
    assert (options.tile_px, options.tile_magnification, options.input_px) == (256, 20.0, 256)
    with open_slide(slides["40x"]) as slide:
        store = cache_path(slide, TINY, cache_dir=cache, options=options)
        assert store.name.endswith(f"-{TINY}-256px20x-in256.zarr") and store.is_dir()
        old_name = cache_path(slide, TINY, 128.0, cache)
        assert old_name != store and old_name.name.endswith("-128um.zarr")
        assert is_cached(slide, _tiny(), options, cache_dir=cache)
    _, feats, attrs = read_cache(store)
    assert attrs["tile_px_at"] == [256, 20.0] and attrs["input_px"] == 256 and attrs["tile_px"] == 512
    assert attrs["tile_um"] == pytest.approx(128.0)

    # Cached: nothing more is fed.
    SEEN.clear()
    again = predict(slides["40x"], model, cache_dir=cache)
    assert SEEN == []
    pd.testing.assert_series_equal(again.predictions, result.predictions)

    # The same tiles resized to the backbone's 224 px: another store, never the 256 px one.
    resized = _bundle(tmp_path / "resized.safetensors", kind="resized")
    SEEN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # not a stale store recomputed: a store of its own
        predict(slides["40x"], resized, cache_dir=cache)
    assert SEEN and {s[1:] for s in SEEN} == {(3, 224, 224)}
    names = sorted(p.name.split(f"-{TINY}-")[1] for p in cache.glob("*.zarr"))
    assert names == ["256px20x-in256.zarr", "256px20x.zarr"]


def test_resnet50_takes_256_px_tiles_whole(slides, tmp_path):
    """The real backbone (random weights: only the sizes matter) at SEQUOIA's input: 2048 features."""
    from torchvision.models import resnet50

    from napari_he2rna.features.resnet import ResNet50Backbone

    torch.manual_seed(0)
    backbone = ResNet50Backbone(resnet50(weights=None).state_dict(), weights_hash="random").eval()
    shapes = []
    backbone.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    bundle = load_bundle(_bundle(tmp_path / "r50.safetensors", backbone="resnet50-imagenet", dim=2048))
    options = ExtractOptions.for_model(bundle, max_tiles=3, batch_size=3, device="cpu")
    with open_slide(slides["40x"]) as slide:
        grid, feats = load_or_extract(slide, backbone, options, cache_dir=tmp_path / "cache")
    assert shapes == [(3, 3, 256, 256)]
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and grid.tile_px == 512


def test_a_model_not_resized_without_its_pixel_size_is_one_sentence(tmp_path):
    path = save_bundle(tmp_path / "odd.safetensors", _folds(8), GENES, TINY, 8, 128.0, KS, input_resize=False)
    with pytest.raises(ModelError, match="without resizing but not their size in pixels"):
        ExtractOptions.for_model(load_bundle(path))


# -------------------------------------------------------------------------------------- slide-level values
@pytest.mark.parametrize("scan", ["40x", "20x"])
def test_he2rna_predict_is_the_kmeans_forward_pass_of_the_cached_features(slides, tmp_path, capsys, scan):
    model = _bundle(tmp_path / "sequoia.safetensors")
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["predict", str(slides[scan]), "--model", str(model), "--out", str(out), "--cache-dir", str(cache)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    # said once, on one line, where the magnification is a guess
    assert err.count("does not state its objective power: taken as 20x") == (1 if scan == "20x" else 0)
    assert {s[1:] for s in SEEN} == {(3, 256, 256)}

    (store,) = cache.glob("*-256px20x-in256.zarr")
    grid, feats, _ = read_cache(store)
    assert grid.tile_px == (512 if scan == "40x" else 256)
    stem = slides[scan].stem
    written = pd.read_csv(out / f"{stem}_prediction.csv")
    assert list(written["gene"]) == GENES
    reference = _reference_slide_prediction(model, feats)
    np.testing.assert_allclose(written["prediction"].to_numpy(), reference, atol=1e-5)
    # Not the top-k of the tiles: the k-means changes the value.
    topk = load_bundle(model)
    topk.aggregation = "topk"
    assert np.abs(topk.slide_prediction(feats) - reference).max() > 1e-3

    # Per-tile scores: the tile-level head on every tile.
    result = predict(slides[scan], model, cache_dir=cache)
    tiles = load_bundle(model).tile_scores(feats)
    np.testing.assert_allclose(result.scores[GENES].to_numpy(), tiles, atol=1e-6)
    np.testing.assert_allclose(result.predictions.to_numpy(), reference, atol=1e-5)

    meta = json.loads((out / f"{stem}_tile_scores.json").read_text())
    assert meta["model_tile_px"] == 256 and meta["model_tile_magnification"] == 20
    assert meta["slide_magnification"] == (40 if scan == "40x" else 20)
    assert meta["slide_magnification_from"] == ("objective power" if scan == "40x" else "pixel size")
    assert meta["backbone_input_px"] == 256 and meta["slide_aggregation"] == "kmeans"
    assert meta["tile_px"] == grid.tile_px


def test_spatialize_and_the_session_use_the_same_kmeans(slides, tmp_path):
    model = _bundle(tmp_path / "sequoia.safetensors")
    cache = tmp_path / "cache"
    names = ["ESR1", "MKI67"]
    done = spatialize(slides["40x"], model, names, tmp_path / "maps", cache_dir=cache, geojson=False)
    (store,) = cache.glob("*.zarr")
    _, feats, _ = read_cache(store)
    reference = _reference_slide_prediction(model, feats)
    np.testing.assert_allclose(done.predictions.to_numpy(), reference[[0, 2]], atol=1e-5)
    np.testing.assert_allclose(
        done.scores.to_numpy(), load_bundle(model).tile_scores(feats, names), atol=1e-6
    )
    assert {s[1:] for s in SEEN} == {(3, 256, 256)}

    # The Model dock's run: progressive, in the session; the same store, the same slide-level values.
    from napari_he2rna.maps.session import SlideSession

    SEEN.clear()
    with SlideSession.open(slides["40x"], model=model) as session:
        session.compute_features(cache_dir=tmp_path / "dock-cache", progressive=True, batch_size=8)
        assert {s[1:] for s in SEEN} == {(3, 256, 256)} and session.grid.tile_px == 512
        np.testing.assert_allclose(session.slide_predictions(names).to_numpy(), reference[[0, 2]], atol=1e-5)
        assert session.slide_info()["slide_aggregation"] == "kmeans"


# --------------------------------------------------------------------------------------------- old bundles
def test_an_old_bundle_gives_what_it_gave_before_and_its_old_store_still_reads(slides, tmp_path):
    model = _bundle(tmp_path / "old.safetensors", kind="old")
    bundle = load_bundle(model)
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MagnificationWarning)
        result = predict(slides["20x"], model, cache_dir=cache)
    assert {s[1:] for s in SEEN} == {(3, 224, 224)}
    (store,) = cache.glob("*.zarr")
    assert store.name.endswith(f"-{TINY}-112um.zarr")
    assert result.grid.tile_px == 224

    # What it was before: the 112 µm grid, tiles resized to 224 px, the top-k of the tile scores.
    with open_slide(slides["20x"]) as slide:
        grid = tile_grid(slide, 112.0)
        feats = extract_features(slide, grid, _tiny(), num_workers=1)
    pd.testing.assert_frame_equal(result.grid.table, grid.table)
    np.testing.assert_allclose(result.predictions.to_numpy(), bundle.slide_prediction(feats), atol=1e-6)
    np.testing.assert_allclose(result.scores[GENES].to_numpy(), bundle.tile_scores(feats), atol=1e-6)
    assert "model_tile_px" not in result.slide_info and "slide_aggregation" not in result.slide_info

    # A store written before the tile rule and input size were recorded still reads (no recompute).
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    for key in ("tile_px_at", "input_px"):
        del group.attrs[key]
    SEEN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        again = predict(slides["20x"], model, cache_dir=cache)
    assert SEEN == []
    pd.testing.assert_series_equal(again.predictions, result.predictions)
