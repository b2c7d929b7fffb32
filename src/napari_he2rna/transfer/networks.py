"""The networks of the MSI experiment, their training, and the transcriptomic representation.

* :class:`SimpleHE2RNA`: slide mean feature -> two sigmoid hidden layers (1024, 256) -> one linear output per
  gene; its last hidden layer is the slide's *transcriptomic representation* (:func:`represent`).
* :class:`MLPClassifier`: sigmoid MLP with one logit (MSI-H vs MSS).
* :class:`Autoencoder`: the mirror autoencoder baseline (1024-256-1024, ReLU / linear).

Every network z-scores its input with its training set's statistics (:class:`Standardize`); training is Adam
on shuffled minibatches for a fixed number of epochs (the paper: 50, no early stopping). Inputs are
``(n_samples, dim)`` matrices (:func:`check_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import DataError, ModelError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..model.scaling import FeatureScaler
from .labels import group_folds

# ------------------------------------------------------------------------------------------- networks


class Standardize(nn.Module):
    """Per-feature z-scoring with the training set's mean and std, stored in the module.

    The paper feeds raw ResNet50 means; weight-free backbones such as "hed-stats" mix features whose scales
    differ by orders of magnitude, which saturates sigmoid units, so every network here standardises first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: np.ndarray) -> Standardize:
        scaler = FeatureScaler.fit([x])  # the package's one standardisation (constant features: std 1)
        self.mean.copy_(torch.as_tensor(scaler.mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(scaler.std, dtype=torch.float32))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SimpleHE2RNA(nn.Module):
    """The simple HE2RNA of the MSI experiment: mean slide feature -> sigmoid hidden layers -> genes.

    Parameters
    ----------
    input_dim
        Features of the slide mean (2048 for ResNet50).
    n_genes
        Outputs (linear).
    hidden
        Hidden sizes, sigmoid (paper: ``(1024, 256)``); the last one is the representation size.
    """

    def __init__(self, input_dim: int, n_genes: int, hidden: Sequence[int] = (1024, 256)) -> None:
        super().__init__()
        self.input_dim, self.n_genes = int(input_dim), int(n_genes)
        self.hidden = tuple(int(h) for h in hidden)
        if not self.hidden:
            raise ValueError("the simple HE2RNA needs at least one hidden layer (the representation)")
        self.norm = Standardize(self.input_dim)
        sizes = [self.input_dim, *self.hidden]
        self.hidden_layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.out = nn.Linear(self.hidden[-1], self.n_genes)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, input_dim)`` -> ``(B, hidden[-1])`` sigmoid activations of the last hidden layer."""
        h = self.norm(x)
        for layer in self.hidden_layers:
            h = torch.sigmoid(layer(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, input_dim)`` -> ``(B, n_genes)`` predicted log10(1 + FPKM-UQ)."""
        return self.out(self.representation(x))


