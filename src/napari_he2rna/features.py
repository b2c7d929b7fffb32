"""Tile features: backbones (a small registry), the batched extraction pipeline, the zarr cache, supertiles.

A slide becomes an ``(n_tiles, dim)`` float32 matrix aligned to the rows of its :class:`~.tiling.TileGrid`.

* :func:`get_backbone` builds a network by name: ``"resnet50-imagenet"`` (the paper's ResNet50, 2048-d),
  ``"hed-stats"`` (weight-free colour and nucleus statistics, used by the bundled demo model) and optional
  pathology foundation models through timm. Weights come from a local file or torch's hub cache and are never
  replaced by random ones: missing weights raise :class:`~.errors.WeightsError` naming the file to fetch.
* :func:`extract_features` reads tiles in a thread pool while the model runs on the previous batch
  (OpenSlide releases the GIL while decoding), autocasts on GPU and halves the batch on out-of-memory.
* :func:`load_or_extract` keeps features in one zarr store per (slide, backbone, tile size), written batch by
  batch into ``<name>.partial`` so an interrupted run resumes, then renamed when complete. A lock file
  ``<name>.lock`` beside it keeps two processes from writing one store at once (the second waits), and a
  sha256 of every array, kept in the provenance, is checked on each read: a store that changed on disk is
  recomputed with one warning naming it.
* :func:`extract_cohort` runs one task per slide, locally or on a dask.distributed cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, settings
from .errors import CacheError, CacheWarning, He2rnaError, WeightsError
from .jobs import CancelToken, ProgressCallback, check_cancel, report
from .precision import cpu_prefers_bf16
from .safe_output import OutputError, exclusive_lock, prepare_folder
from .tiling import TileGrid, check_tile_size, mask_method, read_tiles, tile_grid

__all__ = [
    "Backbone",
    "BACKBONES",
    "register_backbone",
    "get_backbone",
    "backbone_info",
    "resolve_device",
    "resolve_precision",
    "precision_name",
    "effective_precision",
    "BatchRunner",
    "iter_features",
    "extract_features",
    "load_or_extract",
    "cache_path",
    "read_cache",
    "is_cached",
    "supertiles",
    "extract_cohort",
    "extract_slide_task",
    "HED_STATS_FEATURES",
    "RESNET50_URL",
    "RESNET50_FILE",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url (checked against torchvision 0.29's source).
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
RESNET50_FILE = "resnet50-0676ba61.pth"
# The CPU precision of "auto" where bf16 hardware is absent (benchmarks/bench_extract.py: ResNet50 in bf16
# on an AMD EPYC without AVX512-BF16 was 6x slower than fp32; on a Xeon with AMX 4.5x faster). Whether the
# hardware is there is decided per machine by precision.cpu_prefers_bf16.
DEFAULT_CPU_PRECISION = "fp32"
CACHE_FORMAT = "napari-he2rna-features"
CACHE_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- backbones
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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else Apple MPS, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


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


# ----------------------------------------------------------------------------------------------- pipeline
def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32).

    ``"auto"``: bf16 on CUDA when supported else fp16; on CPU bf16 where it runs faster than fp32 (AMX or
    AVX512-BF16, :func:`~.precision.cpu_prefers_bf16`), else fp32 (:data:`DEFAULT_CPU_PRECISION`).
    """
    precision = (precision or "auto").lower()
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            precision = "bf16" if cpu_prefers_bf16() else DEFAULT_CPU_PRECISION
        else:
            precision = "fp32"
    table = {
        "fp32": None,
        "float32": None,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if precision not in table:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if table[precision] is torch.float16 and device.type == "cpu":
        return torch.bfloat16  # fp16 matmuls on CPU are slow or missing; bf16 is CPU's half precision
    return table[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for an autocast dtype from :func:`resolve_precision`."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def effective_precision(backbone: Backbone, precision: str = "auto") -> str:
    """The precision ``backbone`` runs in for ``precision`` (fp32 for backbones that never autocast)."""
    return precision_name(resolve_precision(precision, backbone.device) if backbone.autocast else None)


class BatchRunner:
    """Runs the backbone on uint8 batches, autocast + channels_last on GPU, halving the batch on OOM."""

    def __init__(self, backbone: Backbone, batch_size: int, precision: str) -> None:
        self.backbone = backbone
        self.device = backbone.device
        self.dtype = resolve_precision(precision, self.device) if backbone.autocast else None
        self.batch_size = max(int(batch_size), 1)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            backbone.to(memory_format=torch.channels_last)

    def _forward(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles)
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.inference_mode():
            inp = self.backbone.preprocess(x)
            if self.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            ctx = (
                torch.autocast(self.device.type, dtype=self.dtype)
                if self.dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = self.backbone(inp)
            return out.float().cpu().numpy()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        outs, start = [], 0
        while start < len(tiles):
            chunk = tiles[start : start + self.batch_size]
            try:
                outs.append(self._forward(chunk))
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(self.batch_size // 2, 1)
                torch.cuda.empty_cache()
                warnings.warn(f"out of GPU memory: batch size lowered to {self.batch_size}", stacklevel=2)
                continue
            start += len(chunk)
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


def iter_features(
    slide,
    grid: TileGrid,
    backbone: Backbone,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 32,
    precision: str = "auto",
    num_workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Features batch by batch, in order: yields ``(rows (b,), features (b, dim) float32)``.

    Reader threads decode the next batches while the model runs on the current one (prefetch of
    ``num_workers + 1`` batches). Stops with :class:`~.errors.Cancelled` between batches when ``cancel`` is
    set, leaving nothing half-done (the caller has every batch yielded so far).
    """
    rows = np.arange(len(grid.table)) if indices is None else np.asarray(indices, dtype=np.int64)
    total = len(rows)
    run = BatchRunner(backbone, batch_size, precision)
    batches = [rows[i : i + run.batch_size] for i in range(0, total, run.batch_size)]
    if total == 0:
        return
    workers = max(int(num_workers), 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="he2rna-tiles")
    pending: deque = deque()
    next_batch = 0

    def submit() -> None:
        nonlocal next_batch
        if next_batch < len(batches):
            pending.append(pool.submit(read_tiles, slide, grid, batches[next_batch], backbone.input_px, 1))
            next_batch += 1

    done, start = 0, time.perf_counter()
    try:
        for _ in range(workers + 1):
            submit()
        for batch_rows in batches:
            check_cancel(cancel)
            tiles = pending.popleft().result()
            submit()
            feats = run(tiles)
            done += len(batch_rows)
            rate = done / max(time.perf_counter() - start, 1e-9)
            report(progress, done, total, f"{rate:.1f} tiles/s")
            yield batch_rows, feats
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def extract_features(
    slide,
    grid: TileGrid,
    backbone: Backbone,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Features of every tile of ``grid``.

    Parameters
    ----------
    slide : Slide
    grid : TileGrid
    backbone : Backbone
        From :func:`get_backbone`; moved to ``device`` unless that is ``"auto"``.
    batch_size : int
        Tiles per forward pass (halved on GPU out-of-memory).
    device : str
        ``"auto"`` keeps the backbone where it is.
    precision : str
        ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast dtype; see :func:`resolve_precision`).
    num_workers : int
        Tile reader threads.
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress messages give the rate in tiles/s.

    Returns
    -------
    (N, dim) float32, rows aligned to ``grid.table``.
    """
    if device not in (None, "auto"):
        backbone.to(resolve_device(device))
    out = np.empty((len(grid.table), backbone.dim), dtype=np.float32)
    for rows, feats in iter_features(
        slide, grid, backbone, None, batch_size, precision, num_workers, progress, cancel
    ):
        out[rows] = feats
    return out


# ----------------------------------------------------------------------------------------------- supertiles
def supertiles(
    grid: TileGrid, features: np.ndarray, k: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's supertiles: k-means (scikit-learn) on tile positions, mean feature per cluster.

    Parameters
    ----------
    grid : TileGrid
    features : (N, dim) array
    k : int
        Clusters; ``min(k, N)`` are made.
    seed : int

    Returns
    -------
    centroid_features : (k, dim) float32
    labels : (N,) int64, the cluster of each tile.
    """
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n == 0:
        raise ValueError("no tiles to group into supertiles")
    k = min(int(k), n)
    if k == n:
        labels = np.arange(n, dtype=np.int64)
    else:
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(grid.centers())
        labels = km.labels_.astype(np.int64)
    sums = np.zeros((k, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), labels


# ----------------------------------------------------------------------------------------------- cache
_GRID_INT_COLUMNS = ["tile_id", "row", "col", "x", "y", "size"]


def cache_path(
    slide, backbone: Backbone | str, tile_um: float = 112.0, cache_dir: str | Path | None = None
) -> Path:
    """The zarr store of (slide, backbone, tile size): ``<stem>-<fingerprint>-<backbone>-<tile>um.zarr``."""
    name = backbone if isinstance(backbone, str) else backbone.name
    root = Path(cache_dir) if cache_dir is not None else settings.cache_dir()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(slide.path).stem)[:60]
    return root / f"{stem}-{slide.fingerprint()[:16]}-{name}-{tile_um:g}um.zarr"


def _provenance(
    slide,
    backbone: Backbone,
    tile_um: float,
    min_tissue: float,
    max_tiles: int | None,
    seed: int,
    precision: str = "auto",
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "slide_fingerprint": slide.fingerprint(),
        "slide_path": str(Path(slide.path).resolve()),
        "backbone": backbone.name,
        "weights_hash": backbone.weights_hash,
        "feature_dim": int(backbone.dim),
        # bf16 features differ from fp32 ones (cosine >= 0.999): a store of one is not reused as the other
        "precision": effective_precision(backbone, precision),
        "tile_um": float(tile_um),
        "mpp": float(slide.require_mpp()),
        "min_tissue": float(min_tissue),
        "tissue_mask": mask_method(),  # a store tiled with another mask (e.g. keeping pen ink) is not reused
        "max_tiles": None if max_tiles is None else int(max_tiles),
        "seed": int(seed),
        "library_version": __version__,
    }


# These must match for a store to be reused; slide_path and library_version are provenance only.
_MUST_MATCH = [
    "format",
    "format_version",
    "slide_fingerprint",
    "backbone",
    "weights_hash",
    "feature_dim",
    "precision",
    "tile_um",
    "mpp",
    "min_tissue",
    "tissue_mask",
    "max_tiles",
    "seed",
]


def _mismatch(attrs: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key in _MUST_MATCH:
        a, b = attrs.get(key), expected[key]
        same = (
            math.isclose(a, b, rel_tol=1e-9)
            if isinstance(b, float) and isinstance(a, (int, float))
            else a == b
        )
        if not same:
            return f"{key} is {a!r}, expected {b!r}"
    return None


def _grid_from_group(group, attrs: dict[str, Any]) -> TileGrid:
    cols = {c: np.asarray(group[f"grid/{c}"][:], dtype=np.int64) for c in _GRID_INT_COLUMNS}
    cols["tissue_fraction"] = np.asarray(group["grid/tissue_fraction"][:], dtype=np.float64)
    n = {len(v) for v in cols.values()}
    if len(n) != 1:
        raise CacheError("the grid columns of the feature cache have different lengths.")
    return TileGrid(
        table=pd.DataFrame(cols),
        tile_px=int(attrs["tile_px"]),
        tile_um=float(attrs["tile_um"]),
        mpp=float(attrs["mpp"]),
        n_rows=int(attrs["n_rows"]),
        n_cols=int(attrs["n_cols"]),
        slide_dimensions=tuple(int(v) for v in attrs["slide_dimensions"]),
    )


def _digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (what was decoded, so any corrupt chunk changes it)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def _grid_arrays(grid: TileGrid) -> dict[str, np.ndarray]:
    arrays = {f"grid/{c}": grid.table[c].to_numpy(dtype=np.int64) for c in _GRID_INT_COLUMNS}
    arrays["grid/tissue_fraction"] = grid.table["tissue_fraction"].to_numpy(dtype=np.float64)
    return arrays


def _verify_checksums(path: Path, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """CacheError naming the arrays of ``arrays`` whose digest differs from the one stored at completion.

    Stores written before checksums were kept (no ``checksums`` attribute) are read unverified.
    """
    stored = attrs.get("checksums")
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise CacheError(f"the feature cache {path.name} has an unreadable checksum list.")
    bad = [name for name, arr in arrays.items() if stored.get(name) != _digest(arr)]
    if bad:
        which = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CacheError(
            f"the feature cache {path.name} changed on disk since it was written "
            f"(checksum of {which} differs)."
        )


def read_cache(path: str | Path) -> tuple[TileGrid, np.ndarray, dict[str, Any]]:
    """Grid, features and provenance of a complete store (no checks against a slide).

    Raises
    ------
    CacheError
        Unreadable, incomplete or inconsistent store (missing chunks show up as NaN features), or one whose
        arrays no longer match the checksums stored when it was completed (a flipped bit, a chunk copied
        from another store).
    """
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != CACHE_FORMAT:
            raise CacheError(f"{path} is not a napari-he2rna feature cache.")
        if not attrs.get("complete"):
            raise CacheError(f"{path} is an unfinished feature cache.")
        grid = _grid_from_group(group, attrs)
        features = np.asarray(group["features"][:], dtype=np.float32)
        done = np.asarray(group["done"][:], dtype=bool)
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"the feature cache {path} is unreadable ({type(exc).__name__}: {exc}).") from exc
    if features.shape != (len(grid.table), int(attrs["feature_dim"])) or not done.all():
        raise CacheError(f"the feature cache {path} is incomplete (shape {features.shape}).")
    _verify_checksums(path, attrs, {"features": features, "done": done, **_grid_arrays(grid)})
    if not np.isfinite(features).all():
        raise CacheError(f"the feature cache {path} holds missing or non-finite features.")
    return grid, features, attrs


def read_supertiles(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The supertiles stored beside the features: ``(k, dim)`` mean features and ``(N,)`` labels."""
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        centroids = np.asarray(group["supertiles/features"][:], dtype=np.float32)
        labels = np.asarray(group["supertiles/labels"][:], dtype=np.int64)
    except Exception as exc:
        raise CacheError(f"the supertiles of {path} are unreadable ({type(exc).__name__}: {exc}).") from exc
    _verify_checksums(
        path, dict(group.attrs), {"supertiles/features": centroids, "supertiles/labels": labels}
    )
    return centroids, labels


def _remove_store(path: Path) -> None:
    """Delete one of *our* stores (named ``*.zarr`` / ``*.zarr.partial``), nothing else."""
    if not path.exists():
        return
    if not (path.name.endswith(".zarr") or path.name.endswith(".zarr.partial")):
        raise CacheError(f"refusing to delete {path}: not a feature cache store.")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _validate_complete(path: Path, expected: dict[str, Any]) -> tuple[TileGrid, np.ndarray] | None:
    """The cached grid and features if ``path`` is a complete, matching, sound store; else None (warned)."""
    if not path.exists():
        return None
    try:
        grid, features, attrs = read_cache(path)
    except CacheError as exc:
        warnings.warn(f"{str(exc).rstrip('.')}; recomputing it.", CacheWarning, stacklevel=3)
        return None
    reason = _mismatch(attrs, expected)
    if reason:
        warnings.warn(
            f"the feature cache {path.name} is stale ({reason}); recomputing it.", CacheWarning, stacklevel=3
        )
        return None
    return grid, features


def is_cached(
    slide,
    backbone: Backbone,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    min_tissue: float = 0.5,
    max_tiles: int | None = 8000,
    seed: int = 0,
    precision: str = "auto",
) -> bool:
    """Whether a complete, matching store exists for these settings (read, so a corrupt one is not)."""
    expected = _provenance(slide, backbone, tile_um, min_tissue, max_tiles, seed, precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _validate_complete(cache_path(slide, backbone, tile_um, cache_dir), expected) is not None


def _open_partial(partial: Path, expected: dict[str, Any]):
    """A resumable partial store (group, grid, done) or None when absent/unsound (then removed)."""
    import zarr

    if not partial.exists():
        return None
    try:
        group = zarr.open_group(str(partial), mode="r+")
        attrs = dict(group.attrs)
        reason = _mismatch(attrs, expected)
        if reason is None:
            grid = _grid_from_group(group, attrs)
            done = np.asarray(group["done"][:], dtype=bool)
            if group["features"].shape == (len(grid.table), expected["feature_dim"]) and done.shape == (
                len(grid.table),
            ):
                return group, grid, done
            reason = "its arrays do not match its grid"
    except Exception as exc:
        reason = f"unreadable ({type(exc).__name__}: {exc})"
    warnings.warn(
        f"discarding the unfinished feature cache {partial.name}: {reason}.", CacheWarning, stacklevel=3
    )
    _remove_store(partial)
    return None


def _create_partial(partial: Path, grid: TileGrid, expected: dict[str, Any], chunk_rows: int):
    import zarr

    _remove_store(partial)
    group = zarr.open_group(str(partial), mode="w")
    n = len(grid.table)
    for col in _GRID_INT_COLUMNS:
        group.create_array(f"grid/{col}", data=grid.table[col].to_numpy(dtype=np.int64), chunks=(max(n, 1),))
    group.create_array(
        "grid/tissue_fraction",
        data=grid.table["tissue_fraction"].to_numpy(dtype=np.float64),
        chunks=(max(n, 1),),
    )
    # NaN fill: a chunk lost on disk reads back as NaN, which read_cache rejects, never as plausible zeros.
    group.create_array(
        "features",
        shape=(n, expected["feature_dim"]),
        dtype="float32",
        chunks=(chunk_rows, expected["feature_dim"]),
        fill_value=np.nan,
    )
    group.create_array("done", shape=(n,), dtype="bool", chunks=(chunk_rows,), fill_value=False)
    group.attrs.update(
        {
            **expected,
            "tile_px": int(grid.tile_px),
            "n_rows": int(grid.n_rows),
            "n_cols": int(grid.n_cols),
            "slide_dimensions": [int(v) for v in grid.slide_dimensions],
            "n_tiles": n,
            "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    return group


def load_or_extract(
    slide,
    backbone: Backbone | str,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    min_tissue: float = 0.5,
    max_tiles: int | None = 8000,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    supertile_k: int = 100,
    weights: str | Path | None = None,
    grid_ready: Callable[[TileGrid], None] | None = None,
    order: Callable[[TileGrid, np.ndarray], np.ndarray] | None = None,
    batch_ready: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[TileGrid, np.ndarray]:
    """Cached features of a slide: read them if a sound store exists, else compute (resuming) and store.

    The store ``cache_path(slide, backbone, tile_um, cache_dir)`` holds the grid table columns
    (``grid/<column>``), ``features`` (N, dim) float32, ``done`` (N,) bool, ``supertiles/features`` (k, dim)
    and ``supertiles/labels`` (N,), and provenance attributes (slide fingerprint and path, backbone name and
    weights hash, precision, tile µm, mpp, tiling parameters, library version, ``complete``). It is written
    batch by
    batch into ``<name>.partial`` and renamed when complete, so a killed or cancelled run resumes from the
    rows already done; a stale (other weights, pixel size or tiling parameters) or corrupt store is
    recomputed with a warning.

    Parameters
    ----------
    slide : Slide
    backbone : Backbone or str
        A built backbone, or a registry name (built with ``weights`` on ``device``).
    tile_um, min_tissue, max_tiles, seed
        Tiling, see :func:`~.tiling.tile_grid`.
    cache_dir : path, optional
        Folder of the stores (default :func:`settings.cache_dir`).
    batch_size, device, precision, num_workers, progress, cancel
        See :func:`extract_features`.
    supertile_k : int
        Clusters of the stored supertiles.
    grid_ready : callable, optional
        Called with the tile grid as soon as it is known, before the long extraction (the viewer draws the
        tile outline with it).
    order : callable, optional
        ``order(grid, rows) -> rows``: the order in which the rows still to do are extracted (the viewer
        extracts a coarse lattice of tiles first, see :func:`napari_he2rna.progressive.spread_order`).
    batch_ready : callable, optional
        ``batch_ready(rows, features)`` after each batch is stored (and once, first, with the rows a resumed
        store already had), so a caller can use features as they arrive (the viewer paints them).

    Returns
    -------
    grid : TileGrid
    features : (N, dim) float32
    """
    import zarr  # noqa: F401  (fail early with ImportError rather than after extracting)

    check_tile_size(tile_um, slide.require_mpp(), slide.dimensions)  # before any store is named or made
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, weights=weights, device=device)
    elif device not in (None, "auto"):
        backbone.to(resolve_device(device))
    final = cache_path(slide, backbone, tile_um, cache_dir)
    if not final.parent.is_dir():
        _writable_cache_folder(final.parent)
    expected = _provenance(slide, backbone, tile_um, min_tissue, max_tiles, seed, precision)
    # One writer per store across processes (CLI runs, widgets, dask workers); a read-only cache has no
    # lock file, and needs none: nothing can be written there.
    with exclusive_lock(
        final.with_name(final.name + ".lock"),
        what=f"the feature cache {final.name}",
        cancelled=lambda: check_cancel(cancel),
    ):
        cached = _validate_complete(final, expected)
        if cached is not None:
            if grid_ready is not None:
                grid_ready(cached[0])
            report(progress, len(cached[0].table), len(cached[0].table), "cached")
            return cached
        _writable_cache_folder(final.parent)
        return _extract_into_store(
            slide, backbone, final, expected, tile_um, min_tissue, max_tiles, seed, batch_size, precision,
            num_workers, progress, cancel, supertile_k, grid_ready, order, batch_ready,
        )  # fmt: skip


def _writable_cache_folder(folder: Path) -> None:
    try:
        prepare_folder(folder, "feature cache folder", "choose another cache folder (--cache-dir)")
    except OutputError as exc:
        raise CacheError(str(exc)) from None


def _extract_into_store(
    slide, backbone, final, expected, tile_um, min_tissue, max_tiles, seed, batch_size, precision,
    num_workers, progress, cancel, supertile_k, grid_ready, order=None, batch_ready=None,
) -> tuple[TileGrid, np.ndarray]:  # fmt: skip
    """Compute the features of ``final`` into its ``.partial`` store (resuming it), then rename it."""
    partial = final.with_name(final.name + ".partial")
    opened = _open_partial(partial, expected)
    if opened is None:
        grid = tile_grid(slide, tile_um=tile_um, min_tissue=min_tissue, max_tiles=max_tiles, seed=seed)
        group = _create_partial(partial, grid, expected, chunk_rows=max(int(batch_size), 1) * 8)
        done = np.zeros(len(grid.table), dtype=bool)
    else:
        group, grid, done = opened
    if grid_ready is not None:
        grid_ready(grid)
    todo = np.flatnonzero(~done)
    if order is not None:
        todo = np.asarray(order(grid, todo), dtype=np.int64)
    features_arr, done_arr = group["features"], group["done"]
    n_done = int(done.sum())
    if batch_ready is not None and n_done:
        have = np.flatnonzero(done)
        batch_ready(have, np.asarray(features_arr.oindex[have], dtype=np.float32))

    def progress_with_offset(d: int, total: int, message: str) -> None:
        report(progress, n_done + d, n_done + total, message)

    for rows, feats in iter_features(
        slide,
        grid,
        backbone,
        todo,
        batch_size,
        precision,
        num_workers,
        progress_with_offset if progress else None,
        cancel,
    ):
        # In grid order rows are mostly contiguous: write the span, then mark it done; a spread order
        # writes the batch's rows at once (each chunk touched once per batch).
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows) and np.array_equal(rows, np.arange(lo, hi)):
            features_arr[lo:hi] = feats
            done_arr[lo:hi] = True
        else:
            features_arr.oindex[rows] = feats
            done_arr.oindex[rows] = True
        if batch_ready is not None:
            batch_ready(rows, feats)

    features = np.asarray(features_arr[:], dtype=np.float32)
    done_all = np.asarray(done_arr[:], dtype=bool)
    if not done_all.all() or not np.isfinite(features).all():
        raise CacheError(
            f"the feature cache {partial} lost rows while being written; run again to redo them."
        )
    centroids, labels = supertiles(grid, features, k=supertile_k, seed=seed)
    group.create_array("supertiles/features", data=centroids, overwrite=True)
    group.create_array("supertiles/labels", data=labels, overwrite=True)
    arrays = {
        "features": features,
        "done": done_all,
        **_grid_arrays(grid),
        "supertiles/features": centroids,
        "supertiles/labels": labels,
    }
    group.attrs.update(
        {
            "complete": True,
            "supertile_k": int(len(centroids)),
            "checksums": {name: _digest(arr) for name, arr in arrays.items()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    _remove_store(final)  # a stale or corrupt store of ours
    os.replace(partial, final)
    return grid, features


# ----------------------------------------------------------------------------------------------- cohorts
_BACKBONE_CACHE: dict[tuple[str, str | None, str], Backbone] = {}


def _cached_backbone(name: str, weights: str | Path | None, device: str) -> Backbone:
    """One backbone per (name, weights, device) per process: dask workers reuse it across slides."""
    key = (name, None if weights is None else str(weights), str(device))
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE[key] = get_backbone(name, weights=weights, device=device)
    return _BACKBONE_CACHE[key]


def extract_slide_task(
    path: str | Path,
    backbone_name: str,
    out_dir: str | Path | None = None,
    weights: str | Path | None = None,
    tile_um: float = 112.0,
    min_tissue: float = 0.5,
    max_tiles: int | None = 8000,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 2,
    mpp: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Extract (or find cached) features of one slide, opened by path; never raises for a bad slide.

    Returns
    -------
    dict with ``slide`` (path), ``status`` (``"ok"``, ``"cached"``, ``"failed"``), ``reason`` (why it
    failed, else ``""``), ``n_tiles`` and ``store`` (the zarr store's path, ``""`` when failed).
    """
    from .errors import Cancelled
    from .slide import open_slide

    result: dict[str, Any] = {"slide": str(path), "status": "failed", "reason": "", "n_tiles": 0, "store": ""}
    try:
        backbone = _cached_backbone(backbone_name, weights, device)
        with open_slide(path, mpp=mpp) as slide:
            store = cache_path(slide, backbone, tile_um, out_dir)
            cached = is_cached(slide, backbone, tile_um, out_dir, min_tissue, max_tiles, seed, precision)
            grid, _ = load_or_extract(
                slide,
                backbone,
                tile_um=tile_um,
                cache_dir=out_dir,
                min_tissue=min_tissue,
                max_tiles=max_tiles,
                seed=seed,
                batch_size=batch_size,
                precision=precision,
                num_workers=num_workers,
                progress=progress,
                cancel=cancel,
            )
        result.update(status="cached" if cached else "ok", n_tiles=len(grid.table), store=str(store))
    except Cancelled:
        raise
    except He2rnaError as exc:
        result["reason"] = str(exc)
    except Exception as exc:  # one bad slide must not stop a cohort; the reason is reported
        result["reason"] = f"{type(exc).__name__}: {exc}"
    return result


def extract_cohort(
    slides: Sequence[str | Path],
    backbone_name: str = "resnet50-imagenet",
    out_dir: str | Path | None = None,
    scheduler: Any = None,
    weights: str | Path | None = None,
    tile_um: float = 112.0,
    min_tissue: float = 0.5,
    max_tiles: int | None = 8000,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 2,
    mpp: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Features of many slides, one task per slide; a failing slide is reported and the others go on.

    Parameters
    ----------
    slides : sequence of paths
    backbone_name : str
        Registry name; each worker builds it once (workers need the weights file at the same path).
    out_dir : path, optional
        Where the stores go (default :func:`settings.cache_dir`).
    scheduler : None, str or distributed.Client
        None runs the slides one after the other here; a scheduler address (``"tcp://host:8786"``) or a
        ``distributed.Client`` submits one task per slide (workers re-open the slides by path).
    progress : callable, optional
        ``progress(slides_done, n_slides, last_slide_status)``.
    on_result : callable, optional
        Called with each slide's result as soon as that slide is done (in completion order), so a log
        shows every finished slide even when the run is killed later.

    Returns
    -------
    list of dict, one per slide in input order (see :func:`extract_slide_task`).
    """
    kwargs = dict(
        backbone_name=backbone_name,
        out_dir=None if out_dir is None else str(out_dir),
        weights=None if weights is None else str(weights),
        tile_um=tile_um,
        min_tissue=min_tissue,
        max_tiles=max_tiles,
        seed=seed,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
        mpp=mpp,
    )
    paths = [str(p) for p in slides]
    results: list[dict[str, Any] | None] = [None] * len(paths)
    if scheduler is None:
        for i, path in enumerate(paths):
            check_cancel(cancel)
            results[i] = extract_slide_task(path, cancel=cancel, **kwargs)
            if on_result is not None:
                on_result(results[i])
            report(progress, i + 1, len(paths), f"{Path(path).name}: {results[i]['status']}")
        return results  # type: ignore[return-value]

    from distributed import Client, as_completed

    own_client = isinstance(scheduler, str)
    client = Client(scheduler) if own_client else scheduler
    try:
        futures = [client.submit(extract_slide_task, path, pure=False, **kwargs) for path in paths]
        index = {f.key: i for i, f in enumerate(futures)}
        for n, future in enumerate(as_completed(futures), start=1):
            if cancel is not None and cancel.is_set():
                client.cancel(futures)
                check_cancel(cancel)
            i = index[future.key]
            try:
                results[i] = future.result()
            except Exception as exc:  # a worker that died, a task lost: report it for that slide
                results[i] = {
                    "slide": paths[i],
                    "status": "failed",
                    "reason": f"{type(exc).__name__}: {exc}",
                    "n_tiles": 0,
                    "store": "",
                }
            if on_result is not None:
                on_result(results[i])
            report(progress, n, len(paths), f"{Path(paths[i]).name}: {results[i]['status']}")
    finally:
        if own_client:
            client.close()
    return results  # type: ignore[return-value]
