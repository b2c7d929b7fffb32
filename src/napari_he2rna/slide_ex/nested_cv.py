"""Nested cross-validation of HE2RNA on slide features (SLIDE-EX): outer folds measure, inner folds choose
the width and the number of epochs; nothing of an outer test fold reaches training or the choice."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from ..features.devices import resolve_device
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..model.cohort_prediction import SlideBatches, predict_slides
from ..model.evaluation import mean_r_by_type, pearson_columns
from ..model.folds import group_folds, patient_auc
from ..model.network import HE2RNA, SUPERTILE_KS
from ..model.scaling import FeatureScaler, ScaledFeatures
from ..model.training import TrainConfig, train_one

# ------------------------------------------------------------------------------------------ nested CV


@dataclass
class NestedCVConfig:
    """Settings of the nested cross-validation.

    The inner grid is ``widths x epochs``: a network of ``layers`` hidden layers of one width, trained for a
    number of epochs (the inner folds score every epoch count of the grid from one run of ``max(epochs)``).
    """

    outer_folds: int = 5
    inner_folds: int = 3
    widths: tuple[int, ...] = (16, 64)
    layers: int = 2
    epochs: tuple[int, ...] = (10, 30, 60)
    dropout: float = 0.25
    lr: float = 3e-3
    batch_size: int = 16
    ks: tuple[int, ...] = SUPERTILE_KS
    null_inits: int = 100
    alpha: float = 0.05
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.widths = tuple(sorted({int(w) for w in self.widths}))
        self.epochs = tuple(sorted({int(e) for e in self.epochs}))
        self.ks = tuple(int(k) for k in self.ks)
        if not self.widths or min(self.widths) < 1 or int(self.layers) < 1:
            raise DataError("The hidden widths and the number of layers must be positive.")
        if not self.epochs or min(self.epochs) < 1:
            raise DataError("The epoch grid must hold positive epoch counts.")
        if int(self.outer_folds) < 2 or int(self.inner_folds) < 2:
            raise DataError("Nested cross-validation needs at least 2 outer and 2 inner folds.")
        self.layers = int(self.layers)

    def hidden(self, width: int) -> tuple[int, ...]:
        return (int(width),) * self.layers

    def train_config(self, width: int, epochs: int) -> TrainConfig:
        return TrainConfig(
            mode="supertiles",
            hidden=self.hidden(width),
            dropout=self.dropout,
            lr=self.lr,
            batch_size=self.batch_size,
            max_epochs=int(epochs),
            patience=int(epochs),
            ks=self.ks,
            val_fraction=0.0,
            n_folds=self.outer_folds,
            seed=self.seed,
            device=self.device,
        )


@dataclass
class OuterFold:
    """What one outer fold did: its samples, inner splits, the inner scores and the choice made."""

    fold: int
    train_ids: list[str]
    test_ids: list[str]
    inner_splits: list[tuple[list[str], list[str]]]  # (inner training ids, inner validation ids)
    inner_scores: pd.DataFrame  # width, epochs, score (mean over inner folds), score_fold<j>
    width: int
    epochs: int
    inner_score: float
    feature_mean: np.ndarray
    feature_std: np.ndarray
    history: dict = field(default_factory=dict)


@dataclass
class NestedCVResult:
    """Outer-fold models and the predictions of each sample by the model of the fold that held it out."""

    task: str  # "regression" or "classification"
    names: list[str]
    sample_ids: list[str]
    folds: np.ndarray  # outer fold per sample
    oof: pd.DataFrame  # outer test predictions, samples x names
    models: list[HE2RNA]  # one per outer fold, on standardised features (see OuterFold.feature_mean/std)
    outer: list[OuterFold]
    config: NestedCVConfig

    def choices(self) -> list[dict[str, Any]]:
        return [
            {"fold": o.fold, "width": o.width, "epochs": o.epochs, "inner_score": o.inner_score}
            for o in self.outer
        ]


def outer_folds(
    samples: pd.DataFrame, n_folds: int, seed: int = 0, labels: pd.Series | None = None
) -> np.ndarray:
    """Outer fold per sample: each patient in one fold; cancer types (and labels, if given) spread.

    Parameters
    ----------
    samples
        Sample sheet (index sample ids) with ``patient_id`` and ``cancer_type``.
    labels
        Optional 0/1 label per sample (samples without one are stratified by cancer type only).
    """
    groups = samples["patient_id"].astype(str).to_numpy()
    n_patients = len(set(groups.tolist()))
    if n_patients < n_folds:
        raise DataError(
            f"{n_patients} patients cannot fill {n_folds} outer folds; use fewer folds or more patients."
        )
    strata = samples["cancer_type"].astype(str).to_numpy().astype(object)
    if labels is not None:
        lab = labels.reindex(samples.index)
        strata = np.array(
            [f"{t}|{'' if pd.isna(v) else int(v)}" for t, v in zip(strata, lab.to_numpy(), strict=True)]
        )
    return group_folds(strata.astype(str), groups, int(n_folds), int(seed))


def _check_grouped(folds: np.ndarray, groups: np.ndarray, what: str) -> None:
    per = pd.Series(folds).groupby(pd.Series(groups)).nunique()
    if (per > 1).any():
        raise DataError(f"{what}: patient {per.index[per > 1][0]} is split across folds.")


def _score(task: str, y: np.ndarray, pred: np.ndarray, types: np.ndarray, patients: np.ndarray) -> float:
    """Inner selection criterion: mean per-type, per-output R (regression) or patient AUC (classification)."""
    if task == "classification":
        auc = patient_auc(pred[:, 0], y[:, 0], patients)
        return 0.5 if not np.isfinite(auc) else auc
    r = mean_r_by_type(y, pred, types)
    if not np.isfinite(r):  # no cancer type with 3 samples: R over all of them
        r = float(np.nan_to_num(pearson_columns(y, pred), nan=0.0).mean())
    return r


def _fit(
    slides: SlideBatches,
    y: np.ndarray,
    types: np.ndarray,
    train_idx: np.ndarray,
    config: NestedCVConfig,
    width: int,
    epochs: int,
    seed: Sequence[int],
    device: torch.device,
    after_epoch: Callable[[HE2RNA, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> tuple[HE2RNA, dict]:
    """Train one HE2RNA on ``train_idx`` for exactly ``epochs`` epochs: no early stopping, nothing held out.

    ``after_epoch(model, n_epochs_done)`` runs after every epoch (the inner folds score the model there).
    """
    dim = slides.get(int(train_idx[0])).shape[1]
    with torch.random.fork_rng(devices=[]):  # reproducible init and dropout, global RNG untouched
        torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        model = HE2RNA(
            dim, y.shape[1], config.hidden(width), config.dropout, output_bias=y[train_idx].mean(axis=0)
        ).to(device)
        callback = None
        if after_epoch is not None:

            def callback(epoch: int, _info: dict) -> None:
                after_epoch(model, epoch + 1)

        history = train_one(
            model,
            slides,
            y,
            types,
            np.asarray(train_idx, dtype=np.int64),
            np.zeros(0, dtype=np.int64),  # no validation split: the epoch count is the inner folds' choice
            config.train_config(width, epochs),
            device,
            np.random.default_rng(list(seed)),
            callback,
            cancel,
        )
    return model, history


def nested_cross_validate(
    features: Mapping[str, np.ndarray],
    targets: pd.DataFrame,
    samples: pd.DataFrame,
    config: NestedCVConfig | None = None,
    task: str = "regression",
    folds: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> NestedCVResult:
    """Nested cross-validation of HE2RNA on slide features.

    For each outer fold: the features are standardised with the outer training samples only; inner folds
    (patients grouped) split the outer training samples; for every width of the grid a network is trained on
    each inner training split for ``max(epochs)`` epochs and scored on its inner validation split after every
    epoch count of the grid; the (width, epochs) with the best mean inner score is retrained on the whole
    outer training set, and only that model predicts the outer test fold.

    Parameters
    ----------
    features
        ``sample_id -> (n_tiles, dim)`` (supertiles), for every sample of ``targets``.
    targets
        Samples x outputs (index sample ids): log expression, abundances, or one 0/1 column (classification).
    samples
        Sample sheet (index sample ids) with ``patient_id`` and ``cancer_type``.
    config
        :class:`NestedCVConfig`.
    task
        ``"regression"`` (inner score: mean per-cancer-type Pearson R over the outputs) or
        ``"classification"`` (inner score: patient-level ROC AUC).
    folds
        Outer fold per sample of ``targets`` (default :func:`outer_folds`); must keep patients whole.
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress counts trained networks.

    Returns
    -------
    NestedCVResult
    """
    config = config or NestedCVConfig()
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', not {task!r}")
    ids = [str(s) for s in targets.index]
    missing = [s for s in ids if s not in samples.index]
    if missing:
        raise DataError(f"{len(missing)} samples have no row in the sample sheet (e.g. {missing[:3]}).")
    no_features = [s for s in ids if s not in features]
    if no_features:
        raise DataError(f"{len(no_features)} samples have no features (e.g. {no_features[:3]}).")
    sheet = samples.loc[ids]
    y = targets.to_numpy(np.float32)
    if not np.isfinite(y).all():
        raise DataError("The targets contain NaN or infinite values.")
    types = sheet["cancer_type"].astype(str).to_numpy()
    groups = sheet["patient_id"].astype(str).to_numpy()
    if task == "classification":
        if y.shape[1] != 1 or not np.isin(y, (0.0, 1.0)).all():
            raise DataError("The classifier takes one 0/1 label column.")
        strata = np.array([f"{t}|{int(v)}" for t, v in zip(types, y[:, 0], strict=True)])
    else:
        strata = types
    if folds is None:
        labels = pd.Series(y[:, 0], index=ids) if task == "classification" else None
        folds = outer_folds(sheet, config.outer_folds, config.seed, labels)
    folds = np.asarray(folds, dtype=np.int64)
    if folds.shape != (len(ids),):
        raise DataError(f"{len(folds)} outer folds were given for {len(ids)} samples.")
    _check_grouped(folds, groups, "outer folds")
    n_outer = int(folds.max()) + 1
    device = resolve_device(config.device)

    oof = np.full(y.shape, np.nan, dtype=np.float32)
    models: list[HE2RNA] = []
    records: list[OuterFold] = []
    total = n_outer * (len(config.widths) * config.inner_folds + 1)
    done = 0
    grid = set(config.epochs)
    for f in range(n_outer):
        check_cancel(cancel)
        test_idx = np.flatnonzero(folds == f)
        train_idx = np.flatnonzero(folds != f)
        if len(test_idx) == 0:
            raise DataError(f"Outer fold {f} holds no sample.")
        train_ids = [ids[i] for i in train_idx]
        # Standardisation from the outer training samples only; applied to every sample when read.
        scaler = FeatureScaler.fit_samples(features, train_ids)
        slides = SlideBatches(ScaledFeatures(features, scaler), ids, keep_in_memory=True)
        n_train_patients = len(set(groups[train_idx].tolist()))
        if n_train_patients < config.inner_folds:
            raise DataError(
                f"Outer fold {f} leaves {n_train_patients} training patients for {config.inner_folds} "
                "inner folds; use fewer folds or more patients."
            )
        inner = group_folds(strata[train_idx], groups[train_idx], config.inner_folds, config.seed + 1000 + f)
        _check_grouped(inner, groups[train_idx], "inner folds")
        splits: list[tuple[list[str], list[str]]] = []
        scores: dict[tuple[int, int], list[float]] = {}
        for j in range(config.inner_folds):
            itrain, ival = train_idx[inner != j], train_idx[inner == j]
            splits.append(([ids[i] for i in itrain], [ids[i] for i in ival]))
            for w in config.widths:

                def score_epoch(
                    model: HE2RNA, n_epochs: int, w=w, ival=ival, slides=slides, scores=scores
                ) -> None:
                    if n_epochs in grid:
                        pv = predict_slides(model, slides, ival, config.ks, device, config.batch_size)
                        s = _score(task, y[ival], pv, types[ival], groups[ival])
                        scores.setdefault((w, n_epochs), []).append(s)

                _fit(
                    slides,
                    y,
                    types,
                    itrain,
                    config,
                    w,
                    max(grid),
                    (config.seed, f, j, w),
                    device,
                    score_epoch,
                    cancel,
                )
                done += 1
                report(progress, done, total, f"outer fold {f + 1}/{n_outer}: inner fold {j + 1}, width {w}")
        table = pd.DataFrame(
            [
                {"width": w, "epochs": e, "score": float(np.mean(v))}
                | {f"score_inner{j}": s for j, s in enumerate(v)}
                for (w, e), v in sorted(scores.items())
            ]
        )
        # Best mean inner score; ties go to the smaller network and the fewer epochs.
        best = table.sort_values(["score", "width", "epochs"], ascending=[False, True, True]).iloc[0]
        width, epochs = int(best["width"]), int(best["epochs"])
        model, history = _fit(
            slides, y, types, train_idx, config, width, epochs, (config.seed, f), device, None, cancel
        )
        oof[test_idx] = predict_slides(model, slides, test_idx, config.ks, device, config.batch_size)
        done += 1
        report(progress, done, total, f"outer fold {f + 1}/{n_outer}: width {width}, {epochs} epochs")
        models.append(model.cpu().eval())
        records.append(
            OuterFold(
                fold=f,
                train_ids=train_ids,
                test_ids=[ids[i] for i in test_idx],
                inner_splits=splits,
                inner_scores=table,
                width=width,
                epochs=epochs,
                inner_score=float(best["score"]),
                feature_mean=scaler.mean,
                feature_std=scaler.std,
                history={"epochs_run": history.get("epochs_run"), "n_train": history.get("n_train")},
            )
        )
    names = [str(c) for c in targets.columns]
    return NestedCVResult(
        task=task,
        names=names,
        sample_ids=ids,
        folds=folds,
        oof=pd.DataFrame(oof, index=pd.Index(ids, name="sample_id"), columns=names),
        models=models,
        outer=records,
        config=config,
    )
