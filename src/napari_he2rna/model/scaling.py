"""Feature standardisation: the one place where features are centred and scaled for training.

Backbone features live on very different scales (``hed-stats`` mixes fractions in [0, 1] with blob counts
in the tens; ResNet50 activations are non-negative with long tails). Every model that trains here sees
``(x - mean) / std`` with mean and std fitted on the training samples of its own fold only, never on
held-out samples. The scaling is then folded into the model's first linear layer
(``W (x - m) / s + b == (W / s) x + (b - W m / s)``), so a saved bundle takes raw backbone features, and
the bundle also records mean and std (:meth:`FeatureScaler.to_json`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FeatureScaler:
    """Per-feature mean and standard deviation, ``(dim,)`` float64 each."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, arrays: Iterable[np.ndarray]) -> FeatureScaler:
        """Fit on every row of every array (``(n_rows, dim)`` each: the tiles or supertiles of a sample).

        Streams over the arrays (sums in float64), so all-tile features need not be in memory at once. A
        constant feature gets std 1 (it is then only centred).
        """
        n, s, ss = 0, None, None
        for a in arrays:
            a = np.asarray(a, dtype=np.float64)
            if a.ndim != 2 or a.shape[0] == 0:
                continue
            if s is None:
                s, ss = np.zeros(a.shape[1]), np.zeros(a.shape[1])
            n += a.shape[0]
            s += a.sum(axis=0)
            ss += (a * a).sum(axis=0)
        if s is None or n == 0:
            raise ValueError("cannot fit a feature scaler on no rows")
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
        std = np.sqrt(var)
        return cls(mean=mean, std=np.where(std > 1e-6 * np.maximum(np.abs(mean), 1e-3), std, 1.0))

    @classmethod
    def fit_samples(cls, features: Mapping[str, np.ndarray], ids: Sequence[str]) -> FeatureScaler:
        """Fit on the rows of the samples ``ids`` only (a fold's training samples).

        Raises :class:`~napari_he2rna.errors.DataError` naming a sample whose features are not a non-empty
        ``(n, dim)`` matrix of the same width as the others, or hold NaN or infinite values.
        """
        from ..errors import DataError

        def checked():
            dim = None
            for sid in ids:
                try:
                    a = np.asarray(features[sid], dtype=np.float32)
                except KeyError:
                    raise DataError(f"No features for sample {sid}.") from None
                if a.ndim != 2 or a.shape[0] == 0:
                    raise DataError(
                        f"Features of sample {sid} must be a non-empty (n_tiles, dim) array, got {a.shape}."
                    )
                if dim is not None and a.shape[1] != dim:
                    raise DataError(f"Features of sample {sid} have {a.shape[1]} dimensions, others {dim}.")
                if not np.isfinite(a).all():
                    raise DataError(f"Features of sample {sid} contain NaN or infinite values.")
                dim = a.shape[1]
                yield a

        return cls.fit(checked())

    @classmethod
    def identity(cls, dim: int) -> FeatureScaler:
        return cls(mean=np.zeros(dim), std=np.ones(dim))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32, ``x`` of shape ``(..., dim)``."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def fold_into_linear(self, weight: Any, bias: Any) -> None:
        """Make a linear map that was trained on scaled features take raw ones, in place.

        Parameters
        ----------
        weight
            torch tensor ``(out, dim)`` or ``(out, dim, 1)`` (a 1x1 convolution).
        bias
            torch tensor ``(out,)``.
        """
        import torch

        with torch.no_grad():
            w = weight.double()
            w2 = w[:, :, 0] if w.ndim == 3 else w
            scale = torch.as_tensor(1.0 / self.std, dtype=torch.float64)
            shift = torch.as_tensor(self.mean / self.std, dtype=torch.float64)
            bias.copy_((bias.double() - w2 @ shift).to(bias.dtype))
            if w.ndim == 3:
                weight.copy_((w * scale[None, :, None]).to(weight.dtype))
            else:
                weight.copy_((w * scale[None, :]).to(weight.dtype))

    def unfold_from(self, model: Any) -> None:
        """The inverse of :meth:`fold_into`: make a model that takes raw features take scaled ones, in place
        (``W x + b == (W s) z + (b + W m)`` for ``z = (x - m) / s``)."""
        import torch

        first = model.layers[0]
        with torch.no_grad():
            w = first.weight.double()
            w2 = w[:, :, 0] if w.ndim == 3 else w
            first.bias.copy_(
                (first.bias.double() + w2 @ torch.as_tensor(self.mean, dtype=torch.float64)).to(
                    first.bias.dtype
                )
            )
            s = torch.as_tensor(self.std, dtype=torch.float64)
            first.weight.copy_((w * (s[None, :, None] if w.ndim == 3 else s[None, :])).to(first.weight.dtype))

    def fold_into(self, model: Any) -> None:
        """Fold into the first layer of a :class:`napari_he2rna.model.network.HE2RNA` (or any module whose
        ``layers[0]`` is a 1x1 ``Conv1d`` or ``Linear``), in place."""
        first = model.layers[0]
        self.fold_into_linear(first.weight, first.bias)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Sequence[float]]) -> FeatureScaler:
        return cls(
            mean=np.asarray(doc["mean"], dtype=np.float64), std=np.asarray(doc["std"], dtype=np.float64)
        )


class ScaledFeatures(Mapping):
    """A features mapping seen through a :class:`FeatureScaler` (values scaled when read, not stored)."""

    def __init__(self, features: Mapping[str, np.ndarray], scaler: FeatureScaler) -> None:
        self.features, self.scaler = features, scaler

    def __getitem__(self, key: str) -> np.ndarray:
        return self.scaler.transform(self.features[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def __contains__(self, key: object) -> bool:
        return key in self.features
