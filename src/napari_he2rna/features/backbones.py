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
  the input into ``(B, dim)`` features; :mod:`.features` runs it over a slide's tiles.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from .devices import resolve_device
from ..errors import MissingExtraError, WeightsError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BACKBONES",
    "register_backbone",
    "register_hub_backbone",
    "HubModel",
    "HubBackbone",
    "build_hub_backbone",
    "hub_offline",
    "FOUNDATION_EXTRA",
    "get_backbone",
    "backbone_info",
    "file_hash",
    "load_state_dict",
    "HED_STATS_FEATURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET50_URL",
    "RESNET50_FILE",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url (checked against torchvision 0.29's source).
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
RESNET50_FILE = "resnet50-0676ba61.pth"


class Backbone(nn.Module):
    """A feature extractor: ``preprocess`` (uint8 NHWC tiles -> float NCHW) then ``forward`` -> ``(B, dim)``.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"resnet50-imagenet"``.
    dim : int
        Output feature dimension.
    input_px : int
        Side of the tiles the network expects (tiles are read at this size).
    weights_hash : str
        Identity of the weights (sha256 of the file, or a version tag for weight-free backbones); part of
        the cache's provenance so features of different weights never mix.
    autocast : bool
        Whether reduced-precision autocast is allowed (False for numerically delicate statistics).
    """

    name: str = "backbone"
    dim: int = 0
    input_px: int = 224
    weights_hash: str = ""
    autocast: bool = True

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer(
            "_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 tiles ``(B, h, w, 3)`` -> normalised float32 ``(B, 3, input_px, input_px)`` on its device."""
        x = torch.as_tensor(tiles)
        if x.ndim == 3:
            x = x[None]
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResNet50Backbone(Backbone):
    """torchvision ResNet50 up to the global average pool: 2048 features per tile (the paper's)."""

    name = "resnet50-imagenet"
    dim = 2048
    input_px = 224

    def __init__(self, state_dict: dict[str, torch.Tensor], weights_hash: str) -> None:
        super().__init__()
        from torchvision.models import resnet50

        # Built on the meta device, then given the file's tensors: torchvision's random initialisation of
        # 25 M parameters (about 0.5 s on a CPU, before every Run) would only be overwritten.
        with torch.device("meta"):
            net = resnet50(weights=None)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        missing, unexpected = net.load_state_dict(state_dict, strict=False, assign=True)
        # A state dict saved without the classifier (a feature extractor) is fine; anything else is not.
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                "the weights file does not fit torchvision's ResNet50 "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})."
            )
        net.fc = nn.Identity()
        self.net = net
        self.weights_hash = weights_hash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Names of the "hed-stats" features, in output order (see HedStatsBackbone).
HED_STATS_FEATURES: list[str] = [
    "white_fraction",  # share of near-white pixels (glass, fat vacuoles, lumen): max OD < 0.15
    "h_mean",
    "e_mean",
    "r_mean",  # mean haematoxylin / eosin / residual optical density over the tile
    "h_std",
    "e_std",
    "r_std",  # their standard deviations
    "h_q50",
    "h_q90",
    "h_q99",  # haematoxylin quantiles (dark chromatin drives q90/q99)
    "e_q50",
    "e_q90",  # eosin quantiles (stroma, muscle, cytoplasm)
    "h_tissue_mean",
    "e_tissue_mean",  # means over non-white pixels only (independent of fat/glass share)
    "e_over_h",  # e_tissue_mean / h_tissue_mean: pink stroma high, lymphoid aggregates low
    "h_frac_0.5",
    "h_frac_1.0",
    "h_frac_2.0",  # share of pixels with H above 0.5 (pale nuclei), 1.0, 2.0 (dense)
    "blobs_s_moderate",
    "blobs_m_moderate",
    "blobs_l_moderate",  # maxima of 2x2-mean H per 10k px, H > 0.5,
    "blobs_s_dark",
    "blobs_m_dark",
    "blobs_l_dark",  # in ~6 / 14 / 26 px neighbourhoods; same with H > 1.5
    "nucleus_px",  # pixels with H > 0.5 per moderate medium-scale blob, in hundreds of px:
    #                                 high where nuclei are dark and crowded (lymphoid aggregates), low for
    #                                 isolated nuclei among pale cytoplasm (epithelium) or stroma
    "dark_density_mean",
    "dark_density_max",
    "dark_density_std",  # share of H > 1.5 pixels in 32 px windows:
    #                                 packed lymphoid aggregates (high mean), dispersed lymphocytes (high std)
    "grad_gray",
    "grad_h",  # mean gradient magnitude of grey level and of H (texture, edges)
    "red_tissue",
    "green_tissue",
    "blue_tissue",  # mean RGB (0-1) of non-white pixels
]


