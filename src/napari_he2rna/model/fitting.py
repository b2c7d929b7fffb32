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
from .aggregation import Supertiles
from .blend import LINEAR_WEIGHT
from .training import CVResult, TrainConfig

MODEL_TYPES = ("ensemble", "he2rna", "ridge")


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
    linear_weight: float = LINEAR_WEIGHT,
) -> CVResult:
    """Cross-validated training of ``model_type`` (``"ensemble"``, ``"he2rna"`` or ``"ridge"``) on ``cohort``.

    ``config`` gives the folds, the seed and (for HE2RNA) every training setting; the ridge baseline uses its
    fold count and seed, so both see the same folds. ``"ensemble"`` (``he2rna train``'s default) trains both
    on the same folds and averages them tile by tile (:mod:`napari_he2rna.model.blend`); its ``comparison``
    (:class:`~napari_he2rna.model.gene_comparison.GeneComparison`) holds every gene's R for the three models;
    ``linear_weight`` is the linear model's share of each tile score (default 0.5). With ``config.anchor``
    > 0 HE2RNA's tile scores are held near the linear baseline's during training (trained first, on the same
    folds; :func:`napari_he2rna.model.training.train_one`).
    """
    from .baseline import RidgeConfig, ridge_cross_validate
    from .folds import cv_folds
    from .training import cross_validate

    config = config or TrainConfig()
    if model_type in ("ensemble", "he2rna"):
        lin = None
        if model_type == "ensemble" or config.anchor > 0:  # the linear baseline first, on the same folds
            if folds is None:
                ids = cohort.sample_ids
                folds = cv_folds(cohort.samples.loc[ids], config.n_folds, config.seed)
            if log is not None:  # it reads every slide's features once, before HE2RNA's first epoch
                why = "HE2RNA is held near its map" if config.anchor > 0 else "for the ensemble"
                log(f"the linear baseline (ridge per gene) first, on the same folds ({why})")
            lin = fit(cohort, "ridge", config, folds=folds, cancel=cancel)
        mlp = cross_validate(
            cohort,
            config,
            progress=progress,
            cancel=cancel,
            checkpoint_dir=checkpoint_dir,
            initial_models=initial_models,
            folds=folds,
            log=log,
            anchor_models=lin.models if config.anchor > 0 else None,
        )
        if model_type == "ensemble":
            return ensemble_result(cohort, mlp, lin, log, linear_weight)
        return mlp
    if model_type == "ridge":
        if initial_models is not None:
            raise DataError("The ridge baseline cannot be fine-tuned from a model; train it from scratch.")
        rc = RidgeConfig(n_folds=config.n_folds, seed=config.seed, mode=config.mode)
        return ridge_cross_validate(cohort, rc, folds=folds, progress=progress, cancel=cancel)
    raise DataError(f"Unknown model type {model_type!r}; use {' or '.join(MODEL_TYPES)}.")


def ensemble_result(
    cohort: Cohort,
    mlp: CVResult,
    lin: CVResult,
    log: Callable[[str], None] | None = None,
    linear_weight: float = LINEAR_WEIGHT,
) -> CVResult:
    """The ensemble of a HE2RNA and a ridge cross-validation on the same folds: each fold's
    :class:`~napari_he2rna.model.blend.Blend`, its held-out samples predicted with HE2RNA's aggregation."""
    from dataclasses import replace

    import pandas as pd
    import torch

    from .blend import Blend
    from .cohort_prediction import SlideBatches, predict_slides
    from .gene_comparison import compare_genes

    ids = cohort.sample_ids
    slides = SlideBatches(cohort.features, ids, keep_in_memory=mlp.config.mode == "supertiles")
    oof = np.full((len(ids), len(cohort.genes)), np.nan, dtype=np.float32)
    for f, (m, lin_f) in enumerate(zip(mlp.models, lin.models, strict=True)):
        idx = np.flatnonzero(mlp.folds == f)
        if len(idx):
            blend = Blend(m, lin_f, linear_weight)
            oof[idx] = predict_slides(
                blend, slides, idx, mlp.config.k_list, torch.device("cpu"), mlp.config.batch
            )
    oof_df = pd.DataFrame(oof, index=pd.Index(ids, name="sample_id"), columns=cohort.genes)
    anchor = float(getattr(mlp.config, "anchor", 0.0) or 0.0)
    comparison = compare_genes(cohort.expression, mlp.oof, lin.oof, oof_df, mlp.cancer_types, anchor)
    if log is not None:
        log(comparison.headline())
    return replace(
        mlp,
        oof=oof_df,
        model_type="ensemble",
        linear_models=lin.models,
        linear_weight=float(linear_weight),
        comparison=comparison,
    )


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
        # trained on supertiles: a new slide is predicted from its supertiles, made as the cohort's were
        supertiles=(
            Supertiles()
            if result.aggregation == "topk" and getattr(result.config, "mode", None) == "supertiles"
            else None
        ),
        **(
            {
                "linear_models": result.linear_models,
                "linear_genes": cohort.genes,
                "linear_weight": result.linear_weight,
            }
            if result.model_type == "ensemble"
            else {}
        ),
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