class MLPClassifier(nn.Module):
    """Binary classifier: standardise -> sigmoid hidden layers -> one logit (sigmoid gives P(positive))."""

    def __init__(self, input_dim: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.norm = Standardize(self.input_dim)
        sizes = [self.input_dim, *self.hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.sigmoid(h)
        return h[:, 0]


class Autoencoder(nn.Module):
    """Mirror autoencoder ``dim -> 1024 (ReLU) -> 256 (linear code) -> 1024 (ReLU) -> dim (linear)``.

    ``hidden`` is (outer, code, outer); the reconstruction target is the standardised input.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (1024, 256, 1024)) -> None:
        super().__init__()
        if len(hidden) != 3:
            raise ValueError("the autoencoder takes three hidden sizes: (outer, code, outer)")
        a, code, b = (int(h) for h in hidden)
        self.input_dim, self.hidden = int(input_dim), (a, code, b)
        self.norm = Standardize(self.input_dim)
        self.encoder = nn.Sequential(nn.Linear(self.input_dim, a), nn.ReLU(), nn.Linear(a, code))
        self.decoder = nn.Sequential(nn.Linear(code, b), nn.ReLU(), nn.Linear(b, self.input_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


# ------------------------------------------------------------------------------------------- training


def _fit(
    model: nn.Module,
    x: np.ndarray,
    target: np.ndarray,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    device: str,
    cancel: CancelToken | None = None,
) -> nn.Module:
    """Adam on shuffled minibatches for a fixed number of epochs (the paper: 50, no early stopping)."""
    from ..features.devices import resolve_device

    dev = resolve_device(device)
    model.to(dev).train()
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(target, dtype=np.float32), device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(xt)
    for _ in range(int(epochs)):
        check_cancel(cancel)
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.cpu().eval()


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with reproducible initial weights without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return make()


def check_matrix(x: np.ndarray, n: int | None = None, what: str = "features") -> np.ndarray:
    x = np.require(np.asarray(x, dtype=np.float32), requirements=["W"])  # torch wants writable arrays
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"The {what} must be a non-empty (n_samples, dim) matrix, got shape {x.shape}.")
    if n is not None and x.shape[0] != n:
        raise DataError(f"The {what} have {x.shape[0]} rows for {n} samples.")
    if not np.isfinite(x).all():
        raise DataError(f"The {what} contain NaN or infinite values.")
    return x


def train_simple_he2rna(
    x: np.ndarray,
    y: np.ndarray,
    hidden: Sequence[int] = (1024, 256),
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    cancel: CancelToken | None = None,
) -> SimpleHE2RNA:
    """Train the simple HE2RNA on slide-mean features.

    Parameters
    ----------
    x
        ``(n_samples, dim)`` mean tile feature of each slide.
    y
        ``(n_samples, n_genes)`` log10(1 + FPKM-UQ).
    hidden
        Sigmoid hidden sizes; the last is the representation size (paper: 1024, 256).
    epochs, lr, batch_size, weight_decay
        Adam, mean squared error, fixed epochs (paper: 50).

    Returns
    -------
    SimpleHE2RNA
        On CPU, in eval mode.
    """
    x = check_matrix(x)
    y = check_matrix(y, len(x), "expression values")
    model = _seeded(seed, lambda: SimpleHE2RNA(x.shape[1], y.shape[1], hidden))
    model.norm.fit(x)
    with torch.no_grad():  # start from the mean expression, as the tile model does
        model.out.bias.copy_(torch.as_tensor(y.mean(axis=0)))
    return _fit(
        model, x, y, nn.functional.mse_loss, epochs, lr, batch_size, weight_decay, seed, device, cancel
    )


def represent(model: SimpleHE2RNA | Sequence[SimpleHE2RNA], x: np.ndarray) -> np.ndarray:
    """The transcriptomic representation of slides: ``(n_samples, dim)`` -> ``(n_samples, hidden[-1])``.

    Given several models (the fold models of hospital A), their representations are averaged, as in the
    paper; the fold models share their initial weights (:func:`train_representation`) so that the same unit
    means about the same thing in each.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models:
        raise ModelError("No model was given to compute a representation.")
    x = check_matrix(x)
    if x.shape[1] != models[0].input_dim:
        raise ModelError(
            f"The features have {x.shape[1]} dimensions but the representation model takes "
            f"{models[0].input_dim}: use features of the backbone the model was trained on."
        )
    with torch.no_grad():
        xt = torch.as_tensor(x)
        reps = [m.eval().cpu().representation(xt).numpy() for m in models]
    return np.mean(reps, axis=0).astype(np.float32)


def train_autoencoder(
    x: np.ndarray,
    hidden: Sequence[int] = (1024, 256, 1024),
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    cancel: CancelToken | None = None,
) -> Autoencoder:
    """Train the mirror autoencoder on ``(n_samples, dim)`` slide means (reconstruction MSE)."""
    x = check_matrix(x)
    model = _seeded(seed, lambda: Autoencoder(x.shape[1], hidden))
    model.norm.fit(x)
    z = (x - model.norm.mean.numpy()) / model.norm.std.numpy()
    return _fit(
        model, x, z, nn.functional.mse_loss, epochs, lr, batch_size, weight_decay, seed, device, cancel
    )


def encode(model: Autoencoder, x: np.ndarray) -> np.ndarray:
    """Autoencoder codes ``(n_samples, code)``."""
    with torch.no_grad():
        return model.eval().cpu().encode(torch.as_tensor(check_matrix(x))).numpy()


def train_classifier(
    x: np.ndarray,
    labels: np.ndarray,
    hidden: Sequence[int] = (256, 128),
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    cancel: CancelToken | None = None,
) -> MLPClassifier:
    """Train a sigmoid-MLP binary classifier (binary cross-entropy) on ``(n_samples, dim)``, labels 0/1."""
    x = check_matrix(x)
    labels = np.asarray(labels, dtype=np.float32).reshape(-1)
    if len(labels) != len(x):
        raise DataError(f"{len(labels)} labels were given for {len(x)} samples.")
    model = _seeded(seed, lambda: MLPClassifier(x.shape[1], hidden))
    model.norm.fit(x)
    with torch.no_grad():  # start from the base rate: with few samples an untrained net is not at 0.5 anyway
        p = float(np.clip(labels.mean(), 1e-3, 1 - 1e-3))
        model.layers[-1].bias.fill_(math.log(p / (1 - p)))
    loss = nn.functional.binary_cross_entropy_with_logits
    return _fit(model, x, labels, loss, epochs, lr, batch_size, weight_decay, seed, device, cancel)


def predict_proba(model: MLPClassifier, x: np.ndarray) -> np.ndarray:
    """P(positive) ``(n_samples,)``."""
    with torch.no_grad():
        return torch.sigmoid(model.eval().cpu()(torch.as_tensor(check_matrix(x)))).numpy()


def train_representation(
    x: np.ndarray,
    y: np.ndarray,
    patients: Sequence[str] | np.ndarray,
    n_folds: int = 3,
    hidden: Sequence[int] = (1024, 256),
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[list[SimpleHE2RNA], np.ndarray]:
    """Hospital A's step: one simple HE2RNA per patient-grouped fold (same initial weights).

    Returns
    -------
    (models, folds)
        The fold models and the fold of each sample: model ``f`` never saw the samples of fold ``f``
        (``n_folds == 1``: one model on everything, all folds 0).
    """
    x = check_matrix(x)
    y = check_matrix(y, len(x), "expression values")
    patients = np.asarray(patients).astype(str).reshape(-1)
    if len(patients) != len(x):
        raise DataError(f"{len(patients)} patient ids were given for {len(x)} samples.")
    if n_folds <= 1:
        folds = np.zeros(len(x), dtype=np.int64)
        model = train_simple_he2rna(x, y, hidden, epochs, lr, batch_size, 0.0, seed, device, cancel)
        report(progress, 1, 1, "trained")
        return [model], folds
    folds = group_folds(patients, n_folds, seed)
    models = []
    for f in range(n_folds):
        tr = folds != f
        models.append(train_simple_he2rna(x[tr], y[tr], hidden, epochs, lr, batch_size, 0.0, seed, device,
                                          cancel))  # fmt: skip
        report(progress, f + 1, n_folds, f"fold {f + 1}/{n_folds}")
    return models, folds


def oof_predictions(models: Sequence[SimpleHE2RNA], folds: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Out-of-fold expression predictions ``(n_samples, n_genes)``: each sample by the model of its fold."""
    x = check_matrix(x)
    folds = np.asarray(folds).reshape(-1)
    if len(folds) != len(x):
        raise DataError(f"{len(folds)} folds were given for {len(x)} samples.")
    out = np.full((len(x), models[0].n_genes), np.nan, dtype=np.float32)
    with torch.no_grad():
        for f, m in enumerate(models):
            idx = np.flatnonzero(folds == f)
            if len(idx):
                out[idx] = m.eval().cpu()(torch.as_tensor(x[idx])).numpy()
    return out
