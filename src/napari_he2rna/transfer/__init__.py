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
:mod:`.files` (representation model and feature tables).
"""

from __future__ import annotations

from ..evaluation import pearson_columns as pearson_per_gene  # the package's one per-gene Pearson R
from ..folds import patient_auc
from .experiment import (
    AUC_COLUMNS,
    DEFAULT_RATIOS,
    METHODS,
    TEST_COLUMNS,
    TransferConfig,
    TransferResult,
    parse_ratio,
    run_transfer_experiment,
    wilcoxon_tests,
)
from .files import (
    REPRESENTATION_FORMAT,
    SlideFeatures,
    load_representation_model,
    load_slide_features,
    read_feature_table,
    representation_frame,
    save_representation_model,
    write_representation,
)
from .labels import binary_labels, group_folds, patient_labels
from .networks import (
    Autoencoder,
    MLPClassifier,
    SimpleHE2RNA,
    Standardize,
    check_matrix,
    encode,
    oof_predictions,
    predict_proba,
    represent,
    train_autoencoder,
    train_classifier,
    train_representation,
    train_simple_he2rna,
)
from .report import load_transfer_results, plot_transfer, summary_markdown, write_transfer_results

__all__ = [
    "AUC_COLUMNS",
    "DEFAULT_RATIOS",
    "METHODS",
    "REPRESENTATION_FORMAT",
    "TEST_COLUMNS",
    "Autoencoder",
    "MLPClassifier",
    "SimpleHE2RNA",
    "SlideFeatures",
    "Standardize",
    "TransferConfig",
    "TransferResult",
    "binary_labels",
    "check_matrix",
    "encode",
    "group_folds",
    "load_representation_model",
    "load_slide_features",
    "load_transfer_results",
    "oof_predictions",
    "parse_ratio",
    "patient_auc",
    "patient_labels",
    "pearson_per_gene",
    "plot_transfer",
    "predict_proba",
    "read_feature_table",
    "represent",
    "representation_frame",
    "run_transfer_experiment",
    "save_representation_model",
    "summary_markdown",
    "train_autoencoder",
    "train_classifier",
    "train_representation",
    "train_simple_he2rna",
    "wilcoxon_tests",
    "write_representation",
    "write_transfer_results",
]
