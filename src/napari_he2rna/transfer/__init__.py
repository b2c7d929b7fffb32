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

The package: :mod:`.networks` (the networks, their training, the representation), :mod:`.labels` (labels,
patients, folds), :mod:`.experiment` (the A/B experiment), :mod:`.report` (figure, summary, result folder),
:mod:`.files` (representation model and feature tables), :mod:`.params` (the experiment's ratios and
methods).

The names below are imported on first use (PEP 562): ``he2rna --help`` reads :mod:`.params` without importing
torch (2-3 s).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute). Written out rather than with lazy_loader.attach, which only attaches the
# package's own submodules: two names come from sibling modules.
_EXPORTS: dict[str, tuple[str, str]] = {
    "pearson_per_gene": ("..model.evaluation", "pearson_columns"),  # the package's one per-gene Pearson R
    "patient_auc": ("..model.folds", "patient_auc"),
    "AUC_COLUMNS": (".experiment", "AUC_COLUMNS"),
    "TEST_COLUMNS": (".experiment", "TEST_COLUMNS"),
    "TransferConfig": (".experiment", "TransferConfig"),
    "TransferResult": (".experiment", "TransferResult"),
    "parse_ratio": (".experiment", "parse_ratio"),
    "run_transfer_experiment": (".experiment", "run_transfer_experiment"),
    "wilcoxon_tests": (".experiment", "wilcoxon_tests"),
    "DEFAULT_RATIOS": (".params", "DEFAULT_RATIOS"),
    "METHODS": (".params", "METHODS"),
    "REPRESENTATION_FORMAT": (".files", "REPRESENTATION_FORMAT"),
    "SlideFeatures": (".files", "SlideFeatures"),
    "load_representation_model": (".files", "load_representation_model"),
    "load_slide_features": (".files", "load_slide_features"),
    "read_feature_table": (".files", "read_feature_table"),
    "representation_frame": (".files", "representation_frame"),
    "save_representation_model": (".files", "save_representation_model"),
    "write_representation": (".files", "write_representation"),
    "binary_labels": (".labels", "binary_labels"),
    "group_folds": (".labels", "group_folds"),
    "patient_labels": (".labels", "patient_labels"),
    "Autoencoder": (".networks", "Autoencoder"),
    "MLPClassifier": (".networks", "MLPClassifier"),
    "SimpleHE2RNA": (".networks", "SimpleHE2RNA"),
    "Standardize": (".networks", "Standardize"),
    "check_matrix": (".networks", "check_matrix"),
    "encode": (".networks", "encode"),
    "oof_predictions": (".networks", "oof_predictions"),
    "predict_proba": (".networks", "predict_proba"),
    "represent": (".networks", "represent"),
    "train_autoencoder": (".networks", "train_autoencoder"),
    "train_classifier": (".networks", "train_classifier"),
    "train_representation": (".networks", "train_representation"),
    "train_simple_he2rna": (".networks", "train_simple_he2rna"),
    "load_transfer_results": (".report", "load_transfer_results"),
    "plot_transfer": (".report", "plot_transfer"),
    "summary_markdown": (".report", "summary_markdown"),
    "write_transfer_results": (".report", "write_transfer_results"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
