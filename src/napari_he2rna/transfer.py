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
  256-d code of an autoencoder (1024-256-1024, ReLU / linear) trained on A or on B. Several samples of a
  patient are averaged; one ROC AUC over B's patients per cross-validation; the split is bootstrapped per
  ratio; methods are compared with a two-tailed Wilcoxon signed-rank test.

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
from .jobs import CancelToken, ProgressCallback, check_cancel, report

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
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        std[~(std > 1e-8)] = 1.0  # constant features stay at 0 instead of dividing by zero
        self.mean.copy_(torch.as_tensor(x.mean(axis=0), dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))
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
    from .training import resolve_device

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
    x = np.asarray(x, dtype=np.float32)
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
    x = _check_xy(x)
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
    from .training import _group_folds

    groups = np.asarray(groups).astype(str)
    n_groups = len(set(groups.tolist()))
    if n_groups < n_folds:
        raise DataError(f"{n_groups} patients cannot fill {n_folds} folds; use fewer folds or more patients.")
    y = np.zeros(len(groups), dtype=np.int64) if strata is None else np.asarray(strata).astype(str)
    return _group_folds(y, groups, int(n_folds), int(seed))


def patient_auc(scores: np.ndarray, labels: np.ndarray, patients: np.ndarray) -> float:
    """ROC AUC over patients, each patient's score the mean over its samples (NaN if one class only)."""
    from sklearn.metrics import roc_auc_score

    df = pd.DataFrame({"s": np.asarray(scores, float), "y": np.asarray(labels, float), "p": patients})
    per = df.groupby("p", sort=True).agg(s=("s", "mean"), y=("y", "max"))
    if per["y"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(per["y"].to_numpy(), per["s"].to_numpy()))


def binary_labels(values: Sequence[Any] | pd.Series, positive: Any | None = None) -> np.ndarray:
    """0/1 labels from a column: ``positive`` marks the class 1 (default: 1/True, or e.g. ``MSI-H``)."""
    s = pd.Series(values)
    if positive is not None:
        return (s.astype(str) == str(positive)).to_numpy(np.int64)
    uniq = sorted(set(s.astype(str)))
    if set(uniq) <= {"0", "1", "0.0", "1.0", "True", "False"}:
        return s.astype(str).isin(["1", "1.0", "True"]).to_numpy(np.int64)
    if "MSI-H" in uniq:
        return (s.astype(str) == "MSI-H").to_numpy(np.int64)
    raise DataError(f"The label column has values {uniq[:5]}; say which one is positive (--positive).")


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


