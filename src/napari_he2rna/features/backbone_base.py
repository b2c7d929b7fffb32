"""The base class of every backbone: a :class:`Backbone` turns uint8 tiles into its input
(:meth:`Backbone.preprocess`: resize unless told not to, mean/std) and the input into ``(B, dim)`` features.
The registry of backbones is :mod:`.backbones`.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Backbone", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def preprocess(self, tiles: np.ndarray | torch.Tensor, resize: bool = True) -> torch.Tensor:
        """uint8 tiles ``(B, h, w, 3)`` -> normalised float32 ``(B, 3, input_px, input_px)`` on its device.

        With ``resize=False`` the tiles keep their own size, ``(B, 3, h, w)``: the input handling of models
        trained on tiles fed as they are (SEQUOIA's 256 px tiles into ResNet50, whose global average pool
        gives its 2048 features at any input size).
        """
        x = torch.as_tensor(tiles)
        if x.ndim == 3:
            x = x[None]
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if resize and (x.shape[-1] != self.input_px or x.shape[-2] != self.input_px):
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
