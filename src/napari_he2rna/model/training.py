"""HE2RNA training: one public path for every command that trains a per-tile model on slide-level targets.

``he2rna train``, ``make-demo-model``, ``slide-ex`` and the library all go through :func:`cross_validate`
(folds from :mod:`napari_he2rna.model.folds`, standardisation from :mod:`napari_he2rna.model.scaling`) and
:func:`train_one`. Training follows the paper's Methods: Adam (lr 3e-4), minibatches of 16 slides
(supertiles) or 4 (all tiles), one k drawn from ``L`` per batch, mean squared error on log10(1 + FPKM-UQ),
at most 200 epochs, early stopping after 50 epochs without improvement on a validation split (10 % of the
training patients), five folds with every patient in one fold and cancer types spread evenly.

Two things the paper leaves implicit are explicit here:

* **Standardised inputs.** Each fold's network sees ``(x - mean) / std`` with mean and std fitted on that
  fold's training samples only; the scaling is folded into the first layer when the fold ends, so the
  models (and the saved bundle) take raw backbone features, and the bundle records the scalers.
* **A validation criterion that is always defined** (:func:`napari_he2rna.model.folds.choose_criterion`): the
  paper's mean per-gene, per-cancer-type R when every type has enough validation samples, else the R pooled
  over the validation samples, else the validation loss. The history of each fold says which was used.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..cohorts.cohort import Cohort
from ..errors import DataError
from ..features.devices import resolve_device
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from .bundle import atomic_write_bytes
from .cohort_prediction import SlideBatches, predict_slides
from .evaluation import mean_r_by_type, pearson_by_type, pearson_columns
from .folds import choose_criterion, cv_folds, validation_split
from .network import FULL_TILE_KS, HE2RNA, SUPERTILE_KS, topk_mean, topk_mean_multi
from .prefetch import iter_batches
from .scaling import FeatureScaler, ScaledFeatures

__all__ = [
    "CVResult",
    "TrainConfig",
    "bundle_metadata",
    "check_targets",
    "cross_validate",
    "pooled_mean_r",
    "train_one",
    "untrained_predictions",
    "validation_score",
]


#: The k list of supertile training. The paper's is ``model.SUPERTILE_KS`` (1, 2, 5, ..., 100); on the
#: planted-truth cohorts of docs/training.md the small k (a slide predicted from its 1-20 highest tiles) cost
#: slide-level R (0.32-0.50 vs 0.60-0.83) and painted worse maps, so the top half and all of the
#: supertiles are drawn here (``he2rna train --ks 1 2 5 10 20 50 100`` restores the paper's).
DEFAULT_SUPERTILE_KS: tuple[int, ...] = (50, 100)
#: The default validation fraction when every cancer type gets enough validation samples at it.
PAPER_VAL_FRACTION = 0.1


def resolve_val_fraction(val_fraction: float | None, train_types: Sequence[str]) -> tuple[float, str]:
    """The validation fraction of one fold and why.

    ``None`` (auto) gives the paper's 10 % when every cancer type of the fold's training samples would get
    at least :data:`napari_he2rna.model.folds.MIN_VAL_PER_TYPE` validation samples at that fraction (so the
    paper's
    per-type R is defined), else 0: on smaller cohorts a validation split of one or two samples per type
    only picks a noisy epoch and takes samples from training (docs/training.md), so training runs all its
    epochs. A number is used as given.
    """
    from .folds import MIN_VAL_PER_TYPE

    if val_fraction is not None:
        return float(val_fraction), "as asked"
    counts = pd.Series(np.asarray(train_types).astype(str)).value_counts()
    if len(counts) and (counts * PAPER_VAL_FRACTION >= MIN_VAL_PER_TYPE).all():
        return PAPER_VAL_FRACTION, "auto: every cancer type gets enough validation samples"
    smallest = int(counts.min()) if len(counts) else 0
    need = int(np.ceil(MIN_VAL_PER_TYPE / PAPER_VAL_FRACTION))
    return 0.0, (
        f"auto: a cancer type has {smallest} training samples, early stopping on the per-type R needs "
        f"{need}, so all epochs are run"
    )


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's (supertile mode) plus standardised inputs."""

    mode: str = "supertiles"  # "supertiles" (<= 100 per slide) or "tiles" (all tiles, up to 8,000)
    hidden: tuple[int, ...] = (1024, 1024)
    dropout: float = 0.25
    lr: float = 3e-4
    batch_size: int | None = None  # 16 for supertiles, 4 for tiles
    max_epochs: int = 200
    patience: int = 50
    ks: tuple[int, ...] | None = None  # L; default by mode (DEFAULT_SUPERTILE_KS / FULL_TILE_KS)
    val_fraction: float | None = None  # None: auto (see resolve_val_fraction)
    n_folds: int = 5
    seed: int = 0
    weight_decay: float = 0.0
    standardize: bool = True  # inputs (x - mean) / std, fitted per fold on its training samples
    standardize_targets: bool = False  # each gene z-scored on the fold's training samples (equal weight)
    anchor: float = 0.0  # tile scores held near the fold's linear map (train_one); 0: the paper's HE2RNA
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("supertiles", "tiles"):
            raise ValueError(f"mode must be 'supertiles' or 'tiles', not {self.mode!r}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.ks is not None:
            self.ks = tuple(int(k) for k in self.ks)
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise DataError(f"The validation fraction must be in [0, 1), not {self.val_fraction}.")
        if self.max_epochs < 1:
            raise DataError(f"Training needs at least 1 epoch, not {self.max_epochs}.")
        if not (np.isfinite(self.anchor) and self.anchor >= 0):
            raise DataError(f"The anchor to the linear baseline must be 0 or more, not {self.anchor}.")

    @property
    def k_list(self) -> tuple[int, ...]:
        return self.ks or (DEFAULT_SUPERTILE_KS if self.mode == "supertiles" else FULL_TILE_KS)

    @property
    def batch(self) -> int:
        return self.batch_size or (16 if self.mode == "supertiles" else 4)

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result (the device does not, up to floating-point order)."""
        d = asdict(self)
        d.pop("device")
        if not d["anchor"]:
            d.pop("anchor")  # as before the anchor existed: earlier checkpoints and bundles keep their key
        d["ks"] = list(self.k_list)
        d["batch_size"] = self.batch
        d["hidden"] = list(self.hidden)
        return d


# ------------------------------------------------------------------------------------------- validation


def pooled_mean_r(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean over genes of the Pearson R over all samples (types pooled).

    Genes constant in ``truth`` are left out (R undefined, nothing to learn); a constant prediction counts
    as R = 0, so a model cannot improve by collapsing its outputs. NaN only when every gene is constant.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    r = pearson_columns(t, p)
    varies = t.std(axis=0) > 1e-12 * np.maximum(np.abs(t).max(axis=0), 1e-300)
    if not varies.any() or t.shape[0] < 3:
        return float("nan")
    return float(np.nan_to_num(r[varies], nan=0.0).mean())


def validation_score(criterion: str, truth: np.ndarray, pred: np.ndarray, types: np.ndarray) -> float:
    """The early-stopping score of one epoch (higher is better) under ``criterion``.

    ``"per-type R"``: mean per-gene, per-cancer-type Pearson R (the paper's); ``"pooled R"``: mean per-gene R
    over all validation samples; ``"loss"``: minus the mean squared error.
    """
    if criterion == "per-type R":
        return mean_r_by_type(truth, pred, types)
    if criterion == "pooled R":
        return pooled_mean_r(truth, pred)
    if criterion == "loss":
        return -float(np.mean((np.asarray(truth, np.float64) - np.asarray(pred, np.float64)) ** 2))
    raise ValueError(f"unknown validation criterion {criterion!r}")


def check_targets(y: np.ndarray, genes: Sequence[str], train_idx: np.ndarray, fold: int) -> None:
    """Refuse a gene that is constant over a fold's training samples (there is nothing to learn)."""
    sub = np.asarray(y[train_idx], dtype=np.float64)
    const = np.flatnonzero(sub.std(axis=0) <= 1e-9 * np.maximum(np.abs(sub).max(axis=0), 1.0))
    if len(const):
        names = ", ".join(str(genes[i]) for i in const[:5]) + (" ..." if len(const) > 5 else "")
        raise DataError(
            f"{len(const)} gene(s) are constant over the training samples of fold {fold + 1} ({names}); "
            "remove them from the expression table or train on more samples."
        )


def train_one(
    model: HE2RNA,
    slides: SlideBatches,
    y: np.ndarray,
    types: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    rng: np.random.Generator,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    cancel: CancelToken | None = None,
    aggregation: str = "topk",
    anchor_model: HE2RNA | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with early stopping; it ends with the best validation weights.

    Parameters
    ----------
    model
        The network (its input is what ``slides`` gives, e.g. standardised features).
    slides
        Features by sample position.
    y
        ``(n_samples, n_outputs)`` targets.
    types
        ``(n_samples,)`` cancer type (or any stratum) of each sample, for the per-type validation R.
    train_idx, val_idx
        Sample positions to train on and to validate on (``val_idx`` may be empty: then the last epoch is
        kept).
    config
        Epochs, patience, batch size, k list, learning rate, weight decay.
    rng
        Shuffling and the k drawn per batch.
    on_epoch
        Called after every epoch with ``(epoch, info)``: ``info`` holds ``criterion``, ``score`` and
        ``train_loss``.
    aggregation
        ``"topk"`` (one k from the k list per batch, the paper's) or ``"mean"`` (all tiles).
    anchor_model
        With ``config.anchor`` > 0: the fold's linear-baseline map on the same inputs and in the same target
        units; ``config.anchor`` x the mean over real tiles and genes of (tile score - its tile score)^2 is
        added to each batch's loss, so the slide means are fitted with tile scores near the linear map's
        (issue 23: on 40-60 slides the slide means pin a linear map, not an MLP's non-linear part).

    Returns
    -------
    dict
        The fold's history: ``criterion``, ``epochs_run``, ``best_epoch``, ``best_score``, ``val_scores``,
        ``train_loss``, ``n_train``, ``n_val``.
    """
    ks = config.k_list
    criterion = choose_criterion(types[val_idx], types[train_idx])
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_t = torch.from_numpy(np.array(y, dtype=np.float32))  # a copy: torch wants a writable array
    best_score, best_epoch, best_state = -np.inf, -1, None
    scores: list[float] = []
    losses: list[float] = []
    for epoch in range(config.max_epochs):
        check_cancel(cancel)
        model.train()
        order = rng.permutation(train_idx)
        total, count = 0.0, 0
        batches = [order[start : start + config.batch] for start in range(0, len(order), config.batch)]
        # The next batches are read in the background while this one is computed.
        with closing(iter_batches(slides, batches, device)) as stream:
            for batch, (x, mask) in zip(batches, stream, strict=True):
                scores_t = model(x, mask)
                if aggregation == "mean":
                    m = mask[:, None, :].to(scores_t.dtype)
                    pred = (scores_t * m).sum(2) / m.sum(2).clamp_min(1)
                else:
                    k = int(rng.choice(ks))  # one k per batch: the paper's stochastic aggregation
                    pred = topk_mean(scores_t, mask, k)
                loss = torch.nn.functional.mse_loss(pred, y_t[batch].to(device))
                if anchor_model is not None and config.anchor > 0:
                    with torch.no_grad():
                        ref = anchor_model(x, mask)
                    # padded tiles score 0 in both; mse_loss keeps no (B, G, N) temporaries for backward
                    pull = torch.nn.functional.mse_loss(scores_t, ref, reduction="sum")
                    loss = loss + config.anchor * pull / (mask.sum() * scores_t.shape[1]).clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
                check_cancel(cancel)
        losses.append(total / max(count, 1))
        if criterion != "none":
            pv = predict_slides(model, slides, val_idx, ks, device, config.batch, aggregation)
            score = validation_score(criterion, y[val_idx], pv, types[val_idx])
        else:
            score = float("nan")
        scores.append(score)
        # A non-finite score is never an improvement; without validation the last epoch is kept.
        if criterion == "none" or (np.isfinite(score) and score > best_score):
            best_score = score if np.isfinite(score) else best_score
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, {"criterion": criterion, "score": score, "train_loss": losses[-1]})
        if criterion != "none" and best_epoch >= 0 and epoch - best_epoch >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "criterion": criterion,
        "epochs_run": len(scores),
        "best_epoch": best_epoch,
        "best_score": None if not np.isfinite(best_score) else float(best_score),
        "val_scores": [None if not np.isfinite(s) else round(float(s), 5) for s in scores],
        "train_loss": [round(float(v), 6) for v in losses],
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
    }


# ------------------------------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """Cross-validation output: one model per fold (taking raw features) and the out-of-fold predictions."""

    models: list[HE2RNA]
    genes: list[str]
    sample_ids: list[str]
    cancer_types: np.ndarray
    folds: np.ndarray  # (n_samples,) fold of each sample (it is predicted by that fold's model)
    oof: pd.DataFrame  # (n_samples, n_genes) out-of-fold predictions
    histories: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None
    scalers: list[FeatureScaler] = field(default_factory=list)  # the input scaling of each fold
    model_type: str = "he2rna"
    aggregation: str = "topk"
    # --model-type ensemble: the linear baseline's fold models (raw features in, every gene) and every gene's
    # R for the three models (:class:`napari_he2rna.model.gene_comparison.GeneComparison`).
    linear_models: list[HE2RNA] | None = None
    comparison: Any = None
    linear_weight: float = 1.0  # the ensemble's linear share of each tile score (model/blend.py)

    def fold_predictions(self, fold: int) -> pd.DataFrame:
        """Out-of-fold predictions of one fold's test samples."""
        return self.oof[self.folds == fold]


def _cv_key(cohort: Cohort, config: TrainConfig, folds: np.ndarray, scalers_digest: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config.fingerprint(), sort_keys=True).encode())
    h.update("\n".join(cohort.sample_ids).encode())
    h.update("\n".join(cohort.genes).encode())
    h.update(folds.tobytes())
    h.update(np.ascontiguousarray(cohort.expression.to_numpy(np.float32)).tobytes())
    h.update(scalers_digest.encode())  # the features, through what was fitted on them
    return h.hexdigest()


def _save_fold_checkpoint(path: Path, model: HE2RNA, oof: np.ndarray, history: dict, key: str) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["oof"] = torch.from_numpy(np.ascontiguousarray(oof, dtype=np.float32))
    meta = {"key": key, "history": json.dumps(history)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_fold_checkpoint(path: Path, model: HE2RNA, key: str) -> tuple[np.ndarray, dict] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            state = {k[len("model.") :]: fh.get_tensor(k) for k in fh.keys() if k.startswith("model.")}
            oof = fh.get_tensor("oof").numpy()
        model.load_state_dict(state)
        return oof, json.loads(meta["history"])
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply redone
        return None


def fold_scalers(
    features: Mapping[str, np.ndarray], ids: Sequence[str], folds: np.ndarray, standardize: bool = True
) -> list[FeatureScaler]:
    """One :class:`FeatureScaler` per fold, fitted on that fold's training samples only."""
    ids = list(ids)
    out = []
    for f in range(int(folds.max()) + 1):
        train = [ids[i] for i in np.flatnonzero(folds != f)]
        if standardize:
            out.append(FeatureScaler.fit_samples(features, train))
        else:
            first = np.asarray(features[train[0]])
            out.append(FeatureScaler.identity(first.shape[1]))
    return out


def cross_validate(
    cohort: Cohort,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    initial_models: Sequence[HE2RNA] | None = None,
    folds: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
    anchor_models: Sequence[HE2RNA] | None = None,
) -> CVResult:
    """Train one HE2RNA per cross-validation fold and predict each fold's held-out samples.

    Parameters
    ----------
    cohort
        From :func:`napari_he2rna.cohorts.cohort.match_cohort`.
    config
        :class:`TrainConfig` (defaults: the paper's supertile settings, standardised inputs).
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress counts epochs over all folds, and its message is the epoch's
        log line (fold, epoch, training loss, validation criterion and score).
    checkpoint_dir
        Each finished fold is saved there; a rerun with the same data and settings resumes after the last
        finished fold.
    initial_models
        One model per fold to start from (fine-tuning, e.g. on full tiles after supertile training); they
        take raw features, and are re-expressed on the fold's standardised features before training.
    folds
        Fold per sample (default: :func:`napari_he2rna.model.folds.cv_folds` with the config's seed).
    log
        Called with one line per fold (its validation criterion and split sizes).
    anchor_models
        With ``config.anchor`` > 0 (required then): the linear baseline's fold models on the same folds
        (raw features in, every gene: :func:`napari_he2rna.model.baseline.ridge_cross_validate`), which
        each fold's tile scores are held near (see :func:`train_one`).

    Returns
    -------
    CVResult
        Its models take raw backbone features (each fold's scaling is folded into the first layer).
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    ids = cohort.sample_ids
    y = cohort.expression.to_numpy(np.float32)
    types = cohort.samples.loc[ids, "cancer_type"].astype(str).to_numpy()
    if folds is None:
        folds = cv_folds(cohort.samples.loc[ids], config.n_folds, config.seed)
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    if config.anchor > 0 and (anchor_models is None or len(anchor_models) != n_folds):
        raise DataError(
            f"Anchoring HE2RNA to the linear baseline needs its {n_folds} fold models on the same folds."
        )
    if initial_models is not None and len(initial_models) != n_folds:
        raise DataError(
            f"Fine-tuning needs one initial model per fold ({n_folds}), got {len(initial_models)}."
        )
    probe = SlideBatches(cohort.features, ids, keep_in_memory=False)
    dim = probe.get(0).shape[1]
    if config.mode == "supertiles":
        for sid in ids:
            n = np.asarray(cohort.features[sid]).shape[0]
            if n > 1000:
                raise DataError(
                    f"Supertile mode expects about 100 supertiles per slide; {sid} has {n} rows "
                    "(use mode='tiles')."
                )
    for f in range(n_folds):
        check_targets(y, cohort.genes, np.flatnonzero(folds != f), f)
    scalers = fold_scalers(cohort.features, ids, folds, config.standardize)
    digest = hashlib.sha256(
        b"".join(np.ascontiguousarray(np.concatenate([s.mean, s.std])).tobytes() for s in scalers)
    ).hexdigest()
    key = _cv_key(cohort, config, folds, digest)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)

    oof = np.full(y.shape, np.nan, dtype=np.float32)
    models: list[HE2RNA] = []
    histories: list[dict] = []
    total = n_folds * config.max_epochs
    for f in range(n_folds):
        test_idx = np.flatnonzero(folds == f)
        train_all = np.flatnonzero(folds != f)
        scaler = scalers[f]
        torch.manual_seed(config.seed * 1000 + f)  # dropout and initial weights, reproducible per fold
        rng = np.random.default_rng([config.seed, f])
        # Targets: as measured, or z-scored per gene on this fold's training samples (then every gene
        # weighs the same in the loss); the output layer is mapped back to measured units at the end.
        if config.standardize_targets:
            y_mean = y[train_all].mean(axis=0)
            y_std = np.where(y[train_all].std(axis=0) > 0, y[train_all].std(axis=0), 1.0)
        else:
            y_mean, y_std = np.zeros(y.shape[1]), np.ones(y.shape[1])
        y_fit = ((y - y_mean) / y_std).astype(np.float32)
        if initial_models is not None:
            model = copy.deepcopy(initial_models[f])
            scaler.unfold_from(model)  # the model took raw features: re-express it on scaled ones
            _rescale_output(model, 1.0 / y_std, -y_mean / y_std)
        else:
            model = HE2RNA(
                dim, y.shape[1], config.hidden, config.dropout, output_bias=y_fit[train_all].mean(axis=0)
            )
        model.to(device)
        path = ckpt / f"fold{f}.safetensors" if ckpt is not None else None
        loaded = _load_fold_checkpoint(path, model, key) if path is not None and path.is_file() else None
        if loaded is not None:  # a finished fold: its saved model already takes raw features
            oof[test_idx], history = loaded
            history = {**history, "resumed": True}
            report(
                progress,
                (f + 1) * config.max_epochs,
                total,
                f"fold {f + 1}/{n_folds} resumed from checkpoint",
            )
        else:
            slides = SlideBatches(
                ScaledFeatures(cohort.features, scaler), ids, keep_in_memory=config.mode == "supertiles"
            )
            sub = cohort.samples.loc[[ids[i] for i in train_all]]
            val_fraction, why = resolve_val_fraction(config.val_fraction, types[train_all])
            is_val = validation_split(sub, val_fraction, seed=config.seed + f)
            train_idx, val_idx = train_all[~is_val], train_all[is_val]
            if len(train_idx) == 0:
                raise DataError(
                    f"Fold {f + 1} keeps no training sample after its validation split; use a smaller "
                    "--val-fraction or fewer folds."
                )
            criterion = choose_criterion(types[val_idx], types[train_idx])
            if log is not None:
                counts = pd.Series(types[val_idx]).value_counts().sort_index().to_dict()
                log(
                    f"fold {f + 1}/{n_folds}: {len(train_idx)} training, {len(val_idx)} validation samples "
                    f"{counts if counts else ''}(validation fraction {val_fraction:g}, {why}); "
                    + (f"early stopping on: {criterion}" if criterion != "none" else "no early stopping")
                )

            def on_epoch(epoch: int, info: dict[str, Any], f=f) -> None:
                what = {"per-type R": "val R/type", "pooled R": "val R pooled", "loss": "val MSE"}.get(
                    info["criterion"]
                )
                score = info["score"]
                tail = ""
                if what is not None:
                    shown = -score if info["criterion"] == "loss" else score
                    tail = f", {what} {shown:.3f}"
                msg = f"fold {f + 1}/{n_folds} epoch {epoch + 1}: train MSE {info['train_loss']:.4f}{tail}"
                report(progress, f * config.max_epochs + epoch + 1, total, msg)

            anchor = None
            if config.anchor > 0:  # the fold's linear map, on the scaled features and in training units
                anchor = copy.deepcopy(anchor_models[f]).float().eval()
                scaler.unfold_from(anchor)
                _rescale_output(anchor, 1.0 / y_std, -y_mean / y_std)
                anchor.to(device)
            history = train_one(
                model,
                slides,
                y_fit,
                types,
                train_idx,
                val_idx,
                config,
                device,
                rng,
                on_epoch,
                cancel,
                anchor_model=anchor,
            )
            history["fold"] = f
            history["val_fraction"] = val_fraction
            model.cpu()
            _rescale_output(model, y_std, y_mean)
            oof[test_idx] = predict_slides(
                model, slides, test_idx, config.k_list, torch.device("cpu"), config.batch
            )
            scaler.fold_into(model)
            report(progress, (f + 1) * config.max_epochs, total, f"fold {f + 1}/{n_folds} done")
            if path is not None:
                _save_fold_checkpoint(path, model, oof[test_idx], history, key)
        models.append(model.cpu().eval())
        histories.append(history)
    return CVResult(
        models=models,
        genes=cohort.genes,
        sample_ids=ids,
        cancer_types=types,
        folds=folds,
        oof=pd.DataFrame(oof, index=pd.Index(ids, name="sample_id"), columns=cohort.genes),
        histories=histories,
        config=config,
        scalers=scalers,
    )


def _rescale_output(model: HE2RNA, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make the model output ``scale * out + shift`` per gene (in place, in its last layer)."""
    last = model.layers[-1]
    with torch.no_grad():
        sc = torch.as_tensor(np.asarray(scale, dtype=np.float64))
        last.weight.copy_((last.weight.double() * sc[:, None, None]).to(last.weight.dtype))
        last.bias.copy_(
            (last.bias.double() * sc + torch.as_tensor(np.asarray(shift, np.float64))).to(last.bias.dtype)
        )


def untrained_predictions(
    cohort: Cohort,
    hidden: Sequence[int],
    n_inits: int = 25,
    ks: Sequence[int] = SUPERTILE_KS,
    dropout: float = 0.25,
    seed: int = 12345,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    cancel: CancelToken | None = None,
    standardize: bool = True,
) -> np.ndarray:
    """Predictions of the same architecture, untrained (the paper's null), for several random inits.

    The untrained networks see what the trained ones saw: features standardised (here over the whole
    cohort: an untrained network learns nothing from the held-out samples, so there is no leak).

    Returns
    -------
    np.ndarray
        ``(n_inits, n_samples, n_genes)``. The output bias is a constant per gene and does not change a
        correlation, so it is left at its random init.
    """
    dev = resolve_device(device)
    ids = cohort.sample_ids
    feats: Mapping[str, np.ndarray] = cohort.features
    if standardize:
        feats = ScaledFeatures(feats, FeatureScaler.fit_samples(feats, ids))
    slides = SlideBatches(feats, ids, keep_in_memory=False)
    dim = slides.get(0).shape[1]
    n_genes = cohort.expression.shape[1]
    models = []
    gen_state = torch.random.get_rng_state()
    try:
        for i in range(n_inits):
            torch.manual_seed(seed + i)
            models.append(HE2RNA(dim, n_genes, hidden, dropout).to(dev).eval())
    finally:
        torch.random.set_rng_state(gen_state)
    out = np.zeros((n_inits, len(ids), n_genes), dtype=np.float32)
    idx = np.arange(len(ids))
    with torch.no_grad():
        # Slides outside, inits inside: each slide's features are loaded once.
        for start in range(0, len(ids), batch_size):
            check_cancel(cancel)
            x, mask = slides.batch(idx[start : start + batch_size], dev)
            for i, m in enumerate(models):
                out[i, start : start + batch_size] = topk_mean_multi(m(x, mask), mask, ks).cpu().numpy()
    return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def bundle_metadata(
    result: CVResult, cohort: Cohort, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Metadata for :func:`napari_he2rna.model.bundle.save_bundle`: cohort summary, per-gene per-cancer
    cross-validated R (out-of-fold), the fold of every sample, the training settings with each fold's
    validation criterion and history, and the input standardisation of every fold."""
    r = pearson_by_type(
        cohort.expression.to_numpy(), result.oof.to_numpy(), result.cancer_types, result.genes
    )
    validation_r = {
        str(t): {g: (None if not np.isfinite(v) else round(float(v), 4)) for g, v in row.items()}
        for t, row in r.iterrows()
    }
    meta = {
        "cohort": cohort.summary(),
        "model_type": result.model_type,
        "validation_r": validation_r,
        "folds": {s: int(f) for s, f in zip(result.sample_ids, result.folds, strict=False)},
        "training": {
            **(result.config.fingerprint() if result.config else {}),
            "model_type": result.model_type,
            "validation_criteria": [h.get("criterion") for h in result.histories],
            "histories": result.histories,
        },
        "input_standardization": {
            "note": "each fold trained on (x - mean) / std of its training samples; folded into its first "
            "layer, so the bundle takes raw features",
            "folds": [s.to_json() for s in result.scalers],
        },
        "output_unit": cohort.expression.attrs.get("unit", "log10(1+FPKM-UQ)"),
    }
    if result.comparison is not None:  # --model-type ensemble: every gene's R for the three models
        table = result.comparison.table()
        meta["gene_models"] = {
            "headline": result.comparison.headline(),
            "genes": {
                row.gene: {
                    "r_he2rna": _finite(row.r_he2rna),
                    "r_linear": _finite(row.r_linear),
                    "r_ensemble": _finite(row.r_ensemble),
                }
                for row in table.itertuples()
            },
        }
    meta.update(extra or {})
    return meta
