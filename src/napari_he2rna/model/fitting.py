"""Train, save and evaluate a model on a cohort: the steps ``he2rna train``, ``he2rna evaluate`` and the demo
model share, so that what the README reports is what a user's command does.

* :func:`fit` trains HE2RNA (:func:`napari_he2rna.model.training.cross_validate`) or the linear baseline
  (:func:`napari_he2rna.model.baseline.ridge_cross_validate`) on patient-grouped folds.
* :func:`save_result` writes the fold ensemble as one bundle with what inference needs to know about the
  training data: the fold scalers, the out-of-fold R, the distribution of the training features and the
  range of the training targets (:mod:`napari_he2rna.model.ood`).
* :func:`evaluate_result` tests the out-of-fold predictions against the untrained architecture and, beside
  them, the baseline trained on the same folds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..cohorts.cohort import Cohort, all_tiles
from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel
from .training import CVResult, TrainConfig

MODEL_TYPES = ("he2rna", "ridge")


def fit(
    cohort: Cohort,
    model_type: str = "he2rna",
    config: TrainConfig | None = None,
    folds: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    initial_models: Sequence[Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> CVResult:
    """Cross-validated training of ``model_type`` (``"he2rna"`` or ``"ridge"``) on ``cohort``.

    ``config`` gives the folds, the seed and (for HE2RNA) every training setting; the ridge baseline uses its
    fold count and seed, so both see the same folds.
    """
    from .baseline import RidgeConfig, ridge_cross_validate
    from .training import cross_validate

    config = config or TrainConfig()
    if model_type == "he2rna":
        return cross_validate(
            cohort,
            config,
            progress=progress,
            cancel=cancel,
            checkpoint_dir=checkpoint_dir,
            initial_models=initial_models,
            folds=folds,
            log=log,
        )
    if model_type == "ridge":
        if initial_models is not None:
            raise DataError("The ridge baseline cannot be fine-tuned from a model; train it from scratch.")
        rc = RidgeConfig(n_folds=config.n_folds, seed=config.seed, mode=config.mode)
        return ridge_cross_validate(cohort, rc, folds=folds, progress=progress, cancel=cancel)
    raise DataError(f"Unknown model type {model_type!r}; use {' or '.join(MODEL_TYPES)}.")


def training_data_metadata(cohort: Cohort, cancel: CancelToken | None = None) -> dict[str, Any]:
    """What a bundle records about its training data for the out-of-distribution check at inference: the
    distribution of every training tile's features and the range of each target."""
    from . import ood

    builder = ood.ReferenceBuilder()
    for sid in cohort.sample_ids:
        check_cancel(cancel)
        builder.add(all_tiles(cohort.features, sid))
    return {ood.REFERENCE_KEY: builder.finish(), ood.TARGET_RANGE_KEY: ood.target_range(cohort.expression)}


def save_result(
    result: CVResult,
    cohort: Cohort,
    out: str | Path,
    backbone: str,
    tile_um: float,
    extra: Mapping[str, Any] | None = None,
    demo: bool = False,
    cancel: CancelToken | None = None,
) -> Path:
    """Write ``result`` as one ``.safetensors`` bundle (see
    :func:`napari_he2rna.model.bundle.save_bundle`)."""
    from .bundle import save_bundle
    from .training import bundle_metadata

    meta = bundle_metadata(result, cohort, extra)
    meta.update(training_data_metadata(cohort, cancel))
    ks = result.config.k_list if isinstance(result.config, TrainConfig) else (1,)
    dim = result.models[0].input_dim
    return save_bundle(
        out,
        result.models,
        cohort.genes,
        backbone,
        dim,
        tile_um,
        ks,
        meta,
        demo=demo,
        aggregation=result.aggregation,
    )


def null_predictions(
    cohort: Cohort,
    config: TrainConfig,
    n_inits: int,
    seed: int = 12345,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """The untrained HE2RNA of ``config``'s architecture on the cohort (the null both models are tested
    against); ``(n_inits, n_samples, n_genes)``."""
    from .training import untrained_predictions

    return untrained_predictions(
        cohort,
        config.hidden,
        n_inits,
        config.k_list,
        config.dropout,
        seed=seed,
        device=config.device,
        cancel=cancel,
        standardize=config.standardize,
    )


def evaluate_result(
    cohort: Cohort,
    oof,
    folds: np.ndarray,
    null: np.ndarray,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    n_random_sets: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
):
    """:func:`napari_he2rna.model.evaluation.evaluate` of out-of-fold predictions on the cohort's cancer
    types."""
    from .evaluation import evaluate

    types = cohort.samples.loc[cohort.sample_ids, "cancer_type"].astype(str).to_numpy()
    return evaluate(
        cohort.expression,
        oof,
        types,
        folds,
        null,
        alpha=alpha,
        gene_sets=gene_sets,
        n_random_sets=n_random_sets,
        seed=seed,
    )
