"""Cohort data and HE2RNA training: expression tables, sample sheets, patient-grouped cross-validation.

A cohort is three things matched by sample id: an expression table (samples x genes), a sample sheet
(sample id, patient id, cancer type, slide) and one feature matrix per sample (``(n_tiles, dim)``: the
supertiles of the slide, or all its tiles). Features are given as a mapping ``sample_id -> array`` (a dict,
or any lazy mapping) or a callable ``sample_id -> array``, so training can be tested without slides; the
CLI builds that mapping from the feature cache of :mod:`napari_he2rna.features`.

Training follows the paper's Methods: Adam (lr 3e-4), minibatches of 16 slides (supertiles) or 4 (all
tiles), one k drawn from ``L`` per batch, mean squared error on log10(1 + FPKM-UQ), at most 200 epochs,
early stopping after 50 epochs without improvement of the mean per-gene, per-cancer-type Pearson R on a
validation split (10% of the training patients), five folds with every patient in one fold and cancer
types spread evenly (scikit-learn's ``StratifiedGroupKFold``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import DataError
from .evaluation import mean_r_by_type, pearson_by_type
from .jobs import CancelToken, ProgressCallback, check_cancel, report
from .model import FULL_TILE_KS, HE2RNA, SUPERTILE_KS, ModelBundle, topk_mean, topk_mean_multi

FeatureSource = Mapping[str, np.ndarray] | Callable[[str], np.ndarray]

#: Above this, a table is taken to hold raw FPKM-UQ (log10(1 + FPKM-UQ) of real genes stays below ~7).
RAW_THRESHOLD = 50.0

SAMPLE_COLUMNS = ("sample_id", "patient_id", "cancer_type")


# ------------------------------------------------------------------------------------------ cohort data


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"Table {path} does not exist.")
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            try:
                return pd.read_parquet(path)
            except ImportError:
                raise DataError(
                    f"Reading {path.name} needs a parquet engine: pip install pyarrow (or give a TSV/CSV)."
                ) from None
        if name.endswith(".h5ad"):
            try:
                import anndata  # optional: only for .h5ad tables
            except ImportError:
                raise DataError(
                    f"Reading {path.name} needs anndata: pip install anndata (or give a TSV/CSV)."
                ) from None
            ad = anndata.read_h5ad(path)
            x = ad.X.toarray() if hasattr(ad.X, "toarray") else np.asarray(ad.X)
            return pd.DataFrame(
                x, index=ad.obs_names.astype(str), columns=ad.var_names.astype(str)
            ).reset_index()
        sep = "," if ".csv" in name else "\t"
        return pd.read_csv(path, sep=sep)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas raises many parser errors; the user needs one sentence
        raise DataError(f"Table {path.name} cannot be read ({type(exc).__name__}: {exc}).") from None


def load_expression(
    path: str | Path | pd.DataFrame,
    transform: str = "auto",
    genes_as_rows: bool = False,
    filter_zero_median: bool = True,
) -> pd.DataFrame:
    """Read an expression table into log10(1 + FPKM-UQ), samples x genes.

    Parameters
    ----------
    path
        TSV/CSV (gzip ok), parquet, or AnnData ``.h5ad`` (needs ``anndata``); the first column holds the
        sample ids. A DataFrame (index = sample ids) is accepted as is.
    transform
        ``"raw"``: values are FPKM-UQ, transform them with ``log10(1 + x)``; ``"log"``: already
        log10(1 + FPKM-UQ); ``"auto"``: raw when any value exceeds 50.
    genes_as_rows
        True when the table is genes x samples (as TCGA ships it).
    filter_zero_median
        Keep only genes with a non-zero median over the samples (the paper's filter).

    Returns
    -------
    pd.DataFrame
        float32, index = sample ids (str), columns = genes. ``attrs`` records the transform and what was
        dropped.
    """
    if isinstance(path, pd.DataFrame):
        df = path.copy()
        name = "the expression table"
    else:
        path = Path(path)
        name = path.name
        df = _read_table(path)
        df = df.set_index(df.columns[0])
    if genes_as_rows:
        df = df.T
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"{name} has no samples or no genes.")
    if df.index.duplicated().any():
        dup = df.index[df.index.duplicated()][:3].tolist()
        raise DataError(f"{name} lists samples more than once (e.g. {dup}).")
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise DataError(
            f"{name} has non-numeric gene columns (e.g. {non_numeric[:3]}); "
            "the first column must be the sample id."
        )
    values = df.to_numpy(dtype=np.float64)
    nan_genes = np.isnan(values).any(axis=0)
    finite = values[~np.isnan(values)]
    if finite.size and finite.min() < 0 and transform != "log":
        raise DataError(f"{name} has negative values: give FPKM-UQ or log10(1 + FPKM-UQ) values.")
    if transform == "auto":
        transform = "raw" if finite.size and finite.max() > RAW_THRESHOLD else "log"
    if transform == "raw":
        values = np.log10(1.0 + values)
    elif transform != "log":
        raise DataError(f"Unknown expression transform {transform!r} (use auto, raw or log).")
    keep = ~nan_genes
    zero_median = np.zeros_like(keep)
    if filter_zero_median:
        med = np.nanmedian(values, axis=0)
        zero_median = med == 0
        keep &= ~zero_median
    if not keep.any():
        raise DataError(f"{name} has no gene with a non-zero median expression.")
    out = pd.DataFrame(values[:, keep].astype(np.float32), index=df.index, columns=df.columns[keep])
    out.index.name = "sample_id"
    out.attrs.update(
        transform="log10(1+x)" if transform == "raw" else "none (already log)",
        n_genes_in=int(df.shape[1]),
        n_genes_dropped_zero_median=int((zero_median & ~nan_genes).sum()),
        n_genes_dropped_nan=int(nan_genes.sum()),
    )
    return out


def load_samples(path: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a sample sheet: ``sample_id``, ``patient_id``, ``cancer_type`` and optionally ``slide``.

    Returns a DataFrame indexed by sample id (str). Relative slide paths are resolved against the sheet's
    folder.
    """
    if isinstance(path, pd.DataFrame):
        df, name, base = path.copy(), "the sample sheet", None
    else:
        path = Path(path)
        df, name, base = _read_table(path), path.name, path.parent
    df.columns = [str(c).strip().lower() for c in df.columns]
    if "sample_id" not in df.columns and df.index.name == "sample_id":
        df = df.reset_index()
    missing = [c for c in SAMPLE_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{name} lacks the column(s) {', '.join(missing)} (needs {', '.join(SAMPLE_COLUMNS)})."
        )
    for c in SAMPLE_COLUMNS:
        if df[c].isna().any():
            raise DataError(f"{name} has empty cells in column {c}.")
        df[c] = df[c].astype(str)
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].head(3).tolist()
        raise DataError(f"{name} lists samples more than once (e.g. {dup}); give one slide per sample.")
    if "slide" in df.columns and base is not None:
        df["slide"] = [
            str(base / s) if isinstance(s, str) and s and not Path(s).is_absolute() else s
            for s in df["slide"]
        ]
    return df.set_index("sample_id")


