"""Patient-grouped folds: cross-validation, the validation split inside a fold, and what is checked on them.

Every sample of a patient goes to one fold (a patient's slides are never split between training and test),
and cancer types are spread evenly over the folds (scikit-learn's ``StratifiedGroupKFold``). The validation
split used for early stopping is cut the same way from a fold's training patients.

A validation split that is too small for a per-cancer-type Pearson R is the rule, not the exception, on a
small cohort (60 slides, 3 types, 10 % of 48 training samples: one or two per type). :func:`choose_criterion`
says which early-stopping criterion is defined on a given split, so training never runs on an undefined score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

#: A cancer type needs this many validation samples for its own Pearson R to be the early-stopping score.
MIN_VAL_PER_TYPE = 5
#: Below this many validation samples (all types pooled) the validation loss is used instead of R.
MIN_VAL_POOLED = 5
#: The report warns when a fold holds fewer test samples of a cancer type than this.
MIN_FOLD_PER_TYPE = 5
#: Every cancer type needs at least this many samples (per-type R is undefined below 3).
MIN_SAMPLES_PER_TYPE = 3

CRITERIA = ("per-type R", "pooled R", "loss", "none")


def _dealt_folds(strata: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fallback when every stratum has fewer groups than folds (scikit-learn then refuses): the groups of
    each stratum, shuffled, dealt round-robin over the folds, continuing from stratum to stratum."""
    rng = np.random.default_rng(seed)
    group_stratum = pd.Series(strata, index=groups).groupby(level=0).first()
    fold_of: dict[str, int] = {}
    nxt = 0
    for s in sorted(set(group_stratum)):
        members = sorted(group_stratum.index[group_stratum == s])
        for g in rng.permutation(members):
            fold_of[g] = nxt % n_splits
            nxt += 1
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def group_folds(strata: Sequence, groups: Sequence, n_splits: int, seed: int = 0) -> np.ndarray:
    """Fold per sample: every group (patient) in one fold, strata (cancer types, labels) spread evenly.

    Parameters
    ----------
    strata
        ``(n_samples,)`` what to balance over the folds (cancer type, or type + label).
    groups
        ``(n_samples,)`` what must never be split (patient id).
    n_splits
        Number of folds; at most the number of groups.
    seed
        Shuffling seed.

    Returns
    -------
    np.ndarray
        ``(n_samples,)`` int64 fold numbers in ``[0, n_splits)``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    strata = np.asarray(strata).astype(str)
    groups = np.asarray(groups).astype(str)
    n_groups = len(set(groups.tolist()))
    if n_splits < 2:
        raise DataError("Cross-validation needs at least 2 folds.")
    if n_groups < n_splits:
        raise DataError(
            f"{n_groups} patients cannot fill {n_splits} folds; "
            f"use at most {n_groups} folds or more patients."
        )
    folds = np.full(len(strata), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=int(n_splits), shuffle=True, random_state=int(seed))
    try:
        with warnings.catch_warnings():
            # A stratum with fewer groups than folds cannot be in every fold: that is fine.
            warnings.simplefilter("ignore", UserWarning)
            for f, (_, test) in enumerate(splitter.split(np.zeros(len(strata)), strata, groups)):
                folds[test] = f
    except ValueError:  # every stratum has fewer groups than folds: tiny cohorts
        return _dealt_folds(strata, groups, int(n_splits), int(seed))
    return folds


def check_cohort_size(samples: pd.DataFrame, n_folds: int) -> None:
    """Refuse, in one sentence with the numbers, a cohort too small for ``n_folds`` patient-grouped folds.

    Parameters
    ----------
    samples
        Sample sheet with ``patient_id`` and ``cancer_type``.
    n_folds
        Cross-validation folds asked for.

    Raises
    ------
    DataError
        Fewer patients than folds, fewer than 2 folds, or a cancer type with fewer than
        :data:`MIN_SAMPLES_PER_TYPE` samples (its R could never be computed).
    """
    n_patients = samples["patient_id"].astype(str).nunique()
    if n_folds < 2:
        raise DataError("Cross-validation needs at least 2 folds.")
    if n_patients < n_folds:
        raise DataError(
            f"The cohort has {n_patients} patients, too few for {n_folds} folds; "
            f"use --folds {max(2, n_patients)} "
            "or add patients."
        )
    counts = samples["cancer_type"].astype(str).value_counts()
    small = counts[counts < MIN_SAMPLES_PER_TYPE]
    if len(small):
        shown = ", ".join(f"{t} ({n} sample{'s' if n > 1 else ''})" for t, n in small.items())
        raise DataError(
            f"Cancer type {shown} has fewer than {MIN_SAMPLES_PER_TYPE} samples, so its R can never be "
            "computed; remove it from the sample sheet or merge it with another type."
        )
    # Each training part must keep at least 2 patients (one to train on, one more to validate or test).
    if n_patients - int(np.ceil(n_patients / n_folds)) < 2:
        raise DataError(
            f"With {n_patients} patients and {n_folds} folds a training part has fewer than 2 patients; "
            "use fewer folds or more patients."
        )


def cv_folds(samples: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per sample: all samples of a patient in one fold, cancer types spread over folds.

    Parameters
    ----------
    samples
        Sample sheet with ``patient_id`` and ``cancer_type`` (one row per sample).

    Returns
    -------
    np.ndarray
        ``(n_samples,)`` int fold numbers in ``[0, n_folds)``.
    """
    check_cohort_size(samples, n_folds)
    return group_folds(
        samples["cancer_type"].astype(str).to_numpy(),
        samples["patient_id"].astype(str).to_numpy(),
        n_folds,
        seed,
    )


