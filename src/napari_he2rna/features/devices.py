"""Which torch device a job runs on: the one place that reads ``"auto"``.

Feature extraction (:mod:`.features`), training (:mod:`.training`), the research commands and the viewer all
ask :func:`resolve_device`, so ``--device auto`` means the same thing everywhere.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "mps_available"]


def mps_available() -> bool:
    """Whether Apple's Metal (MPS) backend is built into this torch and usable on this machine."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_built() and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``device``; ``"auto"`` (or None): CUDA, else Apple MPS, else CPU.

    "auto" picks MPS over the CPU for every caller, extraction and training alike. Extraction gains most
    from it (a ViT or ResNet over thousands of tiles). Training took the CPU before the two were merged
    because MPS has no float64; nothing float64 runs on the training device (the output rescaling and the
    folding of the feature scaling into the first layer run after ``model.cpu()``, :mod:`.scaling` works on
    NumPy or CPU tensors), so one rule fits both. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` are taken
    as given.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or str(device).strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)