@dataclass
class TransferResult:
    """Per (ratio, bootstrap, method): the ROC AUC on hospital B, and the paired Wilcoxon tests."""

    aucs: pd.DataFrame  # ratio, fraction_B, bootstrap, method, auc, n_patients_A, n_patients_B
    tests: pd.DataFrame  # ratio, method_1, method_2, mean_1, mean_2, n, statistic, p
    config: TransferConfig = field(default_factory=TransferConfig)

    def summary(self) -> pd.DataFrame:
        """Mean, s.d. and count of AUCs per ratio and method."""
        g = self.aucs.dropna(subset=["auc"]).groupby(["ratio", "fraction_B", "method"], sort=False)["auc"]
        return (
            g.agg(["mean", "std", "count"])
            .reset_index()
            .sort_values(["ratio", "method"], ascending=[False, True])
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
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> TransferResult:
    """The hospital A/B experiment: does a transcriptomic representation learnt at A help B's classifier?

    Parameters
    ----------
    features_mean
        ``(n_samples, dim)`` mean tile feature per slide.
    expression
        ``(n_samples, n_genes)`` log10(1 + FPKM-UQ), same rows (only A's rows are ever used).
    labels
        ``(n_samples,)`` 0/1 (e.g. MSI-H = 1); one label per patient (the max is taken otherwise).
    patients
        ``(n_samples,)`` patient ids: a patient is wholly in A or in B, and in one cross-validation fold.
    ratios
        Fractions of the patients in hospital A (0 = everyone in B: no representation, no autoencoder A).
    n_bootstrap
        Random A/B splits per ratio (paper: 50).
    methods
        Among :data:`METHODS`.

    Returns
    -------
    TransferResult
        One AUC per (ratio, split, method, CV repeat averaged) and two-tailed Wilcoxon signed-rank tests
        between methods per ratio.
    """
    cfg = config or TransferConfig()
    x = _check_xy(np.asarray(features_mean, dtype=np.float32), what="mean features")
    yexp = _check_xy(np.asarray(expression, dtype=np.float32), len(x), "expression values")
    lab = np.asarray(labels).astype(np.int64).reshape(-1)
    pats = np.asarray(patients).astype(str).reshape(-1)
    if len(lab) != len(x) or len(pats) != len(x):
        raise DataError(f"{len(x)} samples but {len(lab)} labels and {len(pats)} patient ids.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DataError(f"Unknown transfer method(s) {unknown}; choose among {', '.join(METHODS)}.")
    pid, p_of_sample = np.unique(pats, return_inverse=True)
    p_label = np.zeros(len(pid), dtype=np.int64)
    np.maximum.at(p_label, p_of_sample, lab)
    lab = p_label[p_of_sample]  # one label per patient
    if len(set(p_label.tolist())) < 2:
        raise DataError("The labels have a single class: a classifier needs positive and negative patients.")

    rows: list[dict[str, Any]] = []
    total, done = len(ratios) * n_bootstrap, 0
    for ri, ratio in enumerate(ratios):
        ratio = float(ratio)
        if not 0.0 <= ratio < 1.0:
            raise DataError(f"A/B ratio {ratio} must be in [0, 1): it is the fraction of patients in A.")
        for b in range(n_bootstrap):
            check_cancel(cancel)
            rng = np.random.default_rng([seed, ri, b])
            in_a = _split_hospitals(pid, p_label, ratio, rng)[p_of_sample]
            a_idx, b_idx = np.flatnonzero(in_a), np.flatnonzero(~in_a)
            n_pa, n_pb = len(set(pats[a_idx])), len(set(pats[b_idx]))
            base = {"ratio": ratio, "fraction_B": 1.0 - ratio, "bootstrap": b, "n_patients_A": n_pa}
            base["n_patients_B"] = n_pb
            s = int(rng.integers(2**31))
            aucs = _one_split(x, yexp, lab, pats, a_idx, b_idx, cfg, methods, s, cancel)
            rows.extend({**base, "method": m, "auc": v} for m, v in aucs.items())
            done += 1
            report(progress, done, total, f"A:B {ratio:.2f}:{1 - ratio:.2f} split {b + 1}/{n_bootstrap}")
    auc = pd.DataFrame(rows, columns=["ratio", "fraction_B", "bootstrap", "n_patients_A", "n_patients_B"]
                       + ["method", "auc"])  # fmt: skip
    return TransferResult(auc, wilcoxon_tests(auc), cfg)


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
) -> dict[str, float]:
    """AUC per method for one A/B split (NaN where a method cannot run, e.g. A too small)."""
    out = {m: float("nan") for m in methods}
    xb, yb, pb = x[b_idx], lab[b_idx], pats[b_idx]
    if len(set(pb.tolist())) < cfg.n_folds or len(set(yb.tolist())) < 2:
        return out
    a_ok = len(set(pats[a_idx].tolist())) >= cfg.n_folds
    kw = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}
    inputs: dict[str, Any] = {}
    if "direct" in methods:
        inputs["direct"] = (xb, cfg.direct_hidden)
    if "representation" in methods and a_ok:
        folds_a = group_folds(pats[a_idx], cfg.n_folds, seed)
        models = []
        for f in range(cfg.n_folds):
            tr = a_idx[folds_a != f]
            # same init seed for every fold model: their units then correspond, so averaging makes sense
            models.append(
                train_simple_he2rna(x[tr], yexp[tr], cfg.rep_hidden, seed=seed, device=cfg.device, **kw)
            )
        inputs["representation"] = (represent(models, xb), cfg.code_hidden)
    if "autoencoder_A" in methods and a_ok:
        ae = train_autoencoder(x[a_idx], cfg.ae_hidden, seed=seed + 1, device=cfg.device, **kw)
        inputs["autoencoder_A"] = (encode(ae, xb), cfg.code_hidden)
    if "autoencoder_B" in methods:

        def codes_b(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # trained on B's training fold only: the test fold's slides stay unseen
            ae_b = train_autoencoder(xb[train], cfg.ae_hidden, seed=seed + 2, device=cfg.device, **kw)
            return encode(ae_b, xb[train]), encode(ae_b, xb[test])

        inputs["autoencoder_B"] = (codes_b, cfg.code_hidden)
    for rep in range(cfg.n_cv_repeats):
        folds_b = group_folds(pb, cfg.n_folds, seed + 17 * rep + 3, strata=yb)
        for m, (z, hidden) in inputs.items():
            scores = _cv_scores(z, yb, folds_b, hidden, cfg, seed + 100 * rep, cancel)
            a = patient_auc(scores, yb, pb)
            out[m] = a / cfg.n_cv_repeats if rep == 0 else out[m] + a / cfg.n_cv_repeats
    return out


def wilcoxon_tests(aucs: pd.DataFrame, reference: str = "representation") -> pd.DataFrame:
    """Two-tailed Wilcoxon signed-rank tests between methods, per ratio, paired by A/B split.

    The methods of one split are evaluated on the same hospital-B patients and folds, so the AUCs are
    paired: ``scipy.stats.wilcoxon`` (signed-rank) uses that pairing; the rank-sum test (``ranksums``) would
    treat the two distributions as independent samples and lose power. ``reference`` is compared with every
    other method, and ``direct`` with the autoencoders.
    """
    from scipy.stats import wilcoxon

    wide = aucs.pivot_table(index=["ratio", "bootstrap"], columns="method", values="auc", dropna=False)
    methods = list(wide.columns)
    pairs = [(reference, m) for m in methods if m != reference and reference in methods]
    pairs += [("direct", m) for m in methods if m.startswith("autoencoder") and "direct" in methods]
    rows = []
    for ratio, sub in wide.groupby(level="ratio", sort=False):
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
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------- outputs

_COLORS = {"representation": "tab:blue", "direct": "tab:red", "autoencoder_A": "tab:green"}
_COLORS["autoencoder_B"] = "tab:purple"


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return "****" if p < 1e-4 else "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "ns"


def plot_transfer(result: TransferResult, path: str | Path, focus_ratio: float = 3 / 4) -> Path:
    """A figure like the paper's 6d/e: AUC vs fraction of patients in B (mean ± s.d.), and boxplots of the
    AUCs of every method at ``focus_ratio`` (nearest ratio run) with Wilcoxon stars vs the representation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    summ = result.summary()
    fig, (ax_d, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for m, sub in summ.groupby("method", sort=False):
        sub = sub.sort_values("fraction_B")
        fb, mu, sd = sub["fraction_B"].to_numpy(), sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        ax_d.plot(fb, mu, "-^", color=_COLORS.get(m), label=m, ms=4)
        ax_d.fill_between(fb, mu - sd, mu + sd, color=_COLORS.get(m), alpha=0.15)
    ax_d.axvline(1 - focus_ratio, ls="--", color="grey", lw=0.8)
    ax_d.set_xlabel("fraction of patients in hospital B")
    ax_d.set_ylabel("ROC AUC on hospital B (3-fold CV)")
    ax_d.set_title("d  AUC vs A/B split (mean ± s.d. over splits)")
    ax_d.legend(fontsize=8)
    ratios = np.array(sorted(result.aucs["ratio"].unique()))
    r = float(ratios[np.argmin(np.abs(ratios - focus_ratio))]) if len(ratios) else focus_ratio
    at = result.aucs[np.isclose(result.aucs["ratio"], r)].dropna(subset=["auc"])
    order = [m for m in METHODS if m in set(at["method"])]
    data = [at.loc[at["method"] == m, "auc"].to_numpy() for m in order]
    if data:
        bp = ax_e.boxplot(data, showmeans=True, patch_artist=True)
        for patch, m in zip(bp["boxes"], order, strict=True):
            patch.set_facecolor(_COLORS.get(m, "grey"))
            patch.set_alpha(0.4)
        ax_e.set_xticks(range(1, len(order) + 1), [m.replace("_", "\n") for m in order], fontsize=8)
        tests = result.tests[
            np.isclose(result.tests["ratio"], r) & (result.tests["method_1"] == "representation")
        ]
        top = max(float(np.max(d)) if len(d) else 0.0 for d in data)
        for _, t in tests.iterrows():
            if t["method_2"] in order:
                ax_e.text(order.index(t["method_2"]) + 1, top + 0.02, _stars(t["p"]), ha="center", fontsize=8)
    ax_e.set_title(f"e  A:B = {r:.2f}:{1 - r:.2f} (stars: Wilcoxon vs representation)", fontsize=9)
    ax_e.set_ylabel("ROC AUC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_transfer_results(result: TransferResult, out_dir: str | Path, focus_ratio: float = 3 / 4) -> dict:
    """Write ``aucs.csv``, ``summary.csv``, ``tests.csv``, ``config.json`` and ``transfer.png`` in
    ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df in (("aucs", result.aucs), ("summary", result.summary()), ("tests", result.tests)):
        paths[name] = out / f"{name}.csv"
        _write_text(paths[name], df.to_csv(index=False, lineterminator="\n"))
    paths["config"] = out / "config.json"
    _write_text(paths["config"], json.dumps(asdict(result.config), indent=1))
    paths["figure"] = plot_transfer(result, out / "transfer.png", focus_ratio)
    return paths


def load_transfer_results(out_dir: str | Path) -> TransferResult:
    """Read back what :func:`write_transfer_results` wrote."""
    out = Path(out_dir)
    if not (out / "aucs.csv").is_file():
        raise DataError(f"{out} holds no transfer results (aucs.csv).")
    cfg = TransferConfig(**json.loads((out / "config.json").read_text()))
    return TransferResult(pd.read_csv(out / "aucs.csv"), pd.read_csv(out / "tests.csv"), cfg)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- representation files


def save_representation_model(
    path: str | Path,
    models: Sequence[SimpleHE2RNA],
    genes: Sequence[str],
    backbone: str,
    tile_um: float = 112.0,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the fold models of a simple HE2RNA as one ``.safetensors`` file (weights + JSON header)."""
    from safetensors.torch import save

    from .model import _atomic_write_bytes

    models = list(models)
    if not models:
        raise ModelError("Cannot save a representation model without any model.")
    tensors = {
        f"fold{i}.{k}": v.detach().cpu().float().contiguous().clone()
        for i, m in enumerate(models)
        for k, v in m.state_dict().items()
    }
    doc = {
        "input_dim": models[0].input_dim,
        "hidden": list(models[0].hidden),
        "genes": [str(g) for g in genes],
        "backbone": backbone,
        "tile_um": float(tile_um),
        "n_folds": len(models),
        "extra": dict(metadata or {}),
    }
    header = {"format": REPRESENTATION_FORMAT, "doc": json.dumps(doc)}
    path = Path(path)
    _atomic_write_bytes(path, save(tensors, metadata=header))
    return path


def load_representation_model(path: str | Path) -> tuple[list[SimpleHE2RNA], dict[str, Any]]:
    """Read :func:`save_representation_model`'s file: the fold models and the JSON document."""
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
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise ModelError(f"{path.name} cannot be read as a representation model ({exc}).") from None
    models = []
    for i in range(int(doc["n_folds"])):
        m = SimpleHE2RNA(doc["input_dim"], len(doc["genes"]), doc["hidden"])
        prefix = f"fold{i}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        models.append(m.eval())
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
        The fold models and the fold of each sample (``n_folds == 1``: one model on everything, folds 0).
    """
    x = _check_xy(x)
    if n_folds <= 1:
        folds = np.zeros(len(x), dtype=np.int64)
        return [train_simple_he2rna(x, y, hidden, epochs, lr, batch_size, 0.0, seed, device, cancel)], folds
    folds = group_folds(patients, n_folds, seed)
    models = []
    for f in range(n_folds):
        tr = folds != f
        models.append(train_simple_he2rna(x[tr], np.asarray(y)[tr], hidden, epochs, lr, batch_size, 0.0, seed,
                                          device, cancel))  # fmt: skip
        report(progress, f + 1, n_folds, f"fold {f + 1}/{n_folds}")
    return models, folds


def read_feature_table(path: str | Path) -> pd.DataFrame:
    """Slide-level features keyed by sample: CSV/TSV (first column the sample id) or ``.npz`` (either
    ``sample_id`` + one 2-D array, or one 1-D array per sample id). Returns samples x features (float32)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Feature table {path} does not exist.")
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
        from .training import _read_table

        tab = _read_table(path)
        df = tab.set_index(tab.columns[0])
    df.index = df.index.astype(str)
    df.index.name = "sample_id"
    df.columns = [str(c) for c in df.columns]
    try:
        return df.astype(np.float32)
    except ValueError:
        raise DataError(f"{path.name} has non-numeric feature columns.") from None


def write_representation(rep: pd.DataFrame, out_dir: str | Path, stem: str = "representation") -> dict:
    """Write a representation (samples x units) as ``<stem>.csv`` and ``<stem>.npz`` (sample_id +
    representation). Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = rep.copy()
    rep.index.name = "sample_id"
    csv = out / f"{stem}.csv"
    _write_text(csv, rep.to_csv(lineterminator="\n", float_format="%.6g"))
    npz = out / f"{stem}.npz"
    tmp = out / f".{stem}.tmp.npz"
    np.savez(tmp, sample_id=rep.index.to_numpy().astype(str), representation=rep.to_numpy(np.float32))
    tmp.replace(npz)
    return {"csv": csv, "npz": npz}


@dataclass
class SlideFeatures:
    """Per sample: the mean tile feature (a row of ``mean``) and the supertile features."""

    mean: pd.DataFrame  # samples x dim
    supertiles: dict[str, np.ndarray]  # sample -> (k, dim)
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
) -> SlideFeatures:
    """Mean and supertile features of every sample of a sheet (``slide`` column), from the feature cache
    (:func:`napari_he2rna.features.load_or_extract`; extracted when missing)."""
    from . import features as feat
    from .errors import Cancelled, He2rnaError
    from .slide import open_slide

    if "slide" not in samples.columns:
        raise DataError("The sample sheet has no 'slide' column: features cannot be found for the samples.")
    bb = feat.get_backbone(backbone, device=device)
    means, sts, failed = {}, {}, {}
    ids = [str(s) for s in samples.index]
    for i, sid in enumerate(ids):
        check_cancel(cancel)
        slide_path = samples.loc[sid, "slide"]
        if not isinstance(slide_path, str) or not Path(slide_path).is_file():
            failed[sid] = f"slide file not found: {slide_path}"
        else:
            try:
                with open_slide(slide_path) as slide:
                    grid, tiles = feat.load_or_extract(
                        slide, bb, tile_um=tile_um, cache_dir=cache_dir, device=device,
                        supertile_k=supertile_k, cancel=cancel,
                    )  # fmt: skip
                    means[sid] = np.asarray(tiles, np.float64).mean(axis=0)
                    try:
                        st, _ = feat.read_supertiles(feat.cache_path(slide, bb, tile_um, cache_dir))
                    except Exception:  # noqa: BLE001 - an old store without supertiles: compute them
                        st, _ = feat.supertiles(grid, tiles, k=supertile_k)
                    sts[sid] = np.asarray(st, np.float32)
            except Cancelled:
                raise
            except He2rnaError as exc:
                failed[sid] = str(exc)
        report(progress, i + 1, len(ids), sid)
    mean = pd.DataFrame.from_dict(means, orient="index").astype(np.float32)
    mean.index.name = "sample_id"
    return SlideFeatures(mean, sts, failed)
