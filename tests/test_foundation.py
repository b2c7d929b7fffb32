"""Foundation backbones from the Hugging Face hub, loaded offline from tiny locally made models.

Each tiny model is saved the way the hub holds it (config.json + model.safetensors; timm's hub config with
``architecture``, ``model_args`` and ``pretrained_cfg``), as a plain folder and inside a temporary hub cache
(``models--org--name/snapshots/<rev>/``, ``refs/main``) with the hub offline, and goes through the real
extraction path. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from napari_he2rna.cli import main
from napari_he2rna.errors import MissingExtraError, WeightsError
from napari_he2rna.features.backbones import BACKBONES, backbone_info, get_backbone, register_hub_backbone
from napari_he2rna.features.cache import load_or_extract
from napari_he2rna.features.extraction import extract_features
from napari_he2rna.features.hub import HubBackbone, HubModel, hub_snapshot_files, read_json
from napari_he2rna.slides.slide import open_slide
from napari_he2rna.slides.tiling import tile_grid

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 224, "patch_size": 16}
MEAN, STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.15)
REV = "0123456789abcdef0123456789abcdef01234567"


def _save_timm(folder, arch="vit_base_patch16_224", seed=0, card_args=None, **model_args):
    """A tiny timm ViT in the layout timm pushes to the hub; returns the network.

    ``card_args`` are passed to timm but not written to config.json (layer classes, as the model cards
    of UNI2-h and Virchow2 pass them).
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    args = {**TINY_VIT, **model_args}
    net = timm.create_model(arch, pretrained=False, num_classes=0, **args, **(card_args or {})).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": net.num_features,
        "global_pool": net.global_pool,
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": list(MEAN), "std": list(STD)},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    return net


def _save_vit_transformers(folder, seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
    )
    net = transformers.ViTModel(config, add_pooling_layer=False).eval()
    net.save_pretrained(str(folder))  # config.json + model.safetensors, as on the hub
    return net


def _gated_error(message):
    """huggingface_hub's GatedRepoError, built with the HTTP response type its version takes."""
    from huggingface_hub.errors import GatedRepoError

    for module in ("httpx2", "httpx"):
        try:
            http = __import__(module)
            response = http.Response(401, request=http.Request("GET", "https://huggingface.co/api/models/x"))
            return GatedRepoError(message, response=response)
        except (ImportError, TypeError):
            continue
    return GatedRepoError(message, response=None)


def _into_hub_cache(cache, hub_id, folder):
    """Copy a snapshot folder into a hub cache the way huggingface_hub lays it out."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache with the hub offline (env and the constants huggingface_hub read at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HE2RNA_WEIGHTS", str(tmp_path / "no-weights"))
    return cache


@pytest.fixture
def registry(monkeypatch):
    """Registry changes made by a test are undone after it."""
    monkeypatch.setattr("napari_he2rna.features.backbones.BACKBONES", dict(BACKBONES))
    from napari_he2rna.features import backbones

    return backbones.BACKBONES


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    with open_slide(cmu_slide) as slide:
        yield slide


@pytest.fixture(scope="module")
def grid(cmu):
    return tile_grid(cmu, max_tiles=3, seed=0)


def _by_hand(net, slide, grid, pool):
    """What the model card's code computes for the same tiles (preprocessing as published)."""
    from napari_he2rna.slides.tiling import read_tiles

    tiles = read_tiles(slide, grid, np.arange(len(grid.table)), 224, 1)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return pool(net, x).numpy()


def test_timm_model_from_a_folder_and_from_the_offline_hub_cache(tmp_path, offline_hub, registry, cmu, grid):
    folder = tmp_path / "tiny-uni"
    net = _save_timm(folder)
    register_hub_backbone(
        "tiny-uni", HubModel("test-org/tiny-uni", "timm", "cls", 32, MEAN, STD, 224, "vit_base_patch16_224")
    )
    want = _by_hand(net, cmu, grid, lambda n, x: n.forward_features(x)[:, 0])

    from_folder = get_backbone("tiny-uni", weights=folder, device="cpu")
    assert isinstance(from_folder, HubBackbone) and (from_folder.dim, from_folder.input_px) == (32, 224)
    feats = extract_features(cmu, grid, from_folder, batch_size=2, precision="fp32")
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)

    _into_hub_cache(offline_hub, "test-org/tiny-uni", folder)
    by_name = get_backbone("tiny-uni", device="cpu")  # the registry's hub id, from the cache, offline
    by_id = get_backbone("hf-hub:test-org/tiny-uni", device="cpu")  # a registered id gives its entry
    assert by_name.name == by_id.name == "tiny-uni" and by_name.weights_hash == from_folder.weights_hash
    np.testing.assert_allclose(
        extract_features(cmu, grid, by_id, precision="fp32"), want, rtol=1e-4, atol=1e-5
    )

    # Through the cache of features, like `he2rna extract`.
    g, stored = load_or_extract(cmu, by_name, cache_dir=tmp_path / "cache", max_tiles=3, precision="fp32")
    assert stored.shape == (len(g.table), 32)


