"""The hospital A/B transfer experiment (MSI): does a transcriptomic representation learnt at A help B?

See :func:`run_transfer_experiment` and the package docstring of :mod:`napari_he2rna.transfer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..model.folds import patient_auc
from .labels import group_folds
from .networks import (
    check_matrix,
    encode,
    predict_proba,
    represent,
    train_autoencoder,
    train_classifier,
    train_simple_he2rna,
)
from .params import DEFAULT_RATIOS, METHODS

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
    x = check_matrix(np.asarray(features_mean, dtype=np.float32), what="mean features")
    yexp = check_matrix(np.asarray(expression, dtype=np.float32), len(x), "expression values")
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
