"""HE2RNA's transcriptomic representation, and the hospital A/B transfer experiment of the paper (MSI).

Re-implemented from the Methods of Schmauch et al. (2020), "Transcriptomic learning for MSI prediction":

* **Simple HE2RNA** (:class:`SimpleHE2RNA`): the input of a slide is the mean feature over all its tiles (one
  "supertile"); two hidden dense layers of 1024 and 256 units with sigmoid activation, a linear output per
  gene; 50 epochs, no tuning. The 256 sigmoid units of the last hidden layer are the slide's *transcriptomic
  representation* (:func:`represent`).
* **Hospital A/B** (:func:`run_transfer_experiment`): patients are split at random (MSI-H and MSS patients
  each) between hospital A, which has expression but no label, and hospital B, which has the label but no
  expression. A trains the simple HE2RNA with 3-fold cross-validation; B's slides are represented by the mean
  of the 3 fold models' representations. B trains, with 3-fold cross-validation, binary classifiers (sigmoid
  MLPs) on (a) the mean feature directly (hidden 256, 128), (b) the representation (hidden 128), (c) the
  256-d code of an autoencoder (1024-256-1024, ReLU / linear) trained on A or on B (on B's training folds
  only). Several samples of a patient are averaged; one ROC AUC over B's patients per cross-validation
  (out-of-fold scores pooled); the split is bootstrapped per ratio; methods are compared with a two-tailed
  Wilcoxon signed-rank test, paired by split. Where each sample went (hospital, folds) is kept per split.

Departure from the paper: every network z-scores its input with its training set's statistics
(:class:`Standardize`), because weight-free backbones mix features of very different scales.

Everything here is small dense networks on ``(n_samples, dim)`` matrices: it runs on CPU in seconds with
small sizes, and the sizes are parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import DataError, ModelError
from .folds import patient_auc as patient_auc  # one definition, re-exported for the transfer experiment
from .jobs import CancelToken, ProgressCallback, check_cancel, report
from .model import json_default  # the bundle writer's JSON encoder (numpy scalars and arrays, paths)
from .safe_output import atomic_write_text, prepare_folder
from .scaling import FeatureScaler

#: The paper's A:B splits, as the fraction of patients in hospital A (5/6-1/6 ... 0-1).
DEFAULT_RATIOS: tuple[float, ...] = (5 / 6, 3 / 4, 2 / 3, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 0.0)
METHODS: tuple[str, ...] = ("direct", "representation", "autoencoder_A", "autoencoder_B")
REPRESENTATION_FORMAT = "napari-he2rna-representation"


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
    from .devices import resolve_device

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


def _check_xy(x: np.ndarray, n: int | None = None, what: str = "features") -> np.ndarray:
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
    x = _check_xy(x)
    y = _check_xy(y, len(x), "expression values")
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
    x = _check_xy(x)
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
    x = _check_xy(x)
    model = _seeded(seed, lambda: Autoencoder(x.shape[1], hidden))
    model.norm.fit(x)
    z = (x - model.norm.mean.numpy()) / model.norm.std.numpy()
    return _fit(
        model, x, z, nn.functional.mse_loss, epochs, lr, batch_size, weight_decay, seed, device, cancel
    )


def encode(model: Autoencoder, x: np.ndarray) -> np.ndarray:
    """Autoencoder codes ``(n_samples, code)``."""
    with torch.no_grad():
        return model.eval().cpu().encode(torch.as_tensor(_check_xy(x))).numpy()


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
    x = _check_xy(x)
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
        return torch.sigmoid(model.eval().cpu()(torch.as_tensor(_check_xy(x)))).numpy()


# --------------------------------------------------------------------------------------- helpers


def group_folds(
    groups: Sequence[str] | np.ndarray,
    n_folds: int,
    seed: int = 0,
    strata: Sequence[Any] | np.ndarray | None = None,
) -> np.ndarray:
    """Fold per sample with every patient (group) in one fold, strata (e.g. labels) spread over the folds.

    scikit-learn's ``StratifiedGroupKFold`` via :mod:`napari_he2rna.training` (which falls back to dealing
    patients round-robin when a stratum is too small for scikit-learn).
    """
    from .folds import group_folds as grouped

    groups = np.asarray(groups).astype(str)
    y = np.zeros(len(groups), dtype=np.int64) if strata is None else np.asarray(strata).astype(str)
    return grouped(y, groups, int(n_folds), int(seed))


def binary_labels(
    values: Sequence[Any] | pd.Series,
    positive: Any | None = None,
    negative: Sequence[Any] | None = None,
) -> np.ndarray:
    """0/1 labels from a label column; ``-1`` for samples left out (missing label, or not ``negative``).

    Parameters
    ----------
    values
        The column, e.g. ``msi_status``.
    positive
        The value of class 1 (default: ``1``/``True`` for a 0/1 column, else ``MSI-H``).
    negative
        The values of class 0 (default: every other non-missing value). The paper's main analysis is MSI-H
        vs MSS, MSI-L left out: ``negative=["MSS"]``.

    Raises
    ------
    DataError
        The positive value is not in the column, or the column has no label at all.
    """
    s = pd.Series(values).reset_index(drop=True)
    missing = s.isna() | (s.astype(str).str.strip() == "")
    text = s.map(_label_text)
    uniq = sorted(set(text[~missing]))
    if not uniq:
        raise DataError("The label column is empty: no sample has a label.")
    if positive is None:
        if set(uniq) <= {"0", "1", "True", "False", "true", "false"}:
            pos_values = {"1", "True", "true"}
        elif "MSI-H" in uniq:
            pos_values = {"MSI-H"}
        else:
            raise DataError(
                f"The label column has values {uniq[:6]}; say which one is positive (--positive)."
            )
    else:
        pos_values = {_label_text(positive)}
        if not pos_values & set(uniq):
            raise DataError(f"No sample has the positive label {positive!r}; the column has {uniq[:6]}.")
    out = text.isin(pos_values).to_numpy(np.int64)
    if negative is not None:
        neg_values = {_label_text(v) for v in negative}
        if neg_values & pos_values:
            raise DataError(f"{sorted(neg_values & pos_values)} cannot be both positive and negative.")
        out[~text.isin(pos_values | neg_values).to_numpy()] = -1
    out[missing.to_numpy()] = -1
    return out


def _label_text(v: Any) -> str:
    """A label as text, numbers canonical (``1``, ``1.0`` and ``"1.0"`` are all ``"1"``)."""
    text = str(v).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else repr(f)


def patient_labels(labels: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One label per patient for each sample (positive if any of the patient's samples is), and the
    patients whose samples disagree (e.g. two slides labelled MSI-H and MSS)."""
    lab = np.asarray(labels).astype(np.int64).reshape(-1)
    pats = np.asarray(patients).astype(str).reshape(-1)
    pid, inv = np.unique(pats, return_inverse=True)
    hi = np.zeros(len(pid), dtype=np.int64)
    lo = np.ones(len(pid), dtype=np.int64)
    np.maximum.at(hi, inv, lab)
    np.minimum.at(lo, inv, lab)
    return hi[inv], [str(p) for p in pid[hi != lo]]