def test_unregistered_hub_id_and_local_folder_take_their_own_config(tmp_path, offline_hub, cmu, grid):
    folder = tmp_path / "other"
    net = _save_timm(folder, seed=1)
    _into_hub_cache(offline_hub, "someone/tiny-encoder", folder)
    assert backbone_info("someone/tiny-encoder").dim is None  # known once built
    hub = get_backbone("someone/tiny-encoder", device="cpu")
    local = get_backbone(str(folder), device="cpu")
    assert hub.name == "hf-hub:someone/tiny-encoder" and local.name == "local-other"
    assert hub.dim == local.dim == 32
    # The snapshot's own mean/std (pretrained_cfg) and timm's own pooling (the class token here).
    want = _by_hand(net, cmu, grid, lambda n, x: n(x))
    for backbone in (hub, local):
        np.testing.assert_allclose(
            extract_features(cmu, grid, backbone, precision="fp32"), want, rtol=1e-4, atol=1e-5
        )
    # A snapshot folder inside the cache is known by its hub id.
    snap = offline_hub / "models--someone--tiny-encoder" / "snapshots" / REV
    assert get_backbone(str(snap), device="cpu").name == "hf-hub:someone/tiny-encoder"


def test_class_token_and_mean_patch_tokens_like_virchow2(tmp_path, registry, cmu, grid):
    folder = tmp_path / "tiny-virchow"
    card = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    net = _save_timm(
        folder,
        arch="vit_huge_patch14_224",
        card_args=card,
        reg_tokens=4,
        global_pool="",
        mlp_ratio=2.0,
        init_values=1e-5,
        patch_size=14,
    )
    model = HubModel("test-org/tiny-virchow", "timm", "cls+mean", 64, MEAN, STD, 224)
    with_card = dataclasses.replace(model, timm_kwargs={"mlp_layer": "SwiGLUPacked", "act_layer": "silu"})
    register_hub_backbone("tiny-virchow", with_card)
    backbone = get_backbone("tiny-virchow", weights=folder, device="cpu")
    assert backbone.dim == 64 and backbone.n_prefix_tokens == 5

    def by_card(n, x):
        tokens = n.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)

    feats = extract_features(cmu, grid, backbone, precision="fp32")
    np.testing.assert_allclose(feats, _by_hand(net, cmu, grid, by_card), rtol=1e-4, atol=1e-5)
    # Without the card's layer classes the network has plain MLPs, which this file does not fit.
    register_hub_backbone("tiny-virchow", model)
    with pytest.raises(WeightsError, match="does not fit the tiny-virchow network"):
        get_backbone("tiny-virchow", weights=folder)


def test_transformers_model_like_phikon(tmp_path, offline_hub, registry, cmu, grid):
    folder = tmp_path / "tiny-phikon"
    net = _save_vit_transformers(folder)
    register_hub_backbone(
        "tiny-phikon", HubModel("test-org/tiny-phikon", "transformers", "cls", 32, MEAN, STD, 224)
    )
    _into_hub_cache(offline_hub, "test-org/tiny-phikon", folder)
    backbone = get_backbone("tiny-phikon", device="cpu")
    want = _by_hand(net, cmu, grid, lambda n, x: n(pixel_values=x).last_hidden_state[:, 0])
    feats = extract_features(cmu, grid, backbone, batch_size=2, precision="fp32")
    assert feats.shape == (3, 32)
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)


def test_missing_extra_is_one_sentence_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if not installed
    with pytest.raises(MissingExtraError, match=r"needs timm.*pip install 'napari-he2rna\[foundation\]'"):
        get_backbone("uni")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="needs transformers"):
        get_backbone("phikon-v2")


