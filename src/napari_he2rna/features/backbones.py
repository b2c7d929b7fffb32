"""Backbones: the registry of feature extractors, how each is built, what it expects and what it outputs.

* :func:`get_backbone` builds a network by name: ``"resnet50-imagenet"`` (the paper's ResNet50, 2048-d),
  ``"hed-stats"`` (weight-free colour and nucleus statistics, used by the bundled demo model) and the
  pathology foundation models published on the Hugging Face hub (UNI, UNI2-h, H-optimus-0/1, Virchow2,
  Phikon, Phikon-v2; the ``foundation`` extra: timm, transformers, huggingface_hub), each with its model
  card's preprocessing and token pooling. Weights come from a local file or snapshot folder, torch's hub
  cache or the Hugging Face cache (offline with ``HF_HUB_OFFLINE=1``), are loaded from safetensors or with
  ``weights_only=True``, and are never replaced by random ones: missing weights raise
  :class:`~.errors.WeightsError` naming what to fetch, a gated model without a login says how to get access,
  and a missing extra raises :class:`~.errors.MissingExtraError` naming the ``pip install``.
* :func:`backbone_info` gives a registry entry (its output ``dim``) without building the network.
* A :class:`Backbone` turns uint8 tiles into its input (:meth:`Backbone.preprocess`: resize, mean/std) and
  the input into ``(B, dim)`` features; :mod:`.extraction` runs it over a slide's tiles.

The networks are built in :mod:`.resnet` (and its weight files), :mod:`.hed_stats` and :mod:`.hub` (the
Hugging Face hub and snapshot folders); their base class is :mod:`.backbone_base`.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .backbone_base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from .devices import resolve_device
from .hed_stats import HED_STATS_FEATURES, HedStatsBackbone
from .hub import (
    HUB_ID,
    HubModel,
    build_hub_backbone,
    folder_model_files,
    hub_id_of_folder,
    hub_model_files,
    hub_offline,
    read_json,
)
from .resnet import resnet50_factory

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BACKBONES",
    "register_backbone",
    "register_hub_backbone",
    "import_backbone_libraries",
    "get_backbone",
    "backbone_info",
    "H_OPTIMUS_MEAN",
    "H_OPTIMUS_STD",
]


@dataclass
class BackboneSpec:
    """A registry entry: how to build a backbone, and what it outputs (``dim`` None: known once built).

    ``factory(weights, download) -> Backbone``; ``hub`` says how a hub encoder is built (None otherwise);
    ``libraries`` are the modules the factory imports (see :func:`import_backbone_libraries`).
    """

    name: str
    factory: Callable[[str | Path | None, bool], Backbone]
    dim: int | None
    input_px: int = 224
    description: str = ""
    hub: HubModel | None = None
    libraries: tuple[str, ...] = ()


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    factory: Callable[[str | Path | None, bool], Backbone],
    dim: int | None,
    input_px: int = 224,
    description: str = "",
    hub: HubModel | None = None,
    libraries: Sequence[str] = (),
) -> None:
    """Add a backbone to the registry; ``factory(weights, download) -> Backbone``."""
    libs = tuple(libraries) or ((hub.library,) if hub is not None else ())
    BACKBONES[name] = BackboneSpec(name, factory, dim, input_px, description, hub, libs)


def import_backbone_libraries(name: str) -> None:
    """Import the libraries backbone ``name`` is built with (torchvision: about 2 s the first time in a
    process; timm or transformers for hub encoders). Meant for a thread started when a model is chosen, so
    that its Run does not wait for them. Unknown names and failed imports are left to :func:`get_backbone`."""
    import importlib

    spec = BACKBONES.get(name)
    for module in spec.libraries if spec is not None else ():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - get_backbone says what is missing, in one sentence
            return


def register_hub_backbone(name: str, model: HubModel, description: str = "") -> None:
    """Add a hub encoder to the registry (built by :func:`build_hub_backbone`)."""

    def factory(weights: str | Path | None, download: bool) -> Backbone:
        return build_hub_backbone(name, model, weights, download)

    register_backbone(name, factory, model.dim, model.input_px or 224, description, hub=model)


H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
register_backbone(
    "resnet50-imagenet",
    resnet50_factory,
    2048,
    description="torchvision ResNet50, ImageNet weights, global average pool (the paper's)",
    libraries=("torchvision.models",),
)
register_backbone(
    "hed-stats",
    lambda weights, download: HedStatsBackbone(),
    len(HED_STATS_FEATURES),
    description="weight-free H&E colour and nucleus statistics (used by the demo model)",
)
_GATED = "gated: accept the licence on the hub and log in"
register_hub_backbone(
    "uni",
    HubModel(
        "MahmoodLab/UNI",
        "timm",
        "cls",
        1024,
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        _GATED,
    ),
    "UNI ViT-L/16, class token (MahmoodLab/UNI; timm)",
)
register_hub_backbone(
    "uni2-h",
    HubModel(
        "MahmoodLab/UNI2-h",
        "timm",
        "cls",
        1536,
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        _GATED,
    ),
    "UNI2-h ViT-H/14 with 8 registers, class token (MahmoodLab/UNI2-h; timm)",
)
for _name, _hub_id in (("h-optimus-0", "bioptimus/H-optimus-0"), ("h-optimus-1", "bioptimus/H-optimus-1")):
    register_hub_backbone(
        _name,
        HubModel(
            _hub_id,
            "timm",
            "cls",
            1536,
            H_OPTIMUS_MEAN,
            H_OPTIMUS_STD,
            224,
            "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            _GATED if _name == "h-optimus-1" else "",
        ),
        f"{_name.replace('h-o', 'H-o')} ViT-g/14 with 4 registers, class token ({_hub_id}; timm)",
    )
register_hub_backbone(
    "virchow2",
    HubModel(
        "paige-ai/Virchow2",
        "timm",
        "cls+mean",
        2560,
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "silu",
        },
        _GATED,
    ),
    "Virchow2 ViT-H/14, class token + mean patch token, 2560-d (paige-ai/Virchow2; timm)",
)
register_hub_backbone(
    "phikon",
    HubModel("owkin/phikon", "transformers", "cls", 768, IMAGENET_MEAN, IMAGENET_STD, 224),
    "Phikon ViT-B/16, class token (owkin/phikon; transformers)",
)
register_hub_backbone(
    "phikon-v2",
    HubModel("owkin/phikon-v2", "transformers", "cls", 1024, IMAGENET_MEAN, IMAGENET_STD, 224),
    "Phikon-v2 ViT-L/16 (DINOv2), class token (owkin/phikon-v2; transformers)",
)


def _registered_hub_id(hub_id: str) -> BackboneSpec | None:
    for spec in BACKBONES.values():
        if spec.hub is not None and spec.hub.hub_id and spec.hub.hub_id.lower() == hub_id.lower():
            return spec
    return None


def _library_of(config: dict[str, Any]) -> str:
    return "timm" if config.get("architecture") else "transformers"


def _resolve(name: str, weights: str | Path | None) -> tuple[BackboneSpec, str | Path | None]:
    """The registry entry of ``name`` (a registry name, a hub id or a snapshot folder) and its weights."""
    if name in BACKBONES:
        return BACKBONES[name], weights
    folder = Path(name).expanduser()
    if folder.is_dir():
        hub_id = hub_id_of_folder(folder)
        spec = _registered_hub_id(hub_id) if hub_id else None
        if spec is not None:
            return spec, folder
        config_path, _ = folder_model_files(name, folder)
        config = read_json(config_path)
        library = _library_of(config)
        model = HubModel(hub_id, library, "head" if library == "timm" else "cls")
        label = f"hf-hub:{hub_id}" if hub_id else f"local-{folder.resolve().name}"
        return _ad_hoc(label, model), folder
    match = HUB_ID.match(name)
    if match and (name.startswith(("hf-hub:", "hf_hub:")) or not folder.exists()):
        hub_id = match.group(1)
        spec = _registered_hub_id(hub_id)
        if spec is not None:
            return spec, weights
        return _ad_hoc(f"hf-hub:{hub_id}", None, hub_id), weights
    raise WeightsError(
        f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, a Hugging Face hub id "
        "(org/name) or a local snapshot folder."
    )


def _ad_hoc(label: str, model: HubModel | None, hub_id: str | None = None) -> BackboneSpec:
    """An unregistered hub model or folder: timm or transformers decided by its config.json when built."""

    def factory(weights: str | Path | None, download: bool) -> Backbone:
        m = model
        if m is None:  # a hub id: its config (the local copy given, else the hub's) says which library
            path = Path(weights).expanduser() if weights is not None else None
            if path is not None and path.is_dir():
                config_path = folder_model_files(label, path)[0]
            elif path is not None:
                config_path = path.parent / "config.json" if (path.parent / "config.json").is_file() else None
            else:
                local_only = not download or hub_offline()
                config_path = hub_model_files(label, str(hub_id), local_only)[0]
            library = _library_of(read_json(config_path))
            m = HubModel(hub_id, library, "head" if library == "timm" else "cls")
        return build_hub_backbone(label, m, weights, download)

    return BackboneSpec(label, factory, None, 224, f"{label} (not in the registry)", model)


def backbone_info(name: str) -> BackboneSpec:
    """The registry entry of ``name`` (its output ``dim`` without building it; None for an unregistered hub
    model or folder).

    ``name`` is a registry name, a Hugging Face hub id (``org/name`` or ``hf-hub:org/name``; a registered
    one gives its entry) or a local snapshot folder.
    """
    return _resolve(name, None)[0]


def get_backbone(
    name: str = "resnet50-imagenet",
    weights: str | Path | None = None,
    device: str | torch.device = "auto",
    download: bool = True,
) -> Backbone:
    """Build a backbone from the registry, in eval mode on ``device``.

    Parameters
    ----------
    name : str
        ``"resnet50-imagenet"`` (default), ``"hed-stats"``, a pathology foundation model of the registry
        (``"uni"``, ``"uni2-h"``, ``"h-optimus-0"``, ``"h-optimus-1"``, ``"virchow2"``, ``"phikon"``,
        ``"phikon-v2"``; the ``foundation`` extra), a Hugging Face hub id (``org/name``, ``hf-hub:org/name``)
        or a local snapshot folder.
    weights : str or Path, optional
        A local weights file (safetensors or a plain torch state dict) or, for hub models, a snapshot
        folder; otherwise the weights folder (:func:`settings.weights_dir`), torch's hub cache (ResNet50)
        or the Hugging Face cache (hub models, downloaded there unless offline) are searched.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    download : bool
        Try to download missing weights into torch's or the Hugging Face hub cache (never when
        ``HE2RNA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).

    Raises
    ------
    MissingExtraError
        A foundation model without timm / transformers / huggingface_hub installed.
    WeightsError
        Unknown name, or the weights are missing (the message says which file and where to put it), gated
        (accept the licence and log in), or do not fit the network.
    """
    spec, weights = _resolve(name, weights)
    backbone = spec.factory(weights, download)
    return backbone.eval().to(resolve_device(device))
