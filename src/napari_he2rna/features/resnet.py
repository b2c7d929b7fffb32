"""ResNet50, the paper's backbone (torchvision's ImageNet weights, 2048 features per tile), and how weight
files are read: :func:`load_state_dict` (safetensors, or a torch checkpoint with ``weights_only=True``) and
:func:`file_hash` (their sha256, the weights' identity in caches and bundles).

The weights come from a local file, the weights folder or torch's hub cache (downloaded there unless
``HE2RNA_OFFLINE=1``) and are never replaced by random ones: missing weights raise
:class:`~..errors.WeightsError` naming what to fetch. Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import settings
from ..errors import WeightsError
from .backbone_base import Backbone

__all__ = [
    "ResNet50Backbone",
    "resnet50_factory",
    "file_hash",
    "load_state_dict",
    "not_weights_only",
    "RESNET50_URL",
    "RESNET50_FILE",
]

# torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url (checked against torchvision 0.29's source).
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
RESNET50_FILE = "resnet50-0676ba61.pth"


class ResNet50Backbone(Backbone):
    """torchvision ResNet50 up to the global average pool: 2048 features per tile (the paper's).

    Its tiles are resized to 224 px unless the extraction says otherwise (``input_px``, e.g. SEQUOIA's
    256 px tiles fed as they are): the global average pool gives 2048 features at any input size.
    """

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
        The file is unreadable, or a pickle holding more than tensors (``weights_only=True`` refuses it:
        :func:`not_weights_only` says so in one sentence).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # its pickle protocol: the file is refused or read all the same
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        pickled = not_weights_only(path, exc)
        if pickled is not None:
            raise pickled from None  # PyTorch's text would advise the unsafe way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"cannot load weights from {path}: not a safetensors file or a plain tensor checkpoint ({first})."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def not_weights_only(path: Path, exc: BaseException) -> WeightsError | None:
    """The one sentence for a checkpoint that ``weights_only=True`` refused (``exc`` or what caused it), else
    None. PyTorch's own text advises loading it with ``weights_only=False``, which would run its pickled
    code: it is never shown."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return WeightsError(
                f"cannot load weights from {path}: it is not a weights-only checkpoint (it pickles more than "
                "tensors, and pickled code is never run here); give the weights as safetensors "
                "(model.safetensors) or as a .bin saved from a plain state dict of tensors."
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _he2rna_offline() -> bool:
    return os.environ.get("HE2RNA_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def resnet50_factory(weights: str | Path | None, download: bool) -> Backbone:
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