@dataclass
class MatchReport:
    """What matched between the expression table, the sample sheet and the features."""

    matched: list[str]
    expression_only: list[str]
    sheet_only: list[str]
    without_features: list[str]

    def summary(self) -> str:
        def few(ids: list[str]) -> str:
            return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")

        lines = [f"{len(self.matched)} samples matched."]
        if self.expression_only:
            lines.append(
                f"{len(self.expression_only)} in the expression table only: {few(self.expression_only)}"
            )
        if self.sheet_only:
            lines.append(f"{len(self.sheet_only)} in the sample sheet only: {few(self.sheet_only)}")
        if self.without_features:
            lines.append(f"{len(self.without_features)} without features: {few(self.without_features)}")
        return "\n".join(lines)


class _CallableFeatures(Mapping):
    """A callable ``sample_id -> array`` seen as a mapping (membership is checked when loading)."""

    def __init__(self, fn: Callable[[str], np.ndarray], ids: Sequence[str]) -> None:
        self.fn, self.ids = fn, list(ids)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.fn(key)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self.ids


@dataclass
class Cohort:
    """Matched training data: log expression ``(n, G)``, the sample sheet and the features per sample."""

    expression: pd.DataFrame
    samples: pd.DataFrame
    features: Mapping[str, np.ndarray]

    @property
    def sample_ids(self) -> list[str]:
        return list(self.expression.index)

    @property
    def genes(self) -> list[str]:
        return list(self.expression.columns)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description for the model bundle."""
        counts = self.samples["cancer_type"].value_counts().sort_index()
        return {
            "n_samples": int(len(self.samples)),
            "n_patients": int(self.samples["patient_id"].nunique()),
            "n_genes": int(self.expression.shape[1]),
            "cancer_types": {str(k): int(v) for k, v in counts.items()},
            "expression_transform": self.expression.attrs.get("transform", "unknown"),
        }


def match_cohort(
    expression: pd.DataFrame,
    samples: pd.DataFrame,
    features: FeatureSource,
    genes: Sequence[str] | None = None,
) -> tuple[Cohort, MatchReport]:
    """Keep the samples present in the expression table, the sample sheet and the features.

    Parameters
    ----------
    expression
        From :func:`load_expression` (index = sample ids).
    samples
        From :func:`load_samples` (index = sample ids).
    features
        Mapping ``sample_id -> (n_tiles, dim)`` array, or a callable (then every sample of the sheet is
        assumed to have features; a missing one fails when it is loaded).
    genes
        Restrict the expression to these genes (in this order), e.g. those of an existing model.

    Raises
    ------
    DataError
        When nothing matches, or a requested gene is not in the expression table.
    """
    expr_ids = list(map(str, expression.index))
    sheet_ids = list(map(str, samples.index))
    if callable(features) and not isinstance(features, Mapping):
        features = _CallableFeatures(features, sheet_ids)
    expr_set, sheet_set = set(expr_ids), set(sheet_ids)
    both = [s for s in sheet_ids if s in expr_set]
    with_feat = [s for s in both if s in features]
    rep = MatchReport(
        matched=with_feat,
        expression_only=[s for s in expr_ids if s not in sheet_set],
        sheet_only=[s for s in sheet_ids if s not in expr_set],
        without_features=[s for s in both if s not in features],
    )
    if not with_feat:
        raise DataError(
            "No sample is in the expression table, the sample sheet and the features at once; "
            f"check the sample ids ({rep.summary().splitlines()[-1]})."
        )
    expr = expression.loc[with_feat]
    if genes is not None:
        genes = list(genes)
        missing = [g for g in genes if g not in expr.columns]
        if missing:
            raise DataError(
                f"The expression table lacks {len(missing)} of the model's genes (e.g. {missing[:3]})."
            )
        expr = expr[genes]
    expr = expr.copy()
    expr.attrs = dict(expression.attrs)
    return Cohort(expression=expr, samples=samples.loc[with_feat].copy(), features=features), rep


# ------------------------------------------------------------------------------------------ CV splits


def _dealt_group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fallback when every cancer type has fewer patients than folds (scikit-learn then refuses):
    the patients of each type, shuffled, dealt round-robin over the folds, continuing from type to type."""
    rng = np.random.default_rng(seed)
    patient_type = pd.Series(y, index=groups).groupby(level=0).first()
    fold_of: dict[str, int] = {}
    nxt = 0
    for t in sorted(set(patient_type)):
        pats = sorted(patient_type.index[patient_type == t])
        for p in rng.permutation(pats):
            fold_of[p] = nxt % n_splits
            nxt += 1
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold per sample, patient-grouped and type-stratified (scikit-learn's StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            # A cancer type with fewer patients than folds cannot be in every fold: that is fine.
            warnings.simplefilter("ignore", UserWarning)
            for f, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
                folds[test] = f
    except ValueError:  # every type has fewer patients than folds: tiny cohorts
        return _dealt_group_folds(y, groups, n_splits, seed)
    return folds


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
    groups = samples["patient_id"].astype(str).to_numpy()
    n_patients = len(set(groups))
    if n_folds < 2:
        raise DataError("Cross-validation needs at least 2 folds.")
    if n_patients < n_folds:
        raise DataError(
            f"{n_patients} patients cannot fill {n_folds} folds; use fewer folds or more patients."
        )
    return _group_folds(samples["cancer_type"].astype(str).to_numpy(), groups, n_folds, seed)


def validation_split(samples: pd.DataFrame, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Validation samples (bool mask): about ``fraction`` of the patients, grouped, type-stratified."""
    groups = samples["patient_id"].astype(str).to_numpy()
    n_patients = len(set(groups))
    n_splits = min(max(2, int(round(1.0 / max(fraction, 1e-6)))), n_patients)
    if n_splits < 2 or fraction <= 0:
        return np.zeros(len(samples), dtype=bool)
    folds = _group_folds(samples["cancer_type"].astype(str).to_numpy(), groups, n_splits, seed)
    return folds == 0


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's (supertile mode)."""

    mode: str = "supertiles"  # "supertiles" (<= 100 per slide) or "tiles" (all tiles, up to 8,000)
    hidden: tuple[int, ...] = (1024, 1024)
    dropout: float = 0.25
    lr: float = 3e-4
    batch_size: int | None = None  # 16 for supertiles, 4 for tiles
    max_epochs: int = 200
    patience: int = 50
    ks: tuple[int, ...] | None = None  # L; default by mode
    val_fraction: float = 0.1
    n_folds: int = 5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("supertiles", "tiles"):
            raise ValueError(f"mode must be 'supertiles' or 'tiles', not {self.mode!r}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.ks is not None:
            self.ks = tuple(int(k) for k in self.ks)

    @property
    def k_list(self) -> tuple[int, ...]:
        return self.ks or (SUPERTILE_KS if self.mode == "supertiles" else FULL_TILE_KS)

    @property
    def batch(self) -> int:
        return self.batch_size or (16 if self.mode == "supertiles" else 4)

    def fingerprint(self) -> dict[str, Any]:
        """What determines the result (the device does not, up to floating-point order)."""
        d = asdict(self)
        d.pop("device")
        d["ks"] = list(self.k_list)
        d["batch_size"] = self.batch
        d["hidden"] = list(self.hidden)
        return d


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Slides:
    """Feature matrices by position, loaded once (supertiles) or on demand (all tiles)."""

    def __init__(self, features: Mapping[str, np.ndarray], ids: Sequence[str], keep_in_memory: bool) -> None:
        self.features, self.ids, self.keep = features, list(ids), keep_in_memory
        self._cache: dict[int, np.ndarray] = {}
        self.dim: int | None = None

    def get(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        sid = self.ids[i]
        try:
            arr = np.asarray(self.features[sid], dtype=np.float32)
        except KeyError:
            raise DataError(f"No features for sample {sid}.") from None
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise DataError(
                f"Features of sample {sid} must be a non-empty (n_tiles, dim) array, got {arr.shape}."
            )
        if self.dim is None:
            self.dim = arr.shape[1]
        elif arr.shape[1] != self.dim:
            raise DataError(f"Features of sample {sid} have {arr.shape[1]} dimensions, others {self.dim}.")
        if not np.isfinite(arr).all():
            raise DataError(f"Features of sample {sid} contain NaN or infinite values.")
        if self.keep:
            self._cache[i] = arr
        return arr

    def batch(self, idx: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, dim, N_max)`` features and ``(B, N_max)`` mask; padding is zeros, masked out."""
        arrays = [self.get(int(i)) for i in idx]
        n_max = max(a.shape[0] for a in arrays)
        x = np.zeros((len(arrays), arrays[0].shape[1], n_max), dtype=np.float32)
        mask = np.zeros((len(arrays), n_max), dtype=bool)
        for j, a in enumerate(arrays):
            x[j, :, : a.shape[0]] = a.T
            mask[j, : a.shape[0]] = True
        return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


def predict_slides(
    model: HE2RNA,
    slides: _Slides,
    idx: Sequence[int],
    ks: Sequence[int],
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    """Slide predictions ``(len(idx), n_genes)`` with the inference aggregation (mean over k in ``ks``)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            x, mask = slides.batch(idx[start : start + batch_size], device)
            out.append(topk_mean_multi(model(x, mask), mask, ks).cpu().numpy())
    if not out:
        return np.zeros((0, model.n_genes), dtype=np.float32)
    return np.concatenate(out)


def _train_one(
    model: HE2RNA,
    slides: _Slides,
    y: np.ndarray,
    types: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    rng: np.random.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with early stopping; it ends with the best validation weights."""
    ks = config.k_list
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    y_t = torch.from_numpy(y.astype(np.float32))
    best_score, best_epoch, best_state = -np.inf, -1, None
    scores: list[float] = []
    for epoch in range(config.max_epochs):
        check_cancel(cancel)
        model.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), config.batch):
            batch = order[start : start + config.batch]
            x, mask = slides.batch(batch, device)
            k = int(rng.choice(ks))  # one k per batch: the paper's stochastic aggregation
            pred = topk_mean(model(x, mask), mask, k)
            loss = torch.nn.functional.mse_loss(pred, y_t[batch].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_cancel(cancel)
        if len(val_idx):
            pv = predict_slides(model, slides, val_idx, ks, device, config.batch)
            score = mean_r_by_type(y[val_idx], pv, types[val_idx])
        else:
            score = float("nan")
        scores.append(score)
        improved = len(val_idx) == 0 or (np.isfinite(score) and score > best_score) or best_state is None
        if improved:
            best_score = score if np.isfinite(score) else best_score
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, score)
        if len(val_idx) and epoch - best_epoch >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "epochs_run": len(scores),
        "best_epoch": best_epoch,
        "best_val_r": None if not np.isfinite(best_score) else float(best_score),
        "val_r": [None if not np.isfinite(s) else float(s) for s in scores],
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
    }


@dataclass
class CVResult:
    """Cross-validation output: one model per fold and the out-of-fold predictions."""

    models: list[HE2RNA]
    genes: list[str]
    sample_ids: list[str]
    cancer_types: np.ndarray
    folds: np.ndarray  # (n_samples,) fold of each sample (it is predicted by that fold's model)
    oof: pd.DataFrame  # (n_samples, n_genes) out-of-fold predictions
    histories: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None

    def fold_predictions(self, fold: int) -> pd.DataFrame:
        """Out-of-fold predictions of one fold's test samples."""
        return self.oof[self.folds == fold]


def _cv_key(cohort: Cohort, config: TrainConfig, folds: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config.fingerprint(), sort_keys=True).encode())
    h.update("\n".join(cohort.sample_ids).encode())
    h.update("\n".join(cohort.genes).encode())
    h.update(folds.tobytes())
    h.update(np.ascontiguousarray(cohort.expression.to_numpy(np.float32)).tobytes())
    return h.hexdigest()


def _save_fold_checkpoint(path: Path, model: HE2RNA, oof: np.ndarray, history: dict, key: str) -> None:
    from safetensors.torch import save

    from .model import _atomic_write_bytes

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["oof"] = torch.from_numpy(np.ascontiguousarray(oof, dtype=np.float32))
    meta = {"key": key, "history": json.dumps(history)}
    _atomic_write_bytes(path, save(tensors, metadata=meta))


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


def cross_validate(
    cohort: Cohort,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    initial_models: Sequence[HE2RNA] | None = None,
    folds: np.ndarray | None = None,
) -> CVResult:
    """Train one HE2RNA per cross-validation fold and predict each fold's held-out samples.

    Parameters
    ----------
    cohort
        From :func:`match_cohort`.
    config
        :class:`TrainConfig` (defaults: the paper's supertile settings).
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress counts epochs over all folds.
    checkpoint_dir
        Each finished fold is saved there; a rerun with the same data and settings resumes after the last
        finished fold.
    initial_models
        One model per fold to start from (fine-tuning, e.g. on full tiles after supertile training).
    folds
        Fold per sample (default: :func:`cv_folds` with the config's seed).

    Returns
    -------
    CVResult
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
    if initial_models is not None and len(initial_models) != n_folds:
        raise DataError(
            f"Fine-tuning needs one initial model per fold ({n_folds}), got {len(initial_models)}."
        )
    slides = _Slides(cohort.features, ids, keep_in_memory=config.mode == "supertiles")
    dim = slides.get(0).shape[1]
    if config.mode == "supertiles":
        too_many = [ids[i] for i in range(len(ids)) if slides.get(i).shape[0] > 1000]
        if too_many:
            raise DataError(
                f"Supertile mode expects about 100 supertiles per slide; {too_many[0]} has "
                f"{slides.get(ids.index(too_many[0])).shape[0]} rows (use mode='tiles')."
            )
    key = _cv_key(cohort, config, folds)
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
        torch.manual_seed(config.seed * 1000 + f)  # dropout and initial weights, reproducible per fold
        rng = np.random.default_rng([config.seed, f])
        if initial_models is not None:
            model = copy.deepcopy(initial_models[f])
        else:
            model = HE2RNA(
                dim, y.shape[1], config.hidden, config.dropout, output_bias=y[train_all].mean(axis=0)
            )
        model.to(device)
        path = ckpt / f"fold{f}.safetensors" if ckpt is not None else None
        loaded = _load_fold_checkpoint(path, model, key) if path is not None and path.is_file() else None
        if loaded is not None:
            oof[test_idx], history = loaded
            history = {**history, "resumed": True}
            report(
                progress,
                (f + 1) * config.max_epochs,
                total,
                f"fold {f + 1}/{n_folds} resumed from checkpoint",
            )
        else:
            sub = cohort.samples.loc[[ids[i] for i in train_all]]
            is_val = validation_split(sub, config.val_fraction, seed=config.seed + f)
            train_idx, val_idx = train_all[~is_val], train_all[is_val]

            def on_epoch(epoch: int, score: float, f=f) -> None:
                msg = f"fold {f + 1}/{n_folds} epoch {epoch + 1} val R {score:.3f}"
                report(progress, f * config.max_epochs + epoch + 1, total, msg)

            history = _train_one(
                model, slides, y, types, train_idx, val_idx, config, device, rng, on_epoch, cancel
            )
            history["fold"] = f
            oof[test_idx] = predict_slides(model, slides, test_idx, config.k_list, device, config.batch)
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
) -> np.ndarray:
    """Predictions of the same architecture, untrained (the paper's null), for several random inits.

    Returns
    -------
    np.ndarray
        ``(n_inits, n_samples, n_genes)``. The output bias is a constant per gene and does not change a
        correlation, so it is left at its random init.
    """
    dev = resolve_device(device)
    ids = cohort.sample_ids
    slides = _Slides(cohort.features, ids, keep_in_memory=False)
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


def bundle_oof_predictions(
    bundle: ModelBundle, cohort: Cohort, device: str = "auto"
) -> tuple[pd.DataFrame, np.ndarray]:
    """Out-of-fold predictions of a saved fold ensemble on its training cohort.

    Each sample is predicted by the fold model that did not see it (``metadata['folds']``); samples not in
    that map are predicted by the whole ensemble (and flagged with fold -1).

    Returns
    -------
    (pd.DataFrame, np.ndarray)
        Predictions ``(n_samples, n_genes)`` for ``bundle.genes`` and the fold per sample.
    """
    fold_map = {str(k): int(v) for k, v in (bundle.metadata.get("folds") or {}).items()}
    ids = cohort.sample_ids
    folds = np.array([fold_map.get(s, -1) for s in ids], dtype=np.int64)
    modules = bundle.to_modules()
    dev = resolve_device(device)
    slides = _Slides(cohort.features, ids, keep_in_memory=False)
    preds = np.zeros((len(ids), len(bundle.genes)), dtype=np.float32)
    for f, m in enumerate(modules):
        idx = np.flatnonzero(folds == f)
        if len(idx):
            preds[idx] = predict_slides(m.to(dev), slides, idx, bundle.ks, dev)
    rest = np.flatnonzero((folds < 0) | (folds >= len(modules)))
    if len(rest):
        preds[rest] = np.mean(
            [predict_slides(m.to(dev), slides, rest, bundle.ks, dev) for m in modules], axis=0
        )
        folds[rest] = -1
    return pd.DataFrame(preds, index=pd.Index(ids, name="sample_id"), columns=bundle.genes), folds


def bundle_metadata(
    result: CVResult, cohort: Cohort, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Metadata for :func:`napari_he2rna.model.save_bundle`: cohort summary, per-gene per-cancer
    cross-validated R (out-of-fold), the fold of every sample and the training settings."""
    r = pearson_by_type(
        cohort.expression.to_numpy(), result.oof.to_numpy(), result.cancer_types, result.genes
    )
    validation_r = {
        str(t): {g: (None if not np.isfinite(v) else round(float(v), 4)) for g, v in row.items()}
        for t, row in r.iterrows()
    }
    meta = {
        "cohort": cohort.summary(),
        "validation_r": validation_r,
        "folds": {s: int(f) for s, f in zip(result.sample_ids, result.folds, strict=False)},
        "training": {**(result.config.fingerprint() if result.config else {}), "histories": result.histories},
    }
    meta.update(extra or {})
    return meta


# ------------------------------------------------------------------------------------ cached features


class _LazyTileFeatures(Mapping):
    """All-tile features per sample, read from the feature cache when a batch needs them (not kept)."""

    def __init__(self, load: Callable[[str], np.ndarray], ids: Sequence[str]) -> None:
        self._load, self._ids = load, list(ids)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._load(key)

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids


def cohort_features(
    samples: pd.DataFrame,
    backbone: str,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    supertiles: bool = True,
    supertile_k: int = 100,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Mapping[str, np.ndarray], dict[str, str]]:
    """Features of every sample of a sample sheet, from the feature cache (extracted when missing).

    Uses :func:`napari_he2rna.features.load_or_extract` on the sheet's ``slide`` column, so the cache is
    shared with ``he2rna extract`` and the viewer.

    Parameters
    ----------
    samples
        From :func:`load_samples`, with a ``slide`` column.
    supertiles
        True: ``(<= supertile_k, dim)`` supertile features per sample, all loaded now; False: all tiles,
        loaded per batch during training.

    Returns
    -------
    (features, failed)
        A mapping ``sample_id -> array`` of the samples with features, and ``{sample_id: reason}`` for those
        whose slide could not be read.
    """
    from . import features as feat
    from .errors import Cancelled, He2rnaError
    from .slide import open_slide

    if "slide" not in samples.columns:
        raise DataError("The sample sheet has no 'slide' column: features cannot be found for the samples.")
    bb = feat.get_backbone(backbone, device=device)
    failed: dict[str, str] = {}

    def load(sid: str) -> np.ndarray:
        with open_slide(samples.loc[sid, "slide"]) as slide:
            grid, tiles = feat.load_or_extract(
                slide,
                bb,
                tile_um=tile_um,
                cache_dir=cache_dir,
                device=device,
                supertile_k=supertile_k,
                cancel=cancel,
            )
            if not supertiles:
                return tiles
            try:
                st, _ = feat.read_supertiles(feat.cache_path(slide, bb, tile_um, cache_dir))
            except Exception:  # noqa: BLE001 - an old store without supertiles: compute them
                st, _ = feat.supertiles(grid, tiles, k=supertile_k)
            return st

    ids = [str(s) for s in samples.index]
    out: dict[str, np.ndarray] = {}
    for i, sid in enumerate(ids):
        check_cancel(cancel)
        slide_path = samples.loc[sid, "slide"]
        if not isinstance(slide_path, str) or not slide_path:
            failed[sid] = "no slide given"
        elif not Path(slide_path).is_file():
            failed[sid] = f"slide file not found: {slide_path}"
        else:
            try:
                arr = load(sid)  # in tile mode too: extract now, so training only reads the cache
                if supertiles:
                    out[sid] = arr
            except Cancelled:
                raise
            except He2rnaError as exc:
                failed[sid] = str(exc)
        report(progress, i + 1, len(ids), sid)
    if supertiles:
        return out, failed
    return _LazyTileFeatures(load, [s for s in ids if s not in failed]), failed