def validation_split(samples: pd.DataFrame, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Validation samples (bool mask): about ``fraction`` of the patients, patient-grouped, type-stratified.

    ``fraction <= 0`` gives no validation samples. A split that would leave no patient to train on is
    refused with a :class:`DataError`.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"The validation fraction must be in [0, 1), not {fraction}.")
    n = len(samples)
    if fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    groups = samples["patient_id"].astype(str).to_numpy()
    n_patients = len(set(groups.tolist()))
    if n_patients < 2:
        raise DataError(
            f"A validation fraction of {fraction:g} needs at least 2 training patients per fold, "
            f"a fold has {n_patients}; use --val-fraction 0 or fewer folds."
        )
    n_splits = min(max(2, int(round(1.0 / fraction))), n_patients)
    folds = group_folds(samples["cancer_type"].astype(str).to_numpy(), groups, n_splits, seed)
    return folds == 0


def choose_criterion(val_types: Sequence[str], train_types: Sequence[str] | None = None) -> str:
    """The early-stopping criterion that is defined on this validation split.

    Parameters
    ----------
    val_types
        Cancer type of each validation sample.
    train_types
        Cancer type of each training sample: every type trained on must be validated for the per-type R.

    Returns
    -------
    str
        ``"per-type R"`` when every type has at least :data:`MIN_VAL_PER_TYPE` validation samples (the
        paper's criterion), ``"pooled R"`` when there are at least :data:`MIN_VAL_POOLED` validation
        samples in all, ``"loss"`` (validation mean squared error) with fewer, ``"none"`` without any.
    """
    val = pd.Series(np.asarray(val_types).astype(str))
    if len(val) == 0:
        return "none"
    counts = val.value_counts()
    types = (
        set(np.asarray(train_types).astype(str).tolist()) if train_types is not None else set(counts.index)
    )
    if all(counts.get(t, 0) >= MIN_VAL_PER_TYPE for t in types | set(counts.index)):
        return "per-type R"
    if len(val) >= MIN_VAL_POOLED:
        return "pooled R"
    return "loss"


def small_fold_types(
    types: Sequence[str], folds: Sequence[int], minimum: int = MIN_FOLD_PER_TYPE
) -> pd.DataFrame:
    """The (fold, cancer type) pairs holding fewer than ``minimum`` test samples (fold R is noise there).

    Returns
    -------
    pd.DataFrame
        Columns ``fold``, ``cancer_type``, ``n``; empty when every fold holds enough of every type.
    """
    df = pd.DataFrame({"fold": np.asarray(folds), "cancer_type": np.asarray(types).astype(str)})
    counts = df.groupby(["fold", "cancer_type"]).size().unstack(fill_value=0).stack()
    counts = counts.rename("n").reset_index()
    return counts[counts["n"] < minimum].reset_index(drop=True)


def patient_auc(scores: Sequence[float], labels: Sequence[float], patients: Sequence) -> float:
    """ROC AUC over patients, each patient's score the mean over its samples (NaN with one class only)."""
    from sklearn.metrics import roc_auc_score

    df = pd.DataFrame({"s": np.asarray(scores, float), "y": np.asarray(labels, float), "p": list(patients)})
    per = df.groupby("p", sort=True).agg(s=("s", "mean"), y=("y", "max"))
    if per["y"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(per["y"].to_numpy(), per["s"].to_numpy()))
