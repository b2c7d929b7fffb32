"""ood.py: the feature reference, tile and slide distances, the assessment, and the CLI outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_he2rna.cli import main
from napari_he2rna.errors import ModelError
from napari_he2rna.model import ood
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "sample_data" / "sample_slide.tiff"
GENES = ["CD3D", "CD3E", "CD3G", "CD247", "MKI67", "GAPDH"]


def _slides(rng, n, dim, shift=0.0, scales=None):
    scales = np.geomspace(0.01, 100.0, dim) if scales is None else scales
    return [
        (rng.normal(size=(int(rng.integers(40, 300)), dim)) * scales + 5.0 + shift * scales).astype(
            np.float32
        )
        for _ in range(n)
    ]


def _bundle(path: Path, dim: int = 33, metadata=None, genes=GENES, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    net = HE2RNA(dim, len(genes), hidden=(16,), dropout=0.0).eval()
    return save_bundle(path, [net], genes, "hed-stats", dim, 112.0, [1, 10], metadata=metadata or {})


# --------------------------------------------------------------------------------------------- fitting
def test_streaming_moments_equal_batch_moments():
    rng = np.random.default_rng(1)
    slides = _slides(rng, 7, 12)
    builder = ood.ReferenceBuilder()
    for s in slides:
        builder.add(s)
    builder.add(np.zeros((0, 12), np.float32))  # an empty slide is skipped
    stacked = np.concatenate(slides).astype(np.float64)
    np.testing.assert_allclose(builder.mean, stacked.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(builder.std, stacked.std(axis=0), rtol=1e-9)
    ref = builder.finish()
    assert ref["n_slides"] == 7 and ref["n_tiles"] == len(stacked) and ref["dim"] == 12
    np.testing.assert_allclose(ref["mean"], stacked.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ref["std"], stacked.std(axis=0), rtol=1e-9)
    assert ref["distance"] == ood.DISTANCE_NAME
    json.dumps(ref, allow_nan=False)  # JSON-able, no NaN
    # fit_reference wraps the builder, and the same slides in the same order give the same reference
    assert ood.fit_reference(slides) == ref


def test_thresholds_and_bounded_subsample():
    rng = np.random.default_rng(2)
    slides = _slides(rng, 40, 20)
    ref = ood.fit_reference(slides, tiles_per_slide=16, max_slides=10, margin=1.5)
    assert ref["n_tiles_sampled"] == 10 * 16  # bounded: 10 slides of 16 tiles kept out of 40 slides
    assert ref["tile_threshold"] == pytest.approx(1.5 * ref["training_tile_quantile"])
    assert ref["slide_threshold"] == pytest.approx(
        1.5 * ref["training_slide_max"], rel=0.05
    )  # 99% quantile of 10 slides is near their max
    # a typical tile of this distribution is at about 1 (RMS z), whatever the dimension
    fresh = _slides(np.random.default_rng(3), 5, 20)
    d = np.concatenate([ood.tile_distance(ref, s) for s in fresh])
    assert 0.8 < np.median(d) < 1.2
    assert np.mean(d > ref["tile_threshold"]) < 0.01
    slide_d = [ood.slide_distance(ref, s) for s in fresh]
    assert max(slide_d) < ref["slide_threshold"]


def test_builder_refuses_bad_input_with_one_sentence():
    b = ood.ReferenceBuilder()
    with pytest.raises(ValueError, match="no training slide"):
        b.finish()
    b.add(np.ones((3, 4)))
    with pytest.raises(ValueError, match="first slide had 4"):
        b.add(np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        b.add(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(n_tiles, dim\)"):
        b.add(np.ones(4))


def test_target_range():
    expr = pd.DataFrame({"A": [0.5, 2.0, np.nan], "B": [1.0, 1.0, 3.5], "C": [np.nan] * 3})
    assert ood.target_range(expr) == {"A": [0.5, 2.0], "B": [1.0, 3.5]}


# ------------------------------------------------------------------------------------------ assessment
@pytest.fixture(scope="module")
def gaussian_bundle(tmp_path_factory):
    rng = np.random.default_rng(4)
    dim = 33
    ref = ood.fit_reference(_slides(rng, 8, dim))
    ranges = {g: [-50.0, 50.0] for g in GENES}
    path = _bundle(
        tmp_path_factory.mktemp("ood") / "g.safetensors",
        dim,
        {ood.REFERENCE_KEY: ref, ood.TARGET_RANGE_KEY: ranges},
    )
    return load_bundle(path)


def test_bundle_round_trip_keeps_the_reference(gaussian_bundle):
    ref = gaussian_bundle.metadata[ood.REFERENCE_KEY]
    assert ood.bundle_reference(gaussian_bundle) == ref
    assert len(ref["mean"]) == 33 and ref["n_slides"] == 8
    assert ood.bundle_target_range(gaussian_bundle)["CD3D"] == (-50.0, 50.0)


def test_shifted_slide_is_flagged_in_distribution_one_is_not(gaussian_bundle):
    rng = np.random.default_rng(5)
    inside = _slides(rng, 1, 33)[0]
    a = ood.assess(gaussian_bundle, inside)
    assert a.available and not a.features_outside and a.fraction_beyond < 0.05
    assert a.slide_distance < a.slide_threshold
    assert "within the model's training data" in a.message
    shifted = _slides(rng, 1, 33, shift=3.0)[0]  # every feature 3 std off: another scanner or stain
    b = ood.assess(gaussian_bundle, shifted)
    assert b.features_outside and b.outside and b.fraction_beyond > 0.9
    assert b.slide_distance > 2 * b.slide_threshold
    assert b.message.startswith("this slide's features are outside the model's training data")
    assert f"{b.slide_distance:.2f}" in b.message or f"{b.slide_distance:.1f}" in b.message
    assert b.tile_distances.shape == (len(shifted),)
    # half the tiles shifted: the median may stay in, the fraction beyond flags it
    half = inside.copy()
    half[: int(0.4 * len(half))] += 3.0 * np.geomspace(0.01, 100.0, 33).astype(np.float32)
    c = ood.assess(gaussian_bundle, half)
    assert c.features_outside and "% of this slide's tiles" in c.message


def test_predictions_beyond_the_training_targets_are_flagged(tmp_path):
    rng = np.random.default_rng(6)
    slides = _slides(rng, 4, 33)
    bundle = load_bundle(_bundle(tmp_path / "r.safetensors", 33, {ood.TARGET_RANGE_KEY: {"CD3D": [1, 2]}}))
    a = ood.assess(bundle, slides[0], {"CD3D": -85.0, "T cells": -85.0, "MKI67": -70.0})
    assert not a.available and a.range_checked and a.outside
    assert a.genes_out_of_range == ["CD3D"] and a.n_out_of_range == 1  # sets / genes without range ignored
    assert "CD3D" in a.message and "outside the range of the training targets" in a.message
    assert ood.assess(bundle, slides[0], {"CD3D": 2.05}).outside is False  # within the 10% tolerance
    # predictions=None: the model's own slide predictions of every gene with a range are checked
    pred = float(bundle.slide_prediction(slides[0], ["CD3D"])[0])
    got = ood.assess(bundle, slides[0])
    assert got.outside == (not 0.9 <= pred <= 2.1)


def test_bundle_without_reference_says_unavailable(tmp_path):
    feats = np.random.default_rng(7).normal(size=(20, 33)).astype(np.float32)
    old = load_bundle(_bundle(tmp_path / "old.safetensors"))
    a = ood.assess(old, feats)
    assert not a.available and not a.outside and a.tile_distances is None
    assert "unavailable" in a.message and "no feature reference" in a.message
    bad = load_bundle(_bundle(tmp_path / "bad.safetensors", metadata={ood.REFERENCE_KEY: {"mean": [1, 2]}}))
    b = ood.assess(bad, feats)
    assert not b.available and not b.outside and "malformed" in b.message
    with pytest.raises(ModelError, match="33 features per tile"):
        ood.tile_distance(ood.fit_reference([feats]), feats[:, :5])


def test_dead_resnet_channels_do_not_decide_alone():
    """2048-d ReLU features with many near-constant channels: the std floor keeps them from exploding."""
    rng = np.random.default_rng(8)
    dim = 2048
    scales = np.where(np.arange(dim) % 4 == 0, 1e-7, rng.uniform(0.5, 2.0, dim))  # a quarter dead
    ref = ood.fit_reference([np.abs(rng.normal(size=(100, dim)) * scales) for _ in range(4)])
    fresh = np.abs(rng.normal(size=(100, dim)) * scales)
    fresh[:, ::4] += 1e-3  # dead channels wake up a little on a new slide
    assert ood.slide_distance(ref, fresh) < ref["slide_threshold"]
    assert ood.slide_distance(ref, fresh * 3.0) > ref["slide_threshold"]


def test_warning_is_drawn_on_the_heatmap_png(tmp_path):
    from PIL import Image

    from napari_he2rna.maps import heatmaps
    from napari_he2rna.slides.tiling import TileGrid

    table = pd.DataFrame(
        {
            "tile_id": [0, 1],
            "row": [0, 0],
            "col": [0, 1],
            "x": [0, 224],
            "y": [0, 0],
            "size": [224, 224],
            "tissue_fraction": [1.0, 1.0],
        }
    )
    grid = TileGrid(table, 224, 112.0, 0.5, 1, 2, (448, 224))
    thumb = np.full((56, 112, 3), 230, np.uint8)  # 4 level-0 px per thumbnail px
    plain = heatmaps.render_heatmap_png(tmp_path / "a.png", thumb, 4.0, grid, [1.0, 2.0], "CD3D")
    msg = "this slide's features are outside the model's training data: its scores are not predictions."
    warned = heatmaps.render_heatmap_png(
        tmp_path / "b.png", thumb, 4.0, grid, [1.0, 2.0], "CD3D", warning=msg
    )
    a, b = Image.open(plain), Image.open(warned)
    assert "Warning" not in a.text and msg in b.text["Warning"]
    assert b.size[1] > a.size[1]  # the sentence adds a line under the picture
    rgb = np.asarray(b.convert("RGB")).astype(int)[a.size[1] :]
    red = (rgb[..., 0] > 100) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    assert red.sum() > 50  # dark-red text and frame


# ---------------------------------------------------------------------------------- CLI, real files
@pytest.fixture(scope="module")
def synthetic_bundle(tmp_path_factory) -> Path:
    """A small hed-stats bundle whose reference is fitted on eight generated synthetic slides."""
    from napari_he2rna.features.cache import load_or_extract
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.synthetic import make_slide

    root = tmp_path_factory.mktemp("synref")
    feats = []
    for seed in range(1, 9):
        path = root / f"ref{seed}.tiff"
        make_slide(path, seed=seed, size_px=(1344, 1344), write_truth=False)
        with open_slide(path) as s:
            feats.append(load_or_extract(s, "hed-stats", cache_dir=root / "cache", num_workers=1)[1])
    ref = ood.fit_reference(feats)
    path = _bundle(root / "synthetic.safetensors", 33, {ood.REFERENCE_KEY: ref})
    # Training targets spanning this model's own predictions on the reference slides, one log unit wider.
    bundle = load_bundle(path)
    preds = pd.DataFrame([bundle.slide_prediction(f) for f in feats], columns=GENES)
    ranges = {g: [v[0] - 1.0, v[1] + 1.0] for g, v in ood.target_range(preds).items()}
    return _bundle(path, 33, {ood.REFERENCE_KEY: ref, ood.TARGET_RANGE_KEY: ranges})


def _spatialize(slide: Path, model: Path, out: Path, capsys) -> tuple[str, pd.DataFrame]:
    rc = main(
        ["spatialize", str(slide), "--model", str(model), "--genes", "T cells,MKI67", "--out", str(out)]
    )
    assert rc == 0
    err = capsys.readouterr().err
    csv = pd.read_csv(out / f"{slide.stem}_tile_scores.csv")
    return err, csv


def test_spatialize_warns_on_the_real_slide_not_on_the_sample(synthetic_bundle, cmu_slide, tmp_path, capsys):
    ref = load_bundle(synthetic_bundle).metadata[ood.REFERENCE_KEY]
    err, csv = _spatialize(cmu_slide, synthetic_bundle, tmp_path / "cmu", capsys)
    lines = [ln for ln in err.splitlines() if "outside the model's training data" in ln]
    assert len(lines) == 1 and lines[0].startswith("he2rna: warning: this slide's features are outside")
    assert ood.DISTANCE_COLUMN in csv.columns
    assert csv[ood.DISTANCE_COLUMN].median() > ref["slide_threshold"]
    meta = json.loads((tmp_path / "cmu" / "cmu-1-small-region_tile_scores.json").read_text())
    assert meta["outside_training_data"] is True
    from PIL import Image

    png = Image.open(tmp_path / "cmu" / "cmu-1-small-region_MKI67.png")
    assert "outside the model's training data" in png.text["Warning"]

    err, csv = _spatialize(SAMPLE_SLIDE, synthetic_bundle, tmp_path / "sample", capsys)
    assert "outside" not in err and "training targets" not in err
    assert ood.DISTANCE_COLUMN in csv.columns
    assert csv[ood.DISTANCE_COLUMN].median() < ref["slide_threshold"]
    assert "Warning" not in Image.open(tmp_path / "sample" / "sample_slide_MKI67.png").text


def test_predict_warns_and_writes_the_distance(synthetic_bundle, cmu_slide, tmp_path, capsys):
    rc = main(["predict", str(cmu_slide), "--model", str(synthetic_bundle), "--out", str(tmp_path)])
    assert rc == 0
    assert "he2rna: warning: this slide's features are outside" in capsys.readouterr().err
    csv = pd.read_csv(tmp_path / "cmu-1-small-region_tile_scores.csv")
    assert list(csv.columns[-1:]) == [ood.DISTANCE_COLUMN] and (csv[ood.DISTANCE_COLUMN] > 0).all()


def test_demo_bundle_flags_real_slide(cmu_slide, tmp_path, capsys):
    """The committed demo bundle (synthetic slides) warns on a real H&E region and not on the sample slide."""
    from napari_he2rna.maps.session import default_model_path

    assert ood.bundle_reference(load_bundle(default_model_path())) is not None
    for slide, warned in ((cmu_slide, True), (SAMPLE_SLIDE, False)):
        rc = main(["spatialize", str(slide), "--genes", "T cells,MKI67", "--out", str(tmp_path / slide.stem)])
        assert rc == 0
        err = capsys.readouterr().err
        assert ("outside the model's training data" in err) is warned, err
