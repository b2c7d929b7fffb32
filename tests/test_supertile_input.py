"""A model trained on supertiles predicts a new slide from its supertiles (k-means of the tile positions, the
mean feature of each), as it was trained, not from its thousands of tiles (model/aggregation.Supertiles)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_mixed_bundle import SLIDE, topk_means

from napari_he2rna.errors import ModelError
from napari_he2rna.features.extraction import supertile_means
from napari_he2rna.maps.session import SlideSession
from napari_he2rna.model.aggregation import Supertiles
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.network import HE2RNA

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KS = (2, 5)


def modules(dim: int, n_genes: int = 3, n_folds: int = 2) -> list[HE2RNA]:
    torch.manual_seed(0)
    return [HE2RNA(dim, n_genes, (8,), dropout=0.0).eval() for _ in range(n_folds)]


def expected(mods, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        per = [m(torch.from_numpy(x).T[None])[0].T.numpy() for m in mods]
    return np.mean([topk_means(t, KS) for t in per], axis=0)


def save(path: Path, mods, dim: int, supertiles=None) -> Path:
    genes = [f"G{i}" for i in range(mods[0].n_genes)]
    return save_bundle(path, mods, genes, "toy", dim, 112.0, KS, {}, supertiles=supertiles)


def test_a_slide_is_predicted_from_its_supertiles(tmp_path):
    rng = np.random.default_rng(1)
    mods = modules(4)
    bundle = load_bundle(save(tmp_path / "s.safetensors", mods, 4, Supertiles(k=10)))
    assert bundle.supertiles == Supertiles(10, 0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    pos = rng.uniform(0, 5000, size=(60, 2))
    st = supertile_means(pos, x, 10, 0)[0]
    assert st.shape == (10, 4)
    np.testing.assert_allclose(bundle.slide_prediction(x, positions=pos), expected(mods, st), rtol=1e-5)
    # not the tiles: the top-k of 60 tiles is another number
    assert not np.allclose(expected(mods, x), expected(mods, st), atol=1e-3)
    with pytest.raises(ModelError, match="give the tiles' positions"):
        bundle.slide_prediction(x + 1.0)  # another slide (the last one seen is cached)
    # a slide of no more tiles than supertiles: its tiles are its supertiles, no positions needed
    np.testing.assert_allclose(bundle.slide_prediction(x[:8]), expected(mods, x[:8]), rtol=1e-5)
    # a bundle without the setting (older ones, all-tile training) aggregates the tiles as before
    plain = load_bundle(save(tmp_path / "p.safetensors", mods, 4))
    assert plain.supertiles is None
    np.testing.assert_allclose(plain.slide_prediction(x), expected(mods, x), rtol=1e-5)


def test_the_viewer_session_uses_the_slides_supertiles(tmp_path):
    from napari_he2rna.slides.slide import open_slide
    from napari_he2rna.slides.tiling import tile_grid

    with open_slide(SLIDE) as slide:
        grid = tile_grid(slide, tile_um=112.0)
    dim = 5
    mods = modules(dim)
    bundle = load_bundle(save(tmp_path / "s.safetensors", mods, dim, Supertiles(k=20)))
    x = np.random.default_rng(2).normal(size=(len(grid.table), dim)).astype(np.float32)
    assert len(x) > 20
    want = expected(mods, supertile_means(grid.centers(), x, 20, 0)[0])
    with SlideSession.open(SLIDE, model=bundle) as session:
        session.set_features(grid, x, "toy")
        got = session.gene_slide_predictions(bundle.genes)
    np.testing.assert_allclose([got[g] for g in bundle.genes], want, rtol=1e-5)


def test_training_on_supertiles_records_it(tmp_path):
    from test_training import FAST, make_planted_cohort

    from napari_he2rna.model.fitting import fit, save_result
    from napari_he2rna.model.training import TrainConfig

    cohort = make_planted_cohort(n_patients=30)
    config = TrainConfig(max_epochs=2, **{**FAST, "val_fraction": 0.0})
    for model_type, want in (("he2rna", Supertiles()), ("ensemble", Supertiles()), ("ridge", None)):
        result = fit(cohort, model_type, config)
        bundle = load_bundle(save_result(result, cohort, tmp_path / f"{model_type}.safetensors", "bb", 112.0))
        assert bundle.supertiles == want, model_type
    tiles = fit(cohort, "he2rna", replace(config, mode="tiles", ks=(1, 2)))
    assert load_bundle(save_result(tiles, cohort, tmp_path / "t.safetensors", "bb", 112.0)).supertiles is None


@pytest.mark.parametrize("doc", [{"kind": "tiles"}, {"kind": "supertiles", "k": 0, "seed": 0}, "100"])
def test_malformed_supertile_settings_are_one_sentence(doc):
    with pytest.raises(ModelError):
        Supertiles.from_json(doc)


def test_a_bundle_with_a_malformed_slide_input_is_refused_in_one_sentence(tmp_path):
    import json
    import struct

    path = save(tmp_path / "s.safetensors", modules(4), 4, Supertiles(k=10))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["he2rna"])
    doc["slide_input"] = {"kind": "supertiles", "k": "many", "seed": 0}
    header["__metadata__"]["he2rna"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ModelError, match="malformed model metadata"):
        load_bundle(bad)