def test_gated_or_not_cached_model_says_how_to_get_access(offline_hub, monkeypatch):
    with pytest.raises(WeightsError) as info:
        get_backbone("uni")
    message = str(info.value)
    assert "not in the Hugging Face cache" in message and "https://huggingface.co/MahmoodLab/UNI" in message
    assert "huggingface-cli login" in message and "--weights" in message and "\n" not in message

    # Online, a gated repository without a login: huggingface_hub raises GatedRepoError.
    def gated(*args, **kwargs):
        raise _gated_error("401 Client Error: access to model MahmoodLab/UNI2-h is restricted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(
        WeightsError, match=r"gated model: accept its licence at https://huggingface.co/MahmoodLab/UNI2-h"
    ):
        get_backbone("uni2-h")


def test_named_files_of_a_hub_repo_from_the_offline_cache(tmp_path, offline_hub):
    """What other users of the hub (the weights converter) fetch with: each file, or None where absent."""
    files = ["config.json", "model.safetensors"]
    with pytest.raises(
        WeightsError, match=r"tiny \(test-org/tiny\) is not in the Hugging Face cache"
    ) as info:
        hub_snapshot_files("tiny", "test-org/tiny", files, local_only=True)
    assert "fetch it once online" in str(info.value) and "\n" not in str(info.value)
    assert hub_snapshot_files("tiny", "test-org/tiny", files, True, optional=True) == dict.fromkeys(files)

    folder = tmp_path / "tiny"
    _save_timm(folder)
    snap = _into_hub_cache(offline_hub, "test-org/tiny", folder)
    # local_only=False, but HF_HUB_OFFLINE is set: the cache only; a file the snapshot lacks is None.
    found = hub_snapshot_files("tiny", "test-org/tiny", ["config.json", "README.md"], local_only=False)
    assert found == {"config.json": snap / "config.json", "README.md": None}
    assert read_json(found["config.json"])["architecture"] == "vit_base_patch16_224"


def test_a_file_that_does_not_fit_the_architecture_is_refused(tmp_path, offline_hub):
    tiny = tmp_path / "tiny"
    _save_timm(tiny)
    # UNI's card builds LayerScale (init_values); a ViT saved without it misses those tensors.
    with pytest.raises(WeightsError, match=r"does not fit the uni network \(tensors: 2 missing"):
        get_backbone("uni", weights=tiny)
    # A sound ViT of UNI's kind, but 32-d where UNI is 1024-d: another model's file.
    small = tmp_path / "small"
    _save_timm(small, init_values=1e-5)
    with pytest.raises(WeightsError, match="does not fit the uni network: it builds 32-d features"):
        get_backbone("uni", weights=small)
    # Config and weights disagree (weights of a 48-wide network): keys of another shape.
    wide = tmp_path / "wide"
    _save_timm(wide, embed_dim=48)
    config = json.loads((wide / "config.json").read_text())
    config["model_args"]["embed_dim"] = 32
    (wide / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"does not fit the local-wide network \(tensors: .*another shape"):
        get_backbone(str(wide))
    # A weights file of another network altogether.
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3), "blocks.0.norm1.weight": torch.zeros(7)}, str(other))
    with pytest.raises(WeightsError, match="does not fit the uni network .*missing"):
        get_backbone("uni", weights=other)
    with pytest.raises(WeightsError, match="do not exist"):
        get_backbone("uni", weights=tmp_path / "nope")
    with pytest.raises(WeightsError, match="unknown backbone"):
        get_backbone("not-a-backbone")


def test_extract_command_gives_one_sentence_and_exits_non_zero(
    cmu_slide, tmp_path, offline_hub, monkeypatch, capsys
):
    args = ["extract", str(cmu_slide), "--cache-dir", str(tmp_path / "cache"), "--max-tiles", "2"]
    assert main([*args, "--backbone", "uni"]) == 2  # not cached, hub offline
    err = capsys.readouterr().err.strip()
    assert err.startswith("he2rna: error: uni (MahmoodLab/UNI) is not in the Hugging Face cache")
    assert "Traceback" not in err and len(err.splitlines()) == 1

    tiny = tmp_path / "tiny"
    _save_timm(tiny)
    assert main([*args, "--backbone", "uni", "--weights", str(tiny)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit the uni network" in err and len(err.splitlines()) == 1

    assert main([*args, "--backbone", str(tiny), "--device", "cpu", "--precision", "fp32"]) == 0
    assert "1 of 1 slides have features" in capsys.readouterr().out

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main([*args, "--backbone", "phikon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "he2rna: error: the phikon backbone needs transformers, which is not installed: "
        "pip install 'napari-he2rna[foundation]' (or pip install transformers)."
    )
