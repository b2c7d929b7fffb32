"""Hub models: pathology encoders published on the Hugging Face hub, from a snapshot folder, the hub cache or
the hub, built the way their model cards build them.

* :class:`HubModel` says how one is built, preprocessed and pooled; :func:`build_hub_backbone` builds it
  (timm or transformers; the ``foundation`` extra) as a :class:`HubBackbone`, with every weight from its files
  (safetensors, or pickles with ``weights_only=True``) and never random ones.
* :func:`hub_snapshot_files` fetches named files of a hub repo from the cache or the hub, offline with
  ``HF_HUB_OFFLINE=1`` or ``HE2RNA_OFFLINE=1`` (:func:`hub_offline`), and says in one sentence what is wrong:
  a missing extra (:class:`~..errors.MissingExtraError`), an offline miss, a gated repo without a login
  (:func:`licence_advice`), a repo that does not exist (:class:`~..errors.WeightsError`).
  :func:`hub_model_files` and :func:`folder_model_files` find a model's config.json and weight files (sharded
  or not) on the hub or in a snapshot folder; :func:`read_json` reads its configs.

The registry of backbones (which hub models are known, by name) is :mod:`.backbones`. Nothing here imports Qt
or napari.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import settings
from ..errors import MissingExtraError, WeightsError
from .backbone_base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from .resnet import file_hash, load_state_dict, not_weights_only

__all__ = [
    "HubModel",
    "HubBackbone",
    "build_hub_backbone",
    "hub_offline",
    "licence_advice",
    "hub_snapshot_files",
    "hub_model_files",
    "folder_model_files",
    "hub_id_of_folder",
    "read_json",
    "FOUNDATION_EXTRA",
    "HUB_ID",
]


# What each of these needs to be built the way its model card builds it. Files on the hub hold a config.json
# (timm: "architecture", "model_args", "pretrained_cfg"; transformers: "model_type", "hidden_size") and
# model.safetensors or pytorch_model.bin; the registry's kwargs (:mod:`.backbones`) are those the cards pass
# to timm.create_model on top of that config (layer classes cannot be written in JSON), and what is used when
# only a weights file is given. Layer classes are named as strings and looked up in timm.layers / timm's
# activation names.
@dataclass(frozen=True)
class HubModel:
    """How a pathology encoder published on the Hugging Face hub is built, preprocessed and pooled.

    Attributes
    ----------
    hub_id : str or None
        ``"org/name"`` on https://huggingface.co (None for a local folder given as the backbone).
    library : str
        ``"timm"`` or ``"transformers"``.
    pooling : str
        ``"cls"`` (the class token), ``"cls+mean"`` (class token and the mean of the patch tokens,
        concatenated) or ``"head"`` (what the timm model's own pooling gives).
    dim : int or None
        Output size as the model card says (None: whatever the network gives).
    mean, std : tuple of 3 floats, optional
        Normalisation of RGB in [0, 1] (None: from the snapshot's config, else ImageNet's).
    input_px : int or None
        Side of the input tiles (None: from the snapshot's config, else 224).
    architecture : str or None
        timm architecture, for a weights file without a config.json.
    timm_kwargs : dict
        Extra ``timm.create_model`` arguments; ``mlp_layer`` is a name in ``timm.layers``.
    licence : str
        What the model card asks of a user before the weights can be fetched.
    """

    hub_id: str | None
    library: str
    pooling: str = "cls"
    dim: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_px: int | None = None
    architecture: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    licence: str = ""


#: The ``pip install`` extra that brings timm, transformers and huggingface_hub.
FOUNDATION_EXTRA = "napari-he2rna[foundation]"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class HubBackbone(Backbone):
    """A timm or transformers encoder with its published preprocessing and token pooling."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        model: HubModel,
        dim: int,
        input_px: int,
        mean: Sequence[float],
        std: Sequence[float],
        n_prefix_tokens: int,
        weights_hash: str,
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.name, self.dim, self.input_px, self.weights_hash = name, dim, input_px, weights_hash
        self.net = net
        self.library, self.pooling, self.n_prefix_tokens = model.library, model.pooling, n_prefix_tokens

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, tokens, width)``: class token, register tokens, then patch tokens (after the last norm)."""
        if self.library == "timm":
            return self.net.forward_features(x)
        return self.net(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "head":
            return self.net(x)
        tokens = self.tokens(x)
        if self.pooling == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, self.n_prefix_tokens :].mean(dim=1)], dim=1)
        return tokens[:, 0]


def _missing_extra(name: str, package: str) -> MissingExtraError:
    return MissingExtraError(
        f"the {name} backbone needs {package}, which is not installed: pip install '{FOUNDATION_EXTRA}' "
        f"(or pip install {package})."
    )


def _import(name: str, package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise _missing_extra(name, package) from None


def hub_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` or ``HE2RNA_OFFLINE`` set true)."""
    return any(
        os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")
        for var in ("HF_HUB_OFFLINE", "HE2RNA_OFFLINE")
    )


def licence_advice(hub_id: str, folder_hint: str = "with --weights") -> str:
    """How to get at a gated or login-only hub repo, as the end of a sentence: accept its licence and log in,
    or pass a local snapshot folder (``folder_hint`` says how: the backbones take ``--weights``, the
    converter a folder in place of the hub id)."""
    return (
        f"accept its licence at https://huggingface.co/{hub_id}, run `huggingface-cli login`, "
        f"or pass a local snapshot folder {folder_hint}"
    )


HUB_ID = re.compile(r"^(?:hf[-_]hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)$")
"""A Hugging Face hub id, ``org/name`` or ``hf-hub:org/name`` (group 1: ``org/name``)."""


def hub_id_of_folder(folder: Path) -> str | None:
    """``org/name`` of a folder inside the hub cache (``models--org--name/snapshots/<rev>``), else None."""
    for part in folder.resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def hub_snapshot_files(
    name: str,
    hub_id: str,
    filenames: Sequence[str],
    local_only: bool,
    *,
    optional: bool = False,
    folder_hint: str = "with --weights",
) -> dict[str, Path | None]:
    """The files ``filenames`` of the hub repo ``hub_id``, from the Hugging Face cache or the hub.

    Each file is downloaded into the hub cache first unless ``local_only`` or :func:`hub_offline`; each name
    maps to the file's path in the cache, or to None where the repo has no such file, or where the hub cannot
    be asked and the cache lacks it (while it holds another of ``filenames``).

    Parameters
    ----------
    name : str
        What the files are for, as the messages say it (a backbone's or a model's name).
    hub_id : str
        ``"org/name"`` on https://huggingface.co.
    filenames : sequence of str
        Paths in the repo, fetched in this order.
    local_only : bool
        Only the hub cache, never the network (also whenever :func:`hub_offline`).
    optional : bool
        Where the cache holds none of ``filenames`` and the hub cannot be asked, map them all to None rather
        than raise (for files a snapshot may lack, asked for once the repo is known to be in the cache).
    folder_hint : str
        How the messages say to pass a local snapshot folder instead (see :func:`licence_advice`).

    Raises
    ------
    MissingExtraError
        huggingface_hub is not installed.
    WeightsError
        The cache holds none of ``filenames`` and the hub is offline or unreachable (unless ``optional``),
        the repo is gated and its licence not accepted or no login given, the repo does not exist (or needs a
        login), or the hub refused or failed a download.
    """
    _import(name, "huggingface_hub")
    local_only = local_only or hub_offline()
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    not_cached: list[str] = []

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(hub_id, filename, local_files_only=local_only))
        except GatedRepoError:
            advice = licence_advice(hub_id, folder_hint)
            raise WeightsError(f"{name} ({hub_id}) is a gated model: {advice}.") from None
        except LocalEntryNotFoundError:
            not_cached.append(filename)
            return None
        except RepositoryNotFoundError:
            raise WeightsError(
                f"{hub_id} is not on the Hugging Face hub or needs a login: check the name, "
                f"{licence_advice(hub_id, folder_hint)}."
            ) from None
        except EntryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise WeightsError(
                    f"the Hugging Face hub refused {name} ({hub_id}): {licence_advice(hub_id, folder_hint)}."
                ) from None
            raise WeightsError(f"cannot fetch {name} from the Hugging Face hub ({hub_id}: {exc}).") from None

    found = {filename: fetch(filename) for filename in filenames}
    if filenames and len(not_cached) == len(filenames) and not optional:  # nothing of this model in the cache
        raise WeightsError(
            f"{name} ({hub_id}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "the hub is offline or unreachable: fetch it once online "
            f"({licence_advice(hub_id, folder_hint)})."
        )
    return found