# ------------------------------------------------------------------------------------------ experiment


@dataclass
class TransferConfig:
    """Sizes and training settings of the hospital A/B experiment (defaults: the paper's)."""

    rep_hidden: tuple[int, ...] = (1024, 256)
    direct_hidden: tuple[int, ...] = (256, 128)
    code_hidden: tuple[int, ...] = (128,)  # classifier on a 256-d representation or code
    ae_hidden: tuple[int, int, int] = (1024, 256, 1024)
    epochs: int = 50  # every network (paper: 50)
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    n_folds: int = 3
    n_cv_repeats: int = 1  # the paper averaged 10 three-fold CVs per split
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("rep_hidden", "direct_hidden", "code_hidden", "ae_hidden"):
            setattr(self, name, tuple(int(h) for h in getattr(self, name)))
        if not self.rep_hidden:
            raise DataError("The representation network needs at least one hidden layer.")
        if len(self.ae_hidden) != 3:
            raise DataError(
                "The autoencoder takes three hidden sizes (outer, code, outer), e.g. 1024 256 1024."
            )
        if any(h < 1 for h in (*self.rep_hidden, *self.direct_hidden, *self.code_hidden, *self.ae_hidden)):
            raise DataError("Hidden layer sizes must be positive.")
        if self.n_folds < 2:
            raise DataError("The transfer experiment needs at least 2 cross-validation folds.")
        if self.epochs < 1 or self.batch_size < 1 or self.n_cv_repeats < 1 or not self.lr > 0:
            raise DataError("Epochs, batch size, CV repeats and learning rate must be positive.")


AUC_COLUMNS = ["ratio", "fraction_B", "bootstrap", "n_patients_A", "n_patients_B", "method", "auc"]
TEST_COLUMNS = ["ratio", "fraction_B", "method_1", "method_2", "mean_1", "mean_2", "n", "statistic", "p"]


@dataclass
class TransferResult:
    """Per (ratio, bootstrap, method): the ROC AUC on hospital B, the paired Wilcoxon tests, and where each
    sample went in each split."""

    aucs: pd.DataFrame  # AUC_COLUMNS
    tests: pd.DataFrame  # TEST_COLUMNS
    config: TransferConfig = field(default_factory=TransferConfig)
    # ratio, bootstrap, sample, patient, label, hospital ("A"/"B"), fold_A (-1 in B), fold_B_<r> (-1 in A)
    splits: pd.DataFrame | None = None

    def summary(self) -> pd.DataFrame:
        """Mean, s.d. and count of AUCs per ratio and method (splits where a method could run)."""
        g = self.aucs.dropna(subset=["auc"]).groupby(["ratio", "fraction_B", "method"], sort=False)["auc"]
        out = g.agg(["mean", "std", "count"]).reset_index()
        order = {m: i for i, m in enumerate(METHODS)}
        out["_o"] = out["method"].map(order)
        return (
            out.sort_values(["ratio", "_o"], ascending=[False, True])
            .drop(columns="_o")
            .reset_index(drop=True)
        )


