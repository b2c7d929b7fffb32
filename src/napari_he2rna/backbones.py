"""Backbones: the registry of feature extractors, how each is built, what it expects and what it outputs.

* :func:`get_backbone` builds a network by name: ``"resnet50-imagenet"`` (the paper's ResNet50, 2048-d),
  ``"hed-stats"`` (weight-free colour and nucleus statistics, used by the bundled demo model) and optional
  pathology foundation models through timm. Weights come from a local file or torch's hub cache and are never
  replaced by random ones: missing weights raise :class:`~.errors.WeightsError` naming the file to fetch.
* :func:`backbone_info` gives a registry entry (its output ``dim``) without building the network.
* A :class:`Backbone` turns uint8 tiles into its input (:meth:`Backbone.preprocess`: resize, mean/std) and
  the input into ``(B, dim)`` features; :mod:`.features` runs it over a slide's tiles.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import settings
from .devices import resolve_device
from .errors import WeightsError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "BACKBONES",
    "register_backbone",
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

        net = resnet50(weights=None)
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
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


class TimmBackbone(Backbone):
    """A pathology foundation model built by timm, with weights from a local file (optional extra)."""

    def __init__(self, name: str, net: nn.Module, dim: int, input_px: int, mean, std, weights_hash: str):
        super().__init__(mean=mean, std=std)
        self.name, self.dim, self.input_px, self.weights_hash = name, dim, input_px, weights_hash
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


def _offline() -> bool:
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
        if path is None and download and not _offline():
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


def _timm_factory(
    name: str, arch: str, dim: int, mean, std, model_kwargs: dict, filename: str, source: str
) -> Callable[[str | Path | None, bool], Backbone]:
    def factory(weights: str | Path | None, download: bool) -> Backbone:
        try:
            import timm
        except ImportError as exc:
            raise ImportError(
                f"the {name} backbone needs timm: pip install timm "
                f"(and its weights, {filename}, from {source})."
            ) from exc
        path = Path(weights).expanduser() if weights else settings.weights_dir() / name / filename
        if not path.is_file():
            raise WeightsError(
                f"{name} weights not found: request access and download {filename} from {source}, "
                "then put it "
                f"at {settings.weights_dir() / name / filename} or pass its path with --weights."
            )
        net = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
        try:
            net.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not fit the {name} network ({str(exc)[:200]}).") from exc
        return TimmBackbone(name, net, dim, 224, mean, std, file_hash(path))

    return factory


class BackboneSpec:
    """A registry entry: how to build a backbone, and what it outputs."""

    def __init__(
        self,
        name: str,
        factory: Callable[[str | Path | None, bool], Backbone],
        dim: int,
        input_px: int = 224,
        description: str = "",
    ) -> None:
        self.name, self.factory, self.dim, self.input_px, self.description = (
            name,
            factory,
            dim,
            input_px,
            description,
        )


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    factory: Callable[[str | Path | None, bool], Backbone],
    dim: int,
    input_px: int = 224,
    description: str = "",
) -> None:
    """Add a backbone to the registry; ``factory(weights, download) -> Backbone``."""
    BACKBONES[name] = BackboneSpec(name, factory, dim, input_px, description)


register_backbone(
    "resnet50-imagenet",
    _resnet50_factory,
    2048,
    description="torchvision ResNet50, ImageNet weights, global average pool (the paper's)",
)
register_backbone(
    "hed-stats",
    lambda weights, download: HedStatsBackbone(),
    len(HED_STATS_FEATURES),
    description="weight-free H&E colour and nucleus statistics (used by the demo model)",
)
register_backbone(
    "uni",
    _timm_factory(
        "uni",
        "vit_large_patch16_224",
        1024,
        IMAGENET_MEAN,
        IMAGENET_STD,
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        "pytorch_model.bin",
        "https://huggingface.co/MahmoodLab/UNI",
    ),
    1024,
    description="UNI ViT-L/16 (optional: timm + gated weights)",
)
register_backbone(
    "h-optimus-0",
    _timm_factory(
        "h-optimus-0",
        "vit_giant_patch14_reg4_dinov2",
        1536,
        (0.707223, 0.578729, 0.703617),
        (0.211883, 0.230117, 0.177517),
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        "pytorch_model.bin",
        "https://huggingface.co/bioptimus/H-optimus-0",
    ),
    1536,
    description="H-optimus-0 ViT-g/14 (optional: timm + weights)",
)
register_backbone(
    "phikon",
    _timm_factory(
        "phikon",
        "vit_base_patch16_224",
        768,
        IMAGENET_MEAN,
        IMAGENET_STD,
        {},
        "model.safetensors",
        "https://huggingface.co/owkin/phikon (converted to timm keys)",
    ),
    768,
    description="Phikon ViT-B/16 (optional: timm + weights)",
)


def backbone_info(name: str) -> BackboneSpec:
    """The registry entry of ``name`` (its output ``dim`` without building it)."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


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
        ``"resnet50-imagenet"`` (default), ``"hed-stats"``, or an optional extra (``"uni"``, ``"phikon"``,
        ``"h-optimus-0"``).
    weights : str or Path, optional
        A local weights file (safetensors or a plain torch state dict); otherwise the weights folder
        (:func:`settings.weights_dir`) and torch's hub cache are searched.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    download : bool
        Try to download missing ResNet50 weights into torch's hub cache (never when ``HE2RNA_OFFLINE=1``).

    Raises
    ------
    WeightsError
        Unknown name, or the weights are missing (the message says which file and where to put it) or do not
        fit the network.
    """
    spec = backbone_info(name)
    backbone = spec.factory(weights, download)
    return backbone.eval().to(resolve_device(device))
