"""The HE2RNA network, top-k aggregation and the safetensors model bundle."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from napari_he2rna.errors import GeneError, ModelError
from napari_he2rna.maps.exports import TILE_CSV_COLUMNS
from napari_he2rna.model.bundle import load_bundle, save_bundle
from napari_he2rna.model.convert import convert_checkpoint
from napari_he2rna.model.network import HE2RNA, SUPERTILE_KS, topk_mean, topk_mean_multi

GENES = ["CD3D", "CD3E", "MKI67", "KRT8", "TP63"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _models(n_folds=2, dim=12, hidden=(16, 8), seed=0):
    torch.manual_seed(seed)
    return [
        HE2RNA(dim, len(GENES), hidden, output_bias=np.arange(len(GENES), dtype=np.float32)).eval()
        for _ in range(n_folds)
    ]


def _brute_topk(scores: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    b, g, _ = scores.shape
    out = np.zeros((b, g))
    for i in range(b):
        for j in range(g):
            valid = sorted(scores[i, j, mask[i]], reverse=True)
            out[i, j] = np.mean(valid[:k])
    return out


@pytest.fixture()
def bundle_path(tmp_path):
    models = _models()
    path = save_bundle(
        tmp_path / "model.safetensors",
        models,
        GENES,
        "hed-stats",
        12,
        112.0,
        SUPERTILE_KS,
        metadata={
            "cohort": {"n_samples": 10, "cancer_types": {"A": 10}},
            "validation_r": {"A": {"CD3D": 0.4}},
        },
        demo=True,
    )
    return path, models


# ------------------------------------------------------------------------------------------ aggregation


def test_topk_mean_equals_brute_force_with_masks():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 4, 30)).astype(np.float32)
    mask = np.ones((6, 30), dtype=bool)
    for i, n_valid in enumerate([30, 25, 7, 3, 1, 12]):
        mask[i, n_valid:] = False
    for k in (1, 2, 5, 10, 20, 50):  # 50 > N and > valid tiles: mean of all valid tiles
        got = topk_mean(torch.from_numpy(scores), torch.from_numpy(mask), k).numpy()
        np.testing.assert_allclose(got, _brute_topk(scores, mask, k), rtol=1e-5, atol=1e-6)


def test_inference_aggregation_is_mean_over_k():
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.normal(size=(3, 5, 40)).astype(np.float32))
    m = torch.ones(3, 40, dtype=torch.bool)
    m[1, 9:] = False
    ks = (1, 2, 5, 10, 20, 50, 100)
    expected = torch.stack([topk_mean(s, m, k) for k in ks]).mean(0)
    torch.testing.assert_close(topk_mean_multi(s, m, ks), expected)


def test_mask_keeps_padded_tiles_out():
    model = _models(1)[0]
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(2, 12, 20)).astype(np.float32))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 8:] = False
    x_huge = x.clone()
    x_huge[0, :, 8:] = 1e6  # padded slots full of huge values must change nothing
    a = model.predict(x, mask, SUPERTILE_KS)
    b = model.predict(x_huge, mask, SUPERTILE_KS)
    torch.testing.assert_close(a, b)
    # and the padded slide equals the same slide given alone, unpadded
    alone = model.predict(x[:1, :, :8], torch.ones(1, 8, dtype=torch.bool), SUPERTILE_KS)
    torch.testing.assert_close(a[:1], alone)
    # huge scores directly in the padded score slots: also ignored
    s = torch.randn(1, 3, 10)
    m = torch.zeros(1, 10, dtype=torch.bool)
    m[0, :4] = True
    s2 = s.clone()
    s2[0, :, 4:] = 1e9
    torch.testing.assert_close(topk_mean(s, m, 5), topk_mean(s2, m, 5))


def test_network_is_a_per_tile_mlp():
    model = HE2RNA(12, 5, hidden=(16, 8), dropout=0.25, output_bias=np.full(5, 2.5))
    assert [type(layer) for layer in model.layers] == [nn.Conv1d] * 3
    assert [layer.kernel_size for layer in model.layers] == [(1,)] * 3
    assert [layer.out_channels for layer in model.layers] == [16, 8, 5]
    torch.testing.assert_close(model.layers[-1].bias, torch.full((5,), 2.5))
    model.eval()
    x = torch.randn(1, 12, 7)
    full = model(x)
    one = model(x[:, :, 3:4])  # a tile's score does not depend on the other tiles
    torch.testing.assert_close(full[:, :, 3:4], one)
    # dropout acts in training mode only
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), full)


# ------------------------------------------------------------------------------------------ bundle


def test_bundle_roundtrip_identical_predictions(bundle_path):
    path, models = bundle_path
    bundle = load_bundle(path)
    assert bundle.genes == GENES and bundle.backbone == "hed-stats" and bundle.feature_dim == 12
    assert bundle.demo and bundle.n_folds == 2 and bundle.ks == SUPERTILE_KS and bundle.hidden == (16, 8)
    assert bundle.metadata["validation_r"]["A"]["CD3D"] == 0.4
    feats = np.random.default_rng(3).normal(size=(50, 12)).astype(np.float32)
    x = torch.from_numpy(feats.T[None])
    with torch.no_grad():
        per_fold = torch.stack([m(x)[0].T for m in models])  # (folds, N, G)
        slide = torch.stack(
            [m.predict(x, torch.ones(1, 50, dtype=torch.bool), SUPERTILE_KS)[0] for m in models]
        )
    np.testing.assert_allclose(bundle.tile_scores(feats), per_fold.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bundle.slide_prediction(feats), slide.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # reloading gives the same numbers again, and the modules rebuilt from it too
    again = load_bundle(path)
    np.testing.assert_array_equal(again.tile_scores(feats), bundle.tile_scores(feats))
    rebuilt = again.to_modules()[1].eval()
    torch.testing.assert_close(rebuilt(x), models[1](x))
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file


def test_tile_scores_gene_subset_equals_full_columns(bundle_path):
    bundle = load_bundle(bundle_path[0])
    feats = np.random.default_rng(4).normal(size=(300, 12)).astype(np.float32)
    full = bundle.tile_scores(feats)
    assert full.shape == (300, len(GENES))
    sub = bundle.tile_scores(feats, ["MKI67", "CD3D"])
    np.testing.assert_allclose(sub, full[:, [2, 0]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bundle.tile_scores(feats, "KRT8")[:, 0], full[:, 3], rtol=1e-6, atol=1e-6)
    assert bundle.slide_prediction(feats, ["TP63"]).shape == (1,)
    np.testing.assert_allclose(
        bundle.slide_prediction(feats, ["TP63"]), bundle.slide_prediction(feats)[[4]], rtol=1e-6
    )
    assert bundle.gene_index(["KRT8"]) == [3]
    with pytest.raises(GeneError):
        bundle.tile_scores(feats, ["NOT_A_GENE"])
    with pytest.raises(ModelError):
        bundle.tile_scores(feats[:, :5])


def test_check_features_and_describe(bundle_path):
    bundle = load_bundle(bundle_path[0])
    bundle.check_features("hed-stats", 12, 112.0)
    with pytest.raises(ModelError, match="backbone"):
        bundle.check_features("resnet50-imagenet", 12, 112.0)
    with pytest.raises(ModelError, match="features per tile"):
        bundle.check_features("hed-stats", 2048)
    with pytest.raises(ModelError, match="µm"):
        bundle.check_features("hed-stats", 12, 56.0)
    text = bundle.describe()
    assert "5 genes" in text and "DEMO" in text and "synthetic" in text


def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def test_tampered_bundles_are_refused(bundle_path, tmp_path):
    path, _ = bundle_path
    data = path.read_bytes()
    n, header = _header(data)

    def refused(blob: bytes, name: str, match: str | None = None):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ModelError, match=match) as err:
            load_bundle(p)
        assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)

    # a flipped byte in the weights
    flipped = bytearray(data)
    flipped[8 + n + 100] ^= 0xFF
    refused(bytes(flipped), "flipped.safetensors", "checksum")
    # an edited header: a gene renamed (same length, so the file stays well-formed)
    edited = data.replace(b"MKI67", b"MKI68", 1)
    assert edited != data
    refused(edited, "edited.safetensors", "checksum")
    # truncated files
    refused(data[: len(data) // 2], "truncated.safetensors")
    refused(data[:20], "short.safetensors")
    # header that is not JSON
    refused(data[:8] + b"{" * n + data[8 + n :], "badjson.safetensors", "header")
    # random bytes, empty file
    refused(np.random.default_rng(0).bytes(500), "random.safetensors")
    refused(b"", "empty.safetensors")
    # a valid safetensors file that is not a bundle
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="not a napari-he2rna model bundle"):
        load_bundle(tmp_path / "other.safetensors")
    # a pickle checkpoint is never loaded directly
    with pytest.raises(ModelError, match="convert"):
        load_bundle(tmp_path / "model.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_bundle(tmp_path / "missing.safetensors")


def test_bundle_with_wrong_shapes_or_keys_is_refused(tmp_path):
    from safetensors.torch import save

    from napari_he2rna.model import bundle as model_mod

    models = _models(1)
    tensors = {f"fold0.{k}": v.clone() for k, v in models[0].state_dict().items()}
    doc = json.dumps(
        {
            "genes": GENES,
            "backbone": "x",
            "feature_dim": 12,
            "tile_um": 112.0,
            "hidden": [16, 8],
            "dropout": 0.25,
            "ks": [1, 2],
            "n_folds": 1,
            "demo": False,
            "extra": {},
        },
        sort_keys=True,
    )

    def write(t, name, d=doc):
        meta = {
            "format": "napari-he2rna-model",
            "format_version": "1",
            "he2rna": d,
            "sha256": model_mod._tensor_digest(t, d),
        }  # a consistent checksum: only the shape check can fail
        (tmp_path / name).write_bytes(save(t, metadata=meta))
        return tmp_path / name

    assert load_bundle(write(tensors, "ok.safetensors")).genes == GENES
    bad = dict(tensors)
    bad["fold0.layers.1.weight"] = torch.zeros(8, 15, 1)
    with pytest.raises(ModelError, match="shape"):
        load_bundle(write(bad, "shape.safetensors"))
    missing = {k: v for k, v in tensors.items() if k != "fold0.layers.2.bias"}
    with pytest.raises(ModelError, match="missing"):
        load_bundle(write(missing, "missing.safetensors"))
    two_folds = json.loads(doc)
    two_folds["n_folds"] = 2
    with pytest.raises(ModelError, match="missing"):
        load_bundle(write(tensors, "folds.safetensors", json.dumps(two_folds, sort_keys=True)))
    no_genes = json.loads(doc)
    del no_genes["genes"]
    with pytest.raises(ModelError, match="metadata"):
        load_bundle(write(tensors, "nogenes.safetensors", json.dumps(no_genes)))


def test_save_bundle_refuses_inconsistent_inputs(tmp_path):
    models = _models(2)
    with pytest.raises(ModelError):
        save_bundle(tmp_path / "a.safetensors", models, GENES[:3], "x", 12, 112, SUPERTILE_KS)
    with pytest.raises(ModelError):
        save_bundle(tmp_path / "a.safetensors", models, GENES, "x", 2048, 112, SUPERTILE_KS)
    with pytest.raises(ModelError):
        save_bundle(tmp_path / "a.safetensors", [models[0], HE2RNA(12, 5, (4,))], GENES, "x", 12, 112, (1,))
    assert not (tmp_path / "a.safetensors").exists()


# ------------------------------------------------------------------------------------------ converter


def test_convert_paper_layout_and_linear_checkpoints(tmp_path):
    torch.manual_seed(5)
    # the paper's layout: a sequence of Conv1d(kernel 1) layers with ReLU/Dropout in between
    paper = nn.Sequential(nn.Conv1d(12, 16, 1), nn.ReLU(), nn.Dropout(0.25), nn.Conv1d(16, 5, 1)).eval()
    torch.save(paper.state_dict(), tmp_path / "paper.pt")
    out = convert_checkpoint(
        tmp_path / "paper.pt", tmp_path / "paper.safetensors", GENES, backbone="resnet50-imagenet"
    )
    bundle = load_bundle(out)
    assert bundle.hidden == (16,) and bundle.feature_dim == 12 and bundle.backbone == "resnet50-imagenet"
    feats = torch.randn(40, 12)
    with torch.no_grad():
        expected = paper(feats.T[None])[0].T.numpy()
    np.testing.assert_allclose(bundle.tile_scores(feats.numpy()), expected, rtol=1e-5, atol=1e-6)

    # SEQUOIA-style fold checkpoints: dense layers, nested under a key, one file per fold in a folder
    folder = tmp_path / "he2rna-brca"
    folder.mkdir()
    dense = []
    for fold in range(2):
        m = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
        dense.append(m)
        torch.save({"epoch": 3, "model_state_dict": m.state_dict()}, folder / f"he2rna-brca-{fold}.pth")
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("\n".join(GENES) + "\n")
    bundle = load_bundle(convert_checkpoint(folder, tmp_path / "brca.safetensors", genes_file, tile_um=112.0))
    assert bundle.n_folds == 2 and bundle.genes == GENES
    with torch.no_grad():
        expected = torch.stack([m(feats) for m in dense]).mean(0).numpy()
    np.testing.assert_allclose(bundle.tile_scores(feats.numpy()), expected, rtol=1e-5, atol=1e-6)


def test_convert_refuses_what_does_not_fit(tmp_path):
    torch.manual_seed(6)
    good = nn.Sequential(nn.Conv1d(12, 16, 1), nn.ReLU(), nn.Conv1d(16, 5, 1))
    torch.save(good.state_dict(), tmp_path / "good.pt")
    with pytest.raises(ModelError, match="5 outputs"):
        convert_checkpoint(tmp_path / "good.pt", tmp_path / "o.safetensors", GENES[:2])
    with pytest.raises(ModelError, match="features per tile"):
        convert_checkpoint(tmp_path / "good.pt", tmp_path / "o.safetensors", GENES, feature_dim=2048)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 5, 1))
    torch.save(other.state_dict(), tmp_path / "conv2d.pt")
    with pytest.raises(ModelError, match="not a layer"):
        convert_checkpoint(tmp_path / "conv2d.pt", tmp_path / "o.safetensors", GENES)
    unchained = OrderedDict(
        a=torch.zeros(16, 12, 1), b=torch.zeros(16), c=torch.zeros(5, 10, 1), d=torch.zeros(5)
    )
    torch.save(unchained, tmp_path / "unchained.pt")
    with pytest.raises(ModelError, match="chain"):
        convert_checkpoint(tmp_path / "unchained.pt", tmp_path / "o.safetensors", GENES)
    # a whole pickled module is refused by weights_only loading: no code from the file runs
    torch.save(good, tmp_path / "whole.pt")
    with pytest.raises(ModelError, match="weights-only"):
        convert_checkpoint(tmp_path / "whole.pt", tmp_path / "o.safetensors", GENES)
    assert not (tmp_path / "o.safetensors").exists()


def test_predict_command_on_a_real_slide(cmu_slide, tmp_path, capsys):
    from napari_he2rna.cli import main
    from napari_he2rna.features.backbones import backbone_info

    dim = backbone_info("hed-stats").dim
    torch.manual_seed(7)
    models = [HE2RNA(dim, len(GENES), (8,)).eval()]
    model = save_bundle(
        tmp_path / "m.safetensors", models, GENES, "hed-stats", dim, 112.0, SUPERTILE_KS, demo=True
    )
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(cmu_slide),
                "--model",
                str(model),
                "--genes",
                "CD3D,MKI67",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    import pandas as pd

    slide_csv = pd.read_csv(out / "cmu-1-small-region_prediction.csv")
    tiles = pd.read_csv(out / "cmu-1-small-region_tile_scores.csv")
    assert list(slide_csv["gene"]) == ["CD3D", "MKI67"]
    assert list(tiles.columns) == [*TILE_CSV_COLUMNS, "CD3D", "MKI67"] and len(tiles) > 20
    # the slide-level value is the top-k aggregation of the very tile scores written
    s = torch.tensor(tiles[["CD3D", "MKI67"]].to_numpy().T[None], dtype=torch.float32)
    expected = topk_mean_multi(s, None, SUPERTILE_KS)[0].numpy()
    np.testing.assert_allclose(slide_csv["prediction"], expected, atol=2e-5)
    again = ["predict", str(cmu_slide), "--model", str(model), "--genes", "CD3D", "--out", str(out)]
    assert main(again) == 2  # the earlier outputs are there: refused, not replaced
    assert "--overwrite" in capsys.readouterr().err
    assert main([*again[:5], "NOPE", *again[6:], "--overwrite"]) == 2
    assert "'NOPE' is not a gene of this model" in capsys.readouterr().err


def test_a_renamed_pickle_is_called_a_checkpoint(tmp_path):
    import torch

    from napari_he2rna.errors import ModelError
    from napari_he2rna.model.bundle import load_bundle

    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # a zip-format pickle under a bundle's name
    with pytest.raises(ModelError, match="is a PyTorch checkpoint .a pickle.*he2rna convert"):
        load_bundle(path)
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a raw pickle
    with pytest.raises(ModelError, match="is a PyTorch checkpoint"):
        load_bundle(path)