def _split_hospitals(
    patient_ids: np.ndarray, patient_labels: np.ndarray, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool per patient, True in hospital A: ``ratio`` of each class's patients, at random."""
    in_a = np.zeros(len(patient_ids), dtype=bool)
    for c in np.unique(patient_labels):
        idx = rng.permutation(np.flatnonzero(patient_labels == c))
        in_a[idx[: int(round(ratio * len(idx)))]] = True
    return in_a


def _cv_scores(
    z: np.ndarray | Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    y: np.ndarray,
    folds: np.ndarray,
    hidden: Sequence[int],
    cfg: TransferConfig,
    seed: int,
    cancel: CancelToken | None,
) -> np.ndarray:
    """Out-of-fold P(positive) of B's samples; ``z`` is the inputs, or a function (train, test) -> inputs
    fitted on the training fold only (the autoencoder trained on B)."""
    oof = np.full(len(y), np.nan, dtype=np.float64)
    for f in range(int(folds.max()) + 1):
        test, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if len(test) == 0:
            continue
        if callable(z):
            z_train, z_test = z(train, test)
        else:
            z_train, z_test = z[train], z[test]
        clf = train_classifier(
            z_train, y[train], hidden, cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay, seed + f,
            cfg.device, cancel,
        )  # fmt: skip
        oof[test] = predict_proba(clf, z_test)
    return oof


def parse_ratio(text: str | float) -> float:
    """``"3/4"``, ``"0.75"`` or ``0.75`` -> 0.75 (the fraction of patients in hospital A)."""
    try:
        if isinstance(text, str) and "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise DataError(f"A/B ratio {text!r} is not a number or a fraction such as 3/4.") from None
    if not 0.0 <= value < 1.0:
        raise DataError(
            f"A/B ratio {text!r} must be in [0, 1): it is the fraction of patients in hospital A."
        )
    return value


def run_transfer_experiment(
    features_mean: np.ndarray | pd.DataFrame,
    expression: np.ndarray | pd.DataFrame,
    labels: Sequence[int] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    n_bootstrap: int = 50,
    seed: int = 0,
    config: TransferConfig | None = None,
    methods: Sequence[str] = METHODS,
    sample_ids: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TransferResult:
    """The hospital A/B experiment: does a transcriptomic representation learnt at A help B's classifier?

    Parameters
    ----------
    features_mean
        ``(n_samples, dim)`` mean tile feature per slide (a DataFrame's index names the samples).
    expression
        ``(n_samples, n_genes)`` log10(1 + FPKM-UQ), same rows (only A's rows are ever used).
    labels
        ``(n_samples,)`` 0/1 (e.g. MSI-H = 1); one label per patient (positive if any sample is).
    patients
        ``(n_samples,)`` patient ids: a patient is wholly in A or in B, and in one cross-validation fold.
    ratios
        Fractions of the patients in hospital A, each class split alike (0 = everyone in B: no
        representation, no autoencoder A).
    n_bootstrap
        Random A/B splits per ratio (paper: 50).
    methods
        Among :data:`METHODS`.

    Returns
    -------
    TransferResult
        One AUC per (ratio, split, method; CV repeats averaged), two-tailed Wilcoxon signed-rank tests
        between methods per ratio, and the split of every sample.

    Raises
    ------
    DataError
        Mismatched rows, a single class, an unknown method, a ratio outside [0, 1).
    """
    cfg = config or TransferConfig()
    if sample_ids is None:
        sample_ids = (
            features_mean.index.astype(str).tolist()
            if isinstance(features_mean, pd.DataFrame)
            else [str(i) for i in range(len(features_mean))]
        )
    x = _check_xy(np.asarray(features_mean, dtype=np.float32), what="mean features")
    yexp = _check_xy(np.asarray(expression, dtype=np.float32), len(x), "expression values")
    lab = np.asarray(labels).reshape(-1)
    pats = np.asarray(patients).astype(str).reshape(-1)
    sids = np.asarray(sample_ids).astype(str).reshape(-1)
    if len(lab) != len(x) or len(pats) != len(x) or len(sids) != len(x):
        raise DataError(
            f"{len(x)} samples of features but {len(lab)} labels, {len(pats)} patient ids and "
            f"{len(sids)} sample ids: the rows must match."
        )
    if not np.isin(lab, [0, 1]).all():
        raise DataError("The labels must be 0 or 1 (drop the samples without a label first).")
    lab = lab.astype(np.int64)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise DataError(f"Unknown transfer method(s) {unknown}; choose among {', '.join(METHODS)}.")
    ratios = [parse_ratio(r) for r in ratios]
    if not ratios:
        raise DataError("Give at least one A/B ratio.")
    if int(n_bootstrap) < 1:
        raise DataError("The number of A/B splits per ratio (--bootstrap) must be at least 1.")
    pid, p_of_sample = np.unique(pats, return_inverse=True)
    p_label = np.zeros(len(pid), dtype=np.int64)
    np.maximum.at(p_label, p_of_sample, lab)
    lab = p_label[p_of_sample]  # one label per patient
    if len(set(p_label.tolist())) < 2:
        raise DataError("The labels have a single class: a classifier needs positive and negative patients.")
    if min(np.bincount(p_label)) < cfg.n_folds:
        raise DataError(
            f"Only {min(np.bincount(p_label))} patients of one class: {cfg.n_folds}-fold cross-validation "
            "needs at least one per fold."
        )

    rows: list[dict[str, Any]] = []
    split_frames: list[pd.DataFrame] = []
    total, done = len(ratios) * int(n_bootstrap), 0
    for ri, ratio in enumerate(ratios):
        for b in range(int(n_bootstrap)):
            check_cancel(cancel)
            rng = np.random.default_rng([seed, ri, b])
            in_a = _split_hospitals(pid, p_label, ratio, rng)[p_of_sample]
            a_idx, b_idx = np.flatnonzero(in_a), np.flatnonzero(~in_a)
            base = {
                "ratio": ratio,
                "fraction_B": 1.0 - ratio,
                "bootstrap": b,
                "n_patients_A": len(set(pats[a_idx])),
                "n_patients_B": len(set(pats[b_idx])),
            }
            s = int(rng.integers(2**31))
            aucs, folds_a, folds_b = _one_split(x, yexp, lab, pats, a_idx, b_idx, cfg, methods, s, cancel)
            rows.extend({**base, "method": m, "auc": v} for m, v in aucs.items())
            sp = pd.DataFrame(
                {"ratio": ratio, "bootstrap": b, "sample": sids, "patient": pats, "label": lab,
                 "hospital": np.where(in_a, "A", "B"), "fold_A": -1}
            )  # fmt: skip
            sp.loc[a_idx, "fold_A"] = folds_a
            for r in range(cfg.n_cv_repeats):
                col = np.full(len(x), -1, dtype=np.int64)
                if r < len(folds_b):
                    col[b_idx] = folds_b[r]
                sp[f"fold_B_{r}"] = col
            split_frames.append(sp)
            done += 1
            report(progress, done, total, f"A:B {ratio:.2f}:{1 - ratio:.2f} split {b + 1}/{n_bootstrap}")
    auc = pd.DataFrame(rows, columns=AUC_COLUMNS)
    splits = pd.concat(split_frames, ignore_index=True) if split_frames else None
    return TransferResult(auc, wilcoxon_tests(auc), cfg, splits)


def _one_split(
    x: np.ndarray,
    yexp: np.ndarray,
    lab: np.ndarray,
    pats: np.ndarray,
    a_idx: np.ndarray,
    b_idx: np.ndarray,
    cfg: TransferConfig,
    methods: Sequence[str],
    seed: int,
    cancel: CancelToken | None,
) -> tuple[dict[str, float], np.ndarray, list[np.ndarray]]:
    """AUC per method for one A/B split (NaN where a method cannot run, e.g. A or B too small), the fold of
    each A sample (-1 when A has no representation) and B's folds per CV repeat."""
    out = {m: float("nan") for m in methods}
    folds_a = np.full(len(a_idx), -1, dtype=np.int64)
    xb, yb, pb = x[b_idx], lab[b_idx], pats[b_idx]
    # every B fold must be able to hold a patient of each class
    b_ok = len(yb) > 0 and min(len(set(pb[yb == c].tolist())) for c in (0, 1)) >= cfg.n_folds
    if not b_ok:
        return out, folds_a, []
    a_ok = len(set(pats[a_idx].tolist())) >= cfg.n_folds
    kw = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}
    inputs: dict[str, Any] = {}
    if "direct" in methods:
        inputs["direct"] = (xb, cfg.direct_hidden)
    if "representation" in methods and a_ok:
        folds_a = group_folds(pats[a_idx], cfg.n_folds, seed)
        models = []
        for f in range(cfg.n_folds):
            check_cancel(cancel)
            tr = a_idx[folds_a != f]
            # same init seed for every fold model: their units then correspond, so averaging makes sense
            models.append(
                train_simple_he2rna(
                    x[tr], yexp[tr], cfg.rep_hidden, seed=seed, device=cfg.device, cancel=cancel, **kw
                )
            )
        inputs["representation"] = (represent(models, xb), cfg.code_hidden)
    if "autoencoder_A" in methods and a_ok:
        ae = train_autoencoder(x[a_idx], cfg.ae_hidden, seed=seed + 1, device=cfg.device, cancel=cancel, **kw)
        inputs["autoencoder_A"] = (encode(ae, xb), cfg.code_hidden)
    if "autoencoder_B" in methods:

        def codes_b(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # trained on B's training fold only: the test fold's slides stay unseen
            ae_b = train_autoencoder(
                xb[train], cfg.ae_hidden, seed=seed + 2, device=cfg.device, cancel=cancel, **kw
            )
            return encode(ae_b, xb[train]), encode(ae_b, xb[test])

        inputs["autoencoder_B"] = (codes_b, cfg.code_hidden)
    folds_b: list[np.ndarray] = []
    sums = {m: 0.0 for m in inputs}
    for rep in range(cfg.n_cv_repeats):
        fb = group_folds(pb, cfg.n_folds, seed + 17 * rep + 3, strata=yb)
        folds_b.append(fb)
        for m, (z, hidden) in inputs.items():
            scores = _cv_scores(z, yb, fb, hidden, cfg, seed + 100 * rep, cancel)
            sums[m] += patient_auc(scores, yb, pb)
    for m in inputs:
        out[m] = sums[m] / cfg.n_cv_repeats
    return out, folds_a, folds_b


def wilcoxon_tests(aucs: pd.DataFrame, reference: str = "representation") -> pd.DataFrame:
    """Two-tailed Wilcoxon signed-rank tests between methods, per ratio, paired by A/B split.

    The methods of one split are evaluated on the same hospital-B patients and folds, so the AUCs are
    paired: ``scipy.stats.wilcoxon`` (signed-rank) uses that pairing; the rank-sum test (``ranksums``) would
    treat the two distributions as independent samples and lose power. ``reference`` is compared with every
    other method, and ``direct`` with the autoencoders. ``p`` is NaN with fewer than 2 paired splits or when
    the two methods' AUCs are all equal.
    """
    from scipy.stats import wilcoxon

    rows = []
    if len(aucs):
        wide = aucs.pivot_table(
            index=["ratio", "bootstrap"], columns="method", values="auc", dropna=False, aggfunc="mean"
        )
        present = set(wide.columns)
        methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
        pairs = [(reference, m) for m in methods if m != reference and reference in methods]
        pairs += [("direct", m) for m in methods if m.startswith("autoencoder") and "direct" in methods]
        for ratio, sub in wide.groupby(level="ratio", sort=True):
            for m1, m2 in pairs:
                a, b = sub[m1].to_numpy(float), sub[m2].to_numpy(float)
                ok = np.isfinite(a) & np.isfinite(b)
                stat, p = float("nan"), float("nan")
                if ok.sum() >= 2 and np.any(a[ok] != b[ok]):
                    res = wilcoxon(a[ok], b[ok], alternative="two-sided")
                    stat, p = float(res.statistic), float(res.pvalue)
                rows.append(
                    {
                        "ratio": float(ratio),
                        "fraction_B": 1.0 - float(ratio),
                        "method_1": m1,
                        "method_2": m2,
                        "mean_1": float(np.mean(a[ok])) if ok.any() else float("nan"),
                        "mean_2": float(np.mean(b[ok])) if ok.any() else float("nan"),
                        "n": int(ok.sum()),
                        "statistic": stat,
                        "p": p,
                    }
                )
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


# -------------------------------------------------------------------------------------------- outputs

_COLORS = {"representation": "tab:blue", "direct": "tab:red", "autoencoder_A": "tab:green"}
_COLORS["autoencoder_B"] = "tab:purple"


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "****" if p < 1e-4 else "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "ns"


def _nearest_ratio(aucs: pd.DataFrame, focus_ratio: float) -> float:
    ratios = np.array(sorted(aucs["ratio"].unique()), dtype=float)
    return float(ratios[np.argmin(np.abs(ratios - focus_ratio))]) if len(ratios) else float(focus_ratio)


def plot_transfer(result: TransferResult, path: str | Path, focus_ratio: float = 3 / 4) -> Path:
    """A figure like the paper's 6d/e: AUC vs fraction of patients in B (mean ± s.d.), and boxplots of the
    AUCs of every method at ``focus_ratio`` (nearest ratio run) with Wilcoxon stars vs the representation.

    Uses matplotlib's object API (no pyplot), so it never changes the backend of a running napari.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    summ = result.summary()
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_d, ax_e = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    for m, sub in summ.groupby("method", sort=False):
        sub = sub.sort_values("fraction_B")
        fb, mu, sd = sub["fraction_B"].to_numpy(), sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        ax_d.plot(fb, mu, "-^", color=_COLORS.get(m), label=m, ms=4)
        ax_d.fill_between(fb, mu - sd, mu + sd, color=_COLORS.get(m), alpha=0.15)
    r = _nearest_ratio(result.aucs, focus_ratio)
    ax_d.axvline(1 - r, ls="--", color="grey", lw=0.8)
    ax_d.axhline(0.5, ls=":", color="lightgrey", lw=0.8)
    ax_d.set_xlim(0, 1.02)
    ax_d.set_xlabel("fraction of patients in hospital B")
    ax_d.set_ylabel(f"ROC AUC on hospital B ({result.config.n_folds}-fold CV)")
    ax_d.set_title("d  AUC vs A/B split (mean ± s.d. over splits)", fontsize=10)
    if len(summ):
        ax_d.legend(fontsize=8)
    at = result.aucs[np.isclose(result.aucs["ratio"].astype(float), r)].dropna(subset=["auc"])
    order = [m for m in METHODS if m in set(at["method"])]
    data = [at.loc[at["method"] == m, "auc"].to_numpy(float) for m in order]
    if data:
        bp = ax_e.boxplot(data, showmeans=True, patch_artist=True)
        for patch, m in zip(bp["boxes"], order, strict=True):
            patch.set_facecolor(_COLORS.get(m, "grey"))
            patch.set_alpha(0.4)
        ax_e.set_xticks(range(1, len(order) + 1), [m.replace("_", "\n") for m in order], fontsize=8)
        tests = result.tests[
            np.isclose(result.tests["ratio"].astype(float), r)
            & (result.tests["method_1"] == "representation")
        ]
        top = max(float(np.max(d)) for d in data)
        for _, t in tests.iterrows():
            if t["method_2"] in order:
                ax_e.text(order.index(t["method_2"]) + 1, top + 0.02, _stars(t["p"]), ha="center", fontsize=8)
        ax_e.set_ylim(top=min(1.08, top + 0.08))
    ax_e.set_title(f"e  A:B = {r:.2f}:{1 - r:.2f} (stars: Wilcoxon vs representation)", fontsize=9)
    ax_e.set_ylabel("ROC AUC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


def summary_markdown(result: TransferResult) -> str:
    """A short human-readable summary: mean ± s.d. AUC per ratio and method, and the Wilcoxon tests."""
    summ = result.summary()
    methods = [m for m in METHODS if m in set(summ["method"])]
    lines = [
        "# Hospital A/B transfer experiment",
        "",
        f"ROC AUC over hospital B's patients ({result.config.n_folds}-fold patient-grouped CV, "
        f"{result.config.n_cv_repeats} CV repeat(s) averaged per split); mean ± s.d. over the A/B splits "
        "(number of splits where the method could run).",
        "",
        "| A:B | patients A / B | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for ratio in sorted(result.aucs["ratio"].unique(), reverse=True):
        sub = result.aucs[result.aucs["ratio"] == ratio]
        na, nb = sub["n_patients_A"].median(), sub["n_patients_B"].median()
        cells = []
        for m in methods:
            row = summ[(summ["ratio"] == ratio) & (summ["method"] == m)]
            if row.empty:
                cells.append("n/a")
            else:
                sd = row["std"].iloc[0]
                sd_txt = f" ± {sd:.3f}" if np.isfinite(sd) else ""
                cells.append(f"{row['mean'].iloc[0]:.3f}{sd_txt} ({int(row['count'].iloc[0])})")
        lines.append(f"| {ratio:.3g}:{1 - ratio:.3g} | {na:.0f} / {nb:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Two-tailed Wilcoxon signed-rank tests, paired by split:",
        "",
        "| A:B | method 1 | method 2 | mean 1 | mean 2 | n | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, t in result.tests.iterrows():
        p = f"{t['p']:.2g}" if np.isfinite(t["p"]) else "n/a"
        lines.append(
            f"| {t['ratio']:.3g}:{1 - t['ratio']:.3g} | {t['method_1']} | {t['method_2']} | "
            f"{t['mean_1']:.3f} | {t['mean_2']:.3f} | {int(t['n'])} | {p} |"
        )
    return "\n".join(lines) + "\n"


def write_transfer_results(result: TransferResult, out_dir: str | Path, focus_ratio: float = 3 / 4) -> dict:
    """Write ``aucs.csv``, ``summary.csv``, ``summary.md``, ``tests.csv``, ``splits.csv.gz`` (which hospital
    and fold each sample was in, per split), ``config.json`` and ``transfer.png`` in ``out_dir``; returns
    name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, df in (("aucs", result.aucs), ("summary", result.summary()), ("tests", result.tests)):
        paths[name] = out / f"{name}.csv"
        _write_text(paths[name], df.to_csv(index=False, lineterminator="\n"))
    paths["summary_md"] = out / "summary.md"
    _write_text(paths["summary_md"], summary_markdown(result))
    if result.splits is not None:
        paths["splits"] = out / "splits.csv.gz"
        tmp = out / ".splits.tmp.csv.gz"
        result.splits.to_csv(tmp, index=False, lineterminator="\n", compression="gzip")
        tmp.replace(paths["splits"])
    paths["config"] = out / "config.json"
    _write_text(paths["config"], json.dumps(asdict(result.config), indent=1))
    paths["figure"] = plot_transfer(result, out / "transfer.png", focus_ratio)
    return paths


def load_transfer_results(out_dir: str | Path) -> TransferResult:
    """Read back what :func:`write_transfer_results` wrote."""
    out = Path(out_dir)
    if not (out / "aucs.csv").is_file() or not (out / "config.json").is_file():
        raise DataError(
            f"{out} holds no transfer results (aucs.csv and config.json written by he2rna transfer)."
        )
    try:
        cfg = TransferConfig(**json.loads((out / "config.json").read_text()))
        aucs = pd.read_csv(out / "aucs.csv")
        tests = pd.read_csv(out / "tests.csv")
        splits = pd.read_csv(out / "splits.csv.gz", dtype={"sample": str, "patient": str}) if (
            out / "splits.csv.gz"
        ).is_file() else None  # fmt: skip
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON / CSV / missing-file errors: one sentence for the user
        raise DataError(
            f"The transfer results in {out} cannot be read ({type(exc).__name__}: {exc})."
        ) from None
    missing = [c for c in AUC_COLUMNS if c not in aucs.columns]
    if missing:
        raise DataError(f"{out / 'aucs.csv'} lacks the column(s) {', '.join(missing)}.")
    return TransferResult(aucs, tests, cfg, splits)


def _write_text(path: Path, text: str) -> None:
    """Atomically, with the user's umask mode (see :mod:`napari_he2rna.safe_output`)."""
    prepare_folder(path.parent)
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------- representation files


def save_representation_model(
    path: str | Path,
    models: Sequence[SimpleHE2RNA],
    genes: Sequence[str],
    backbone: str,
    tile_um: float = 112.0,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the fold models of a simple HE2RNA as one ``.safetensors`` file (weights + JSON header).

    safetensors holds only tensors and strings: loading it runs no code (unlike a pickle).
    """
    from safetensors.torch import save

    from .model import atomic_write_bytes

    models = list(models)
    if not models:
        raise ModelError("Cannot save a representation model without any model.")
    shapes = {(m.input_dim, m.n_genes, m.hidden) for m in models}
    if len(shapes) != 1:
        raise ModelError("The fold models of a representation model must have the same sizes.")
    if len(genes) != models[0].n_genes:
        raise ModelError(f"{len(genes)} gene names were given for {models[0].n_genes} model outputs.")
    tensors = {
        f"fold{i}.{k}": v.detach().cpu().float().contiguous().clone()
        for i, m in enumerate(models)
        for k, v in m.state_dict().items()
    }
    doc = {
        "input_dim": models[0].input_dim,
        "hidden": list(models[0].hidden),
        "genes": [str(g) for g in genes],
        "backbone": str(backbone),
        "tile_um": float(tile_um),
        "n_folds": len(models),
        "extra": dict(metadata or {}),
    }
    header = {"format": REPRESENTATION_FORMAT, "doc": json.dumps(doc, default=json_default)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=header))
    return path


def load_representation_model(path: str | Path) -> tuple[list[SimpleHE2RNA], dict[str, Any]]:
    """Read :func:`save_representation_model`'s file: the fold models (eval mode, CPU) and the JSON document
    (``input_dim``, ``hidden``, ``genes``, ``backbone``, ``tile_um``, ``n_folds``, ``extra``).

    Raises
    ------
    ModelError
        Missing, not a representation model, corrupt, or tensors that do not fit the declared sizes.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Representation model {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != REPRESENTATION_FORMAT:
                raise ModelError(f"{path.name} is not a representation model (made by `he2rna represent`).")
            doc = json.loads(header["doc"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        models = []
        for i in range(int(doc["n_folds"])):
            m = SimpleHE2RNA(int(doc["input_dim"]), len(doc["genes"]), [int(h) for h in doc["hidden"]])
            prefix = f"fold{i}."
            m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            models.append(m.eval())
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors/JSON/state-dict errors: one sentence for the user
        raise ModelError(
            f"{path.name} cannot be read as a representation model ({type(exc).__name__}: {exc})."
        ) from None
    if not models:
        raise ModelError(f"{path.name} holds no fold model.")
    return models, doc


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
    x = _check_xy(x)
    y = _check_xy(y, len(x), "expression values")
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
    x = _check_xy(x)
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


def pearson_per_gene(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson R of each column (NaN where a column is constant)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    yc, pc = y - y.mean(axis=0), pred - pred.mean(axis=0)
    den = np.sqrt((yc**2).sum(axis=0) * (pc**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (yc * pc).sum(axis=0) / den, np.nan)


def read_feature_table(path: str | Path) -> pd.DataFrame:
    """Slide-level features keyed by sample: CSV/TSV (first column the sample id) or ``.npz`` (either
    ``sample_id`` + one 2-D array, or one 1-D array per sample id). Returns samples x features (float32)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Feature table {path} does not exist.")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "sample_id" in keys:
                    arrays = [k for k in keys if k != "sample_id" and z[k].ndim == 2]
                    if len(arrays) != 1:
                        raise DataError(f"{path.name} must hold sample_id and one (n, dim) array.")
                    df = pd.DataFrame(z[arrays[0]], index=z["sample_id"].astype(str))
                else:
                    df = pd.DataFrame({k: np.asarray(z[k]).reshape(-1) for k in keys}).T
        else:
            from .cohort import read_table

            tab = read_table(path)
            df = tab.set_index(tab.columns[0])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zip/shape errors
        raise DataError(f"Feature table {path.name} cannot be read ({type(exc).__name__}: {exc}).") from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"Feature table {path.name} has no samples or no features.")
    df.index = df.index.astype(str)
    if df.index.duplicated().any():
        raise DataError(
            f"{path.name} lists samples more than once (e.g. {df.index[df.index.duplicated()][0]})."
        )
    df.index.name = "sample_id"
    df.columns = [str(c) for c in df.columns]
    try:
        out = df.astype(np.float32)
    except (ValueError, TypeError):
        raise DataError(
            f"{path.name} has non-numeric feature columns; the first column must be the sample id."
        ) from None
    if not np.isfinite(out.to_numpy()).all():
        raise DataError(f"{path.name} holds missing or infinite feature values.")
    return out


def representation_frame(rep: np.ndarray, sample_ids: Sequence[str]) -> pd.DataFrame:
    """A representation as a DataFrame: index ``sample_id``, columns ``rep_000`` ..."""
    rep = np.asarray(rep, dtype=np.float32)
    width = max(3, len(str(rep.shape[1] - 1)))
    df = pd.DataFrame(rep, index=pd.Index([str(s) for s in sample_ids], name="sample_id"))
    df.columns = [f"rep_{i:0{width}d}" for i in range(rep.shape[1])]
    return df


def write_representation(rep: pd.DataFrame, path: str | Path) -> Path:
    """Write a representation (samples x units, index = sample ids) as TSV, CSV (by suffix) or ``.npz``
    (``sample_id`` + ``representation``); :func:`read_feature_table` reads each back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rep = rep.copy()
    rep.index = rep.index.astype(str)
    rep.index.name = "sample_id"
    name = path.name.lower()
    if name.endswith(".npz"):
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, sample_id=rep.index.to_numpy().astype(str), representation=rep.to_numpy(np.float32))
        tmp.replace(path)
    elif name.endswith(".tsv") or name.endswith(".csv") or name.endswith(".txt"):
        sep = "," if name.endswith(".csv") else "\t"
        _write_text(path, rep.to_csv(sep=sep, lineterminator="\n", float_format="%.7g"))
    else:
        raise DataError(f"Cannot write a representation as {path.name}: use .tsv, .csv or .npz.")
    return path


@dataclass
class SlideFeatures:
    """Per sample: the mean tile feature (a row of ``mean``), the supertile features (when asked for), and
    the samples without features (sample -> reason)."""

    mean: pd.DataFrame  # samples x dim
    supertiles: dict[str, np.ndarray]  # sample -> (k, dim); empty unless with_supertiles
    failed: dict[str, str]


def load_slide_features(
    samples: pd.DataFrame,
    backbone: str,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    supertile_k: int = 100,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    with_supertiles: bool = False,
) -> SlideFeatures:
    """Mean tile feature (over *all* tiles, the simple HE2RNA's input) of every sample of a sheet (``slide``
    column), read the way ``he2rna train`` reads a cohort: :func:`napari_he2rna.training.cohort_features`
    on the shared feature cache (extracted when missing).

    The supertile means are not used for the mean: supertiles are unweighted cluster centroids.
    """
    from .cohort import cohort_features

    tiles, failed = cohort_features(
        samples, backbone, tile_um, cache_dir, supertiles=False, supertile_k=supertile_k, device=device,
        progress=progress, cancel=cancel,
    )  # fmt: skip
    means: dict[str, np.ndarray] = {}
    for sid in tiles:
        check_cancel(cancel)
        means[sid] = np.asarray(tiles[sid], np.float64).mean(axis=0)
    mean = pd.DataFrame.from_dict(means, orient="index").astype(np.float32)
    mean.index = mean.index.astype(str)
    mean.index.name = "sample_id"
    mean.columns = [str(c) for c in mean.columns]
    sts: dict[str, np.ndarray] = {}
    if with_supertiles and means:
        st, more_failed = cohort_features(
            samples.loc[list(means)], backbone, tile_um, cache_dir, supertiles=True, supertile_k=supertile_k,
            device=device, cancel=cancel,
        )  # fmt: skip
        sts = {k: np.asarray(v, np.float32) for k, v in st.items()}
        failed.update(more_failed)
    return SlideFeatures(mean, sts, failed)