class HedStatsBackbone(Backbone):
    """Weight-free colour and nucleus statistics, computed in torch on the batch (fast on CPU).

    Colour deconvolution (Ruifrok & Johnston, scikit-image's ``hed_from_rgb``) of the optical density
    ``-ln(I)`` gives haematoxylin (nuclei), eosin (cytoplasm, stroma) and residual channels; from them the
    features in :data:`HED_STATS_FEATURES`: stain means, spreads and quantiles, how much of the tile is
    white, how much strongly stained chromatin there is, counts of dark blobs (local maxima of smoothed
    haematoxylin) at three scales and two darknesses, a nucleus-size proxy, how packed the dark nuclei are,
    and texture. Dense small dark lymphocytes give many small dark blobs (packed: high dark density
    everywhere; dispersed: high spread of it); large pale epithelial nuclei give moderate, not dark,
    blobs over pale eosin; stroma is eosin-rich with few blobs; fat and glass are white.
    """

    name = "hed-stats"
    dim = len(HED_STATS_FEATURES)
    input_px = 224
    weights_hash = "hed-stats-v1"
    autocast = False  # logs and quantiles in bf16 would move the thresholds

    def __init__(self) -> None:
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        from skimage.color import hed_from_rgb

        self.register_buffer(
            "_hed_from_rgb", torch.tensor(hed_from_rgb, dtype=torch.float32), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(1.0 / 255.0, 1.0)  # (B, 3, h, w) in [0, 1]
        b = x.shape[0]
        od = -torch.log(x)
        hed = torch.einsum("bchw,cs->bshw", od, self._hed_from_rgb).clamp_min(0.0)
        h, e, r = hed[:, 0], hed[:, 1], hed[:, 2]
        white = (od.amax(dim=1) < 0.15).float()
        tissue = 1.0 - white
        n_tissue = tissue.flatten(1).sum(1).clamp_min(1.0)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1).mean(1)

        def tissue_mean(t: torch.Tensor) -> torch.Tensor:
            return (t * tissue).flatten(1).sum(1) / n_tissue

        hq = torch.quantile(h.flatten(1), torch.tensor([0.5, 0.9, 0.99], device=x.device), dim=1).T
        eq = torch.quantile(e.flatten(1), torch.tensor([0.5, 0.9], device=x.device), dim=1).T
        h_t, e_t = tissue_mean(h), tissue_mean(e)
        feats = [
            mean(white),
            mean(h),
            mean(e),
            mean(r),
            h.flatten(1).std(1),
            e.flatten(1).std(1),
            r.flatten(1).std(1),
            hq[:, 0],
            hq[:, 1],
            hq[:, 2],
            eq[:, 0],
            eq[:, 1],
            h_t,
            e_t,
            e_t / (h_t + 0.05),
        ]
        feats += [mean((h > t).float()) for t in (0.5, 1.0, 2.0)]

        # Blobs are found at half resolution (a 224 px tile at 0.5 µm/px -> 1 µm/px; a lymphocyte nucleus,
        # ~7 µm, spans ~7 px), 4x cheaper; the 2x2 mean is also the smoothing that merges chromatin specks.
        smooth = F.avg_pool2d(h[:, None], 2)
        # A tiny ramp breaks ties, so a flat saturated plateau gives one peak per window, not one per pixel.
        ramp = torch.arange(smooth.shape[-1], device=x.device, dtype=smooth.dtype) * 1e-6
        smooth = smooth + ramp + ramp[: smooth.shape[-2], None] * smooth.shape[-1]
        per_10k = 1e4 / float(h.shape[-1] * h.shape[-2])  # counts per 10,000 full-resolution pixels
        counts = {}
        for scale, k in (("s", 3), ("m", 7), ("l", 13)):
            # Square max filter as two 1-D passes (max is separable): k + k comparisons per pixel, not k * k.
            local_max = F.max_pool2d(
                F.max_pool2d(smooth, (1, k), stride=1, padding=(0, k // 2)),
                (k, 1),
                stride=1,
                padding=(k // 2, 0),
            )
            is_peak = smooth == local_max
            for level, thr in (("moderate", 0.5), ("dark", 1.5)):
                counts[scale, level] = (is_peak & (smooth > thr)).flatten(1).sum(1).float() * per_10k
        feats += [counts[s, "moderate"] for s in ("s", "m", "l")] + [
            counts[s, "dark"] for s in ("s", "m", "l")
        ]
        nuclear_px = (h > 0.5).float().flatten(1).sum(1)
        feats.append(nuclear_px / (counts["m", "moderate"] / per_10k).clamp_min(1.0) / 100.0)

        density = F.avg_pool2d((smooth > 1.5).float(), 16, stride=8).flatten(1)
        feats += [density.mean(1), density.amax(1), density.std(1)]

        gray = x.mean(1, keepdim=True)
        feats.append(_gradient_energy(gray))
        feats.append(_gradient_energy(h[:, None]))
        feats += [tissue_mean(x[:, c]) for c in range(3)]
        out = torch.stack(feats, dim=1)
        assert out.shape == (b, self.dim)
        return out


def _gradient_energy(img: torch.Tensor) -> torch.Tensor:
    """Mean |finite difference| of a (B, 1, h, w) image, per image."""
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 hex digest of a file (memoised per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or a torch checkpoint, never running pickled code.

    Raises
    ------
    WeightsError
        The file is unreadable, or a pickle holding more than tensors (``weights_only=True`` refuses it).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot load weights from {path}: not a safetensors file or a plain tensor checkpoint ({exc})."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _he2rna_offline() -> bool:
    return os.environ.get("HE2RNA_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _resnet50_factory(weights: str | Path | None, download: bool) -> Backbone:
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"the weights file {path} does not exist (expected torchvision's {RESNET50_FILE})."
            )
    else:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_FILE
        local = [
            settings.weights_dir() / RESNET50_FILE,
            settings.weights_dir() / RESNET50_FILE.replace(".pth", ".safetensors"),
            hub_file,
        ]
        path = next((p for p in local if p.is_file()), None)
        if path is None and download and not _he2rna_offline():
            try:
                torch.hub.load_state_dict_from_url(RESNET50_URL, progress=False, check_hash=True)
                path = hub_file if hub_file.is_file() else None
            except Exception:  # no network, proxy, disk: all end in the same instruction below
                path = None
        if path is None:
            raise WeightsError(
                f"ResNet50 ImageNet weights not found: download {RESNET50_URL} and put {RESNET50_FILE} in "
                f"{settings.weights_dir()} (or {hub_file.parent}), or pass its path with --weights."
            )
    return ResNet50Backbone(load_state_dict(path), weights_hash=file_hash(path))


# ----------------------------------------------------------------------------------------------- hub models
# What each of these needs to be built the way its model card builds it. Files on the hub hold a config.json
# (timm: "architecture", "model_args", "pretrained_cfg"; transformers: "model_type", "hidden_size") and
# model.safetensors or pytorch_model.bin; the kwargs below are those the cards pass to timm.create_model on
# top of that config (layer classes cannot be written in JSON), and what is used when only a weights file is
# given. Layer classes are named as strings and looked up in timm.layers / timm's activation names.
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
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
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


def _licence_advice(hub_id: str) -> str:
    return (
        f"accept its licence at https://huggingface.co/{hub_id}, run `huggingface-cli login`, "
        "or pass a local snapshot folder with --weights"
    )


def _hub_files(name: str, hub_id: str, local_only: bool) -> tuple[Path | None, list[Path]]:
    """config.json and the weight files of ``hub_id`` from the hub cache (downloading them unless offline)."""
    _import(name, "huggingface_hub")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(hub_id, filename, local_files_only=local_only))
        except GatedRepoError:
            raise WeightsError(f"{name} ({hub_id}) is a gated model: {_licence_advice(hub_id)}.") from None
        except LocalEntryNotFoundError:
            if filename == "config.json":  # nothing of this model in the cache
                raise WeightsError(
                    f"{name} ({hub_id}) is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                    f"the hub is offline or unreachable: fetch it once online ({_licence_advice(hub_id)})."
                ) from None
            return None
        except RepositoryNotFoundError:
            raise WeightsError(
                f"{hub_id} is not on the Hugging Face hub or needs a login: check the name, "
                f"{_licence_advice(hub_id)}."
            ) from None
        except EntryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise WeightsError(
                    f"the Hugging Face hub refused {name} ({hub_id}): {_licence_advice(hub_id)}."
                ) from None
            raise WeightsError(f"cannot fetch {name} from the Hugging Face hub ({hub_id}: {exc}).") from None

    config = fetch("config.json")
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


def _folder_files(name: str, folder: Path) -> tuple[Path | None, list[Path]]:
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


def _read_json(path: Path | None) -> dict[str, Any]:
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
        _read_json(folder / "preprocessor_config.json")
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
            config_path, paths = _folder_files(name, path)
        elif path.is_file():
            beside = path.parent / "config.json"
            config_path, paths = (beside if beside.is_file() else None), [path]
        else:
            raise WeightsError(
                f"the {name} weights {path} do not exist (a snapshot folder or a weights file)."
            )
    elif model.hub_id:
        config_path, paths = _hub_files(name, model.hub_id, local_only=not download or hub_offline())
    else:
        raise WeightsError(f"the {name} backbone needs a snapshot folder (--weights).")
    config = _read_json(config_path)
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


register_backbone(
    "resnet50-imagenet",
    _resnet50_factory,
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

_HUB_ID = re.compile(r"^(?:hf[-_]hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)$")


def _hub_id_of_folder(folder: Path) -> str | None:
    """``org/name`` of a folder inside the hub cache (``models--org--name/snapshots/<rev>``), else None."""
    for part in folder.resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


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
        hub_id = _hub_id_of_folder(folder)
        spec = _registered_hub_id(hub_id) if hub_id else None
        if spec is not None:
            return spec, folder
        config_path, _ = _folder_files(name, folder)
        config = _read_json(config_path)
        library = _library_of(config)
        model = HubModel(hub_id, library, "head" if library == "timm" else "cls")
        label = f"hf-hub:{hub_id}" if hub_id else f"local-{folder.resolve().name}"
        return _ad_hoc(label, model), folder
    match = _HUB_ID.match(name)
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
                config_path = _folder_files(label, path)[0]
            elif path is not None:
                config_path = path.parent / "config.json" if (path.parent / "config.json").is_file() else None
            else:
                local_only = not download or hub_offline()
                config_path = _hub_files(label, str(hub_id), local_only)[0]
            library = _library_of(_read_json(config_path))
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