def hub_model_files(name: str, hub_id: str, local_only: bool) -> tuple[Path | None, list[Path]]:
    """config.json and the weight files of ``hub_id`` from the hub cache (downloading them unless offline)."""

    def fetch(filename: str) -> Path | None:
        return hub_snapshot_files(name, hub_id, [filename], local_only, optional=True)[filename]

    config = hub_snapshot_files(name, hub_id, ["config.json"], local_only)["config.json"]
    for index_name in _INDEX_FILES:
        index = fetch(index_name)
        if index is not None:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            paths = [fetch(s) for s in shards]
            if all(p is not None for p in paths):
                return config, paths  # type: ignore[return-value]
    for filename in _WEIGHT_FILES:
        path = fetch(filename)
        if path is not None:
            return config, [path]
    raise WeightsError(
        f"{name} ({hub_id}) has no {' or '.join(_WEIGHT_FILES)} in the Hugging Face cache"
        + (" and the hub is offline." if local_only else " nor on the hub.")
    )


def folder_model_files(name: str, folder: Path) -> tuple[Path | None, list[Path]]:
    """config.json and the weight files of a local snapshot folder."""
    config = folder / "config.json"
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            return (config if config.is_file() else None), [folder / s for s in shards]
    found = [folder / f for f in _WEIGHT_FILES if (folder / f).is_file()]
    if not found:
        found = sorted(folder.glob("*.safetensors"))[:1]
    if not found:
        raise WeightsError(
            f"the folder {folder} has no {' or '.join(_WEIGHT_FILES)}: it is not a {name} snapshot folder."
        )
    return (config if config.is_file() else None), found[:1]


