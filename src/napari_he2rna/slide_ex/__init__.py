"""SLIDE-EX: cell-type-specific expression and cell-type abundance from slide features, nested CV.

Re-implemented from the description of SLIDE-EX (Wang, Dhruba, ... Ruppin, bioRxiv 2025, "Deep learning
inference of cell type-specific gene expression from breast tumor histopathology"): bulk expression is first
deconvolved (CODEFACS or any other tool; an *input* here) into a samples x genes table per cell type and a
samples x cell types table of abundances. From the slide's tile features this module then trains

1. one regressor per cell type for that cell type's genes,
2. one regressor for the cell-type abundances,
3. a direct classifier of (chemotherapy) responders, the baseline SLIDE-EX compares against,

each with **nested cross-validation**: outer folds (patients grouped, cancer types and labels spread) only
measure performance; inside each outer training set, inner folds (patients grouped) choose the
hyper-parameters (hidden width x number of epochs); the outer fold's model is then retrained on its whole
outer training set with that choice and predicts the outer test fold, which nothing before it has touched
(not the feature standardisation, not the output bias, not the epoch count).

The regressor is this package's HE2RNA (a per-tile MLP with top-k aggregation, trained by
:func:`napari_he2rna.model.training.train_one`: Adam, minibatches of slides, one k per batch, mean squared
error),
on standardised supertile features. The classifier is the same network with one output trained on the 0/1
label with the same squared loss (a Brier-score fit: its slide score estimates P(responder)).

Outputs are model bundles like any other: the outer fold models of a cell type in one ``.safetensors``
file whose genes are named ``"<cell type> <gene>"`` (e.g. ``"fibroblast COL1A1"``), so ``he2rna
spatialize`` and the napari Model widget paint per-tile scores of a cell type's gene like any gene. Folds may
have chosen different widths: a narrower network is zero-padded to the widest one, which leaves its outputs
exactly unchanged (a padded unit has zero weights in and out). The standardisation of each fold is folded into
its first layer, so a bundle takes raw features.

Significance of a gene (per cell type and cancer type) follows :mod:`napari_he2rna.model.evaluation`: Pearson
R on
the outer test folds (within each fold, averaged over folds) against the R of the same fold architecture
untrained on the same test samples (pooled over genes and random inits), one-sided empirical p,
Holm–Šidák and Benjamini–Hochberg over the genes of that cell type. The responder classifier reports the
ROC AUC over patients (a patient's score is the mean over its samples) on the outer test folds, with a
one-sided Mann–Whitney p (AUC > 0.5).

The package: :mod:`.targets` (reading the deconvolved targets and responders), :mod:`.nested_cv` (the nested
cross-validation), :mod:`.experiment` (a whole run and its evaluation), :mod:`.bundles` (outer fold models as
bundles), :mod:`.report` (the output folder).
"""

from __future__ import annotations

from ..model.folds import patient_auc
from .bundles import bundle_models, pad_hidden, save_result_bundle
from .experiment import (
    SlideExResult,
    evaluate_classifier,
    evaluate_regression,
    run_slide_ex,
    untrained_null,
)
from .nested_cv import NestedCVConfig, NestedCVResult, OuterFold, nested_cross_validate, outer_folds
from .report import write_slide_ex
from .targets import (
    ABUNDANCE,
    RESPONDER,
    TABLE_SUFFIXES,
    DeconvolvedTargets,
    abundance_name,
    load_deconvolved,
    read_abundance,
    read_celltype_expression,
    read_responders,
    target_name,
)

__all__ = [
    "ABUNDANCE",
    "RESPONDER",
    "TABLE_SUFFIXES",
    "DeconvolvedTargets",
    "NestedCVConfig",
    "NestedCVResult",
    "OuterFold",
    "SlideExResult",
    "abundance_name",
    "bundle_models",
    "evaluate_classifier",
    "evaluate_regression",
    "load_deconvolved",
    "nested_cross_validate",
    "outer_folds",
    "pad_hidden",
    "patient_auc",
    "read_abundance",
    "read_celltype_expression",
    "read_responders",
    "run_slide_ex",
    "save_result_bundle",
    "target_name",
    "untrained_null",
    "write_slide_ex",
]
