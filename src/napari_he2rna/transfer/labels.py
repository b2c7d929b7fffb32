"""Labels and patients of the transfer experiment: 0/1 labels from a label column, one label per patient,
patient-grouped folds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

# --------------------------------------------------------------------------------------- helpers


def group_folds(
    groups: Sequence[str] | np.ndarray,
    n_folds: int,
    seed: int = 0,
    strata: Sequence[Any] | np.ndarray | None = None,
) -> np.ndarray:
    """Fold per sample with every patient (group) in one fold, strata (e.g. labels) spread over the folds.

    scikit-learn's ``StratifiedGroupKFold`` via :mod:`napari_he2rna.model.training` (which falls back to
    dealing
    patients round-robin when a stratum is too small for scikit-learn).
    """
    from ..model.folds import group_folds as grouped

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