def read_json(path: Path | None) -> dict[str, Any]:
    """A JSON object from ``path`` (a model's config.json, preprocessor_config.json, ...); ``{}`` for None.

    Raises
    ------
    WeightsError
        The file cannot be read, is not JSON, or holds something other than an object.
    """
    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path} ({exc}).") from None
    if not isinstance(doc, dict):
        raise WeightsError(f"{path} is not a model config (a JSON object).")
    return doc


def _weights_identity(paths: list[Path]) -> str:
    """sha256 of the weights; a hub cache blob is named by its sha256 already (not read again)."""
    digests = []
    for p in paths:
        real = Path(p).resolve()
        blob = real.parent.name == "blobs" and len(real.name) == 64
        digests.append(
            real.name if blob and all(c in "0123456789abcdef" for c in real.name) else file_hash(real)
        )
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _build_timm(name: str, model: HubModel, config: dict[str, Any]) -> nn.Module:
    timm = _import(name, "timm")
    arch = config.get("architecture") or model.architecture
    if not arch:
        raise WeightsError(f"the {name} weights come without a config.json naming their timm architecture.")
    kwargs = {k: v for k, v in model.timm_kwargs.items()}
    kwargs.update(config.get("model_args") or {})
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    kwargs.pop("num_classes", None)
    kwargs.pop("pretrained_cfg", None)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as exc:  # unknown architecture, arguments this timm does not take
        raise WeightsError(
            f"timm cannot build the {name} network {arch!r} ({type(exc).__name__}: {exc})."
        ) from None


def _load_transformers(name: str, config_path: Path | None, paths: list[Path]) -> nn.Module:
    """The transformers model of a snapshot folder, with every weight from its files (none left random).

    ``from_pretrained`` is what maps the hub's tensor names onto the installed transformers' modules; it
    reads safetensors, or pickles with ``weights_only=True``, and reports what it could not place.
    """
    transformers = _import(name, "transformers")
    folder = paths[0].parent
    if config_path is None or config_path.parent != folder:
        raise WeightsError(
            f"the {name} weights need their snapshot folder (config.json beside model.safetensors or "
            "pytorch_model.bin): pass the folder."
        )
    logs = transformers.utils.logging
    verbosity, bars = logs.get_verbosity(), logs.is_progress_bar_enabled()
    logs.set_verbosity_error()  # the result is checked below; its report table would only be noise
    logs.disable_progress_bar()
    try:
        net, info = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # shapes that do not fit (RuntimeError), an unreadable file, a bad config
        pickled = not_weights_only(next((p for p in paths if p.suffix == ".bin"), folder), exc)
        if pickled is not None:
            raise pickled from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{folder} does not fit the {name} network ({first[:200]}).") from None
    finally:
        logs.set_verbosity(verbosity)
        if bars:
            logs.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    wrong = list(info.get("mismatched_keys", []))
    if missing or wrong:
        which = missing[:1] or [str(w[0] if isinstance(w, tuple) else w) for w in wrong[:1]]
        raise WeightsError(
            f"{folder} does not fit the {name} network ({len(missing)} tensors missing, {len(wrong)} of "
            f"another shape, e.g. {which[0]})."
        )
    return net.float()  # transformers 5 keeps the checkpoint's dtype; autocast decides precision here


def _load_matching(name: str, net: nn.Module, paths: list[Path]) -> None:
    """Load ``paths`` into ``net``; a WeightsError in one sentence when keys or shapes do not match."""
    state: dict[str, torch.Tensor] = {}
    for p in paths:
        if not Path(p).is_file():
            raise WeightsError(f"the {name} weights file {p} does not exist.")
        state.update(load_state_dict(Path(p)))
    own = net.state_dict()

    def optional(key: str) -> bool:  # a classifier the features never use
        return key.startswith(("head.", "fc."))

    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own and not optional(k)]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        where = paths[0] if len(paths) == 1 else paths[0].parent
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape, e.g. {k} {tuple(state[k].shape)} not {tuple(own[k].shape)}"
            )
        raise WeightsError(f"{where} does not fit the {name} network (tensors: {'; '.join(parts)}).")
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _preprocessing(model: HubModel, config: dict[str, Any], folder: Path | None) -> tuple[int, tuple, tuple]:
    """Input side and mean/std: the registry's, else the snapshot's own config, else ImageNet's at 224 px."""
    cfg = config.get("pretrained_cfg") or {}
    proc = (
        read_json(folder / "preprocessor_config.json")
        if folder and (folder / "preprocessor_config.json").is_file()
        else {}
    )
    size = proc.get("crop_size") or proc.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    input_px = model.input_px or (cfg.get("input_size") or [3, None, None])[-1] or side or 224
    mean = model.mean or tuple(cfg.get("mean") or proc.get("image_mean") or IMAGENET_MEAN)
    std = model.std or tuple(cfg.get("std") or proc.get("image_std") or IMAGENET_STD)
    return int(input_px), tuple(mean), tuple(std)


def build_hub_backbone(
    name: str, model: HubModel, weights: str | Path | None = None, download: bool = True
) -> HubBackbone:
    """Build a hub encoder from a local file or snapshot folder, the hub cache, or the hub.

    Parameters
    ----------
    name : str
        The backbone's name (in caches and model bundles).
    model : HubModel
    weights : str or Path, optional
        A snapshot folder (config.json + model.safetensors or pytorch_model.bin, as on the hub) or one weights
        file (with its config.json beside it, or the registry's architecture). Otherwise
        ``<weights dir>/<name>/`` when it exists, else ``model.hub_id`` from the hub cache, downloaded there
        first unless ``download`` is False or the hub is offline (:func:`hub_offline`).

    Raises
    ------
    MissingExtraError
        timm, transformers or huggingface_hub is not installed.
    WeightsError
        Not found, gated (licence or login missing), or the file does not fit the architecture.
    """
    _import(name, model.library)
    local = settings.weights_dir() / name
    if weights is None and local.is_dir():
        weights = local
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            config_path, paths = folder_model_files(name, path)
        elif path.is_file():
            beside = path.parent / "config.json"
            config_path, paths = (beside if beside.is_file() else None), [path]
        else:
            raise WeightsError(
                f"the {name} weights {path} do not exist (a snapshot folder or a weights file)."
            )
    elif model.hub_id:
        config_path, paths = hub_model_files(name, model.hub_id, local_only=not download or hub_offline())
    else:
        raise WeightsError(f"the {name} backbone needs a snapshot folder (--weights).")
    config = read_json(config_path)
    if model.library == "timm":
        net = _build_timm(name, model, config)
        _load_matching(name, net, paths)
        width = int(getattr(net, "num_features", 0))
        n_prefix = int(getattr(net, "num_prefix_tokens", 1))
    else:
        net = _load_transformers(name, config_path, paths)
        width = int(getattr(net.config, "hidden_size", 0))
        n_prefix = 1 + int(getattr(net.config, "num_register_tokens", 0) or 0)
    dim = 2 * width if model.pooling == "cls+mean" else width
    if model.dim is not None and dim != model.dim:
        raise WeightsError(
            f"{paths[0]} does not fit the {name} network: it builds {dim}-d features where {name} "
            f"({model.hub_id}) gives {model.dim}."
        )
    input_px, mean, std = _preprocessing(model, config, config_path.parent if config_path else None)
    return HubBackbone(name, net, model, dim, input_px, mean, std, n_prefix, _weights_identity(paths))
