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
:func:`napari_he2rna.training.train_one`: Adam, minibatches of slides, one k per batch, mean squared error),
on standardised supertile features. The classifier is the same network with one output trained on the 0/1
label with the same squared loss (a Brier-score fit: its slide score estimates P(responder)).

Outputs are model bundles like any other: the outer fold models of a cell type in one ``.safetensors``
file whose genes are named ``"<cell type> <gene>"`` (e.g. ``"fibroblast COL1A1"``), so ``he2rna
spatialize`` and the napari Model widget paint per-tile scores of a cell type's gene like any gene. Folds may
have chosen different widths: a narrower network is zero-padded to the widest one, which leaves its outputs
exactly unchanged (a padded unit has zero weights in and out). The standardisation of each fold is folded into
its first layer, so a bundle takes raw features.

Significance of a gene (per cell type and cancer type) follows :mod:`napari_he2rna.evaluation`: Pearson R on
the outer test folds (within each fold, averaged over folds) against the R of the same fold architecture
untrained on the same test samples (pooled over genes and random inits), one-sided empirical p,
Holm–Šidák and Benjamini–Hochberg over the genes of that cell type. The responder classifier reports the
ROC AUC over patients (a patient's score is the mean over its samples) on the outer test folds, with a
one-sided Mann–Whitney p (AUC > 0.5).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .cohort import Cohort, load_expression, read_table
from .devices import resolve_device
from .errors import DataError
from .evaluation import Evaluation, evaluate, mean_r_by_type, pearson_columns
from .folds import group_folds
from .folds import patient_auc as patient_auc
from .jobs import CancelToken, ProgressCallback, check_cancel, report
from .model import HE2RNA, SUPERTILE_KS, json_default, save_bundle
from .safe_output import atomic_write_text, prepare_folder
from .scaling import FeatureScaler, ScaledFeatures
from .training import (
    SlideBatches,
    TrainConfig,
    predict_slides,
    train_one,
    untrained_predictions,
)

ABUNDANCE = "abundance"
RESPONDER = "responder"
TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".txt", ".txt.gz")


def target_name(cell_type: str, gene: str) -> str:
    """The output name of a cell type's gene in a bundle: ``"fibroblast COL1A1"``."""
    return f"{cell_type} {gene}"


def abundance_name(cell_type: str) -> str:
    """The output name of a cell type's abundance in the abundance bundle: ``"fibroblast abundance"``."""
    return f"{cell_type} {ABUNDANCE}"


# ------------------------------------------------------------------------------------------ reading


@dataclass
class DeconvolvedTargets:
    """Deconvolution output per sample: expression per cell type and (optionally) abundances.

    ``expression[cell_type]`` is samples x genes (log10(1 + FPKM)), ``abundance`` samples x cell types. All
    tables list the same samples (checked when read).
    """

    expression: dict[str, pd.DataFrame]
    abundance: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cell_types(self) -> list[str]:
        return list(self.expression)

    @property
    def sample_ids(self) -> list[str]:
        first = next(iter(self.expression.values()), None)
        if first is not None:
            return list(first.index)
        return list(self.abundance.index) if self.abundance is not None else []


def _table_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(TABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _find_celltype_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"Cell-type expression folder {folder} does not exist.")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(TABLE_SUFFIXES):
            stem = _table_stem(p)
            if stem in files:
                raise DataError(
                    f"{folder} holds two tables for cell type {stem!r} ({files[stem].name}, {p.name})."
                )
            files[stem] = p
    if not files:
        raise DataError(
            f"{folder} holds no cell-type expression table "
            "(expected one <cell type>.tsv or .csv per cell type)."
        )
    return files


def _same_samples(tables: Mapping[str, pd.DataFrame], what: Mapping[str, str]) -> None:
    """Raise :class:`DataError` unless every table lists the same samples (order may differ)."""
    items = list(tables.items())
    ref_key, ref = items[0]
    ref_ids = set(ref.index)
    for key, tab in items[1:]:
        ids = set(tab.index)
        if ids != ref_ids:
            only_here = sorted(ids - ref_ids)
            only_ref = sorted(ref_ids - ids)
            raise DataError(
                f"{what[key]} and {what[ref_key]} list different samples: {len(only_here)} only in "
                f"{what[key]} (e.g. {only_here[:3]}), {len(only_ref)} only in {what[ref_key]} "
                f"(e.g. {only_ref[:3]}); deconvolved tables must cover the same samples."
            )


def read_celltype_expression(
    source: str | Path | Mapping[str, str | Path | pd.DataFrame],
    cell_types: Sequence[str] | None = None,
    transform: str = "auto",
    filter_zero_median: bool = True,
) -> dict[str, pd.DataFrame]:
    """Read the cell-type-specific expression tables (samples x genes per cell type).

    Parameters
    ----------
    source
        A folder with one table per cell type named ``<cell type>.tsv`` (or ``.csv``, gzip ok; first column
        the sample id), or a mapping ``cell type -> path or DataFrame``.
    cell_types
        Only these cell types (each must have a table); default all found.
    transform, filter_zero_median
        See :func:`napari_he2rna.training.load_expression`: ``"raw"`` FPKM is turned into log10(1 + FPKM),
        ``"log"`` is kept, ``"auto"`` decides per table (raw when any value exceeds 50). Genes with a zero
        median in a cell type are dropped (not expressed there) unless ``filter_zero_median`` is False.

    Returns
    -------
    dict
        ``cell type -> DataFrame`` float32, index sample ids (str), columns genes.

    Raises
    ------
    DataError
        A requested cell type has no table, a table is unreadable, has non-numeric values or duplicate
        samples, or the tables do not list the same samples.
    """
    if isinstance(source, Mapping):
        files: dict[str, Any] = {str(k): v for k, v in source.items()}
        where = "the given tables"
    else:
        folder = Path(source)
        files = _find_celltype_files(folder)
        where = str(folder)
    if cell_types is not None:
        missing = [c for c in cell_types if c not in files]
        if missing:
            raise DataError(
                f"No expression table for cell type(s) {', '.join(map(repr, missing))} in {where} "
                f"(found: {', '.join(files) or 'none'}); expected <cell type>.tsv or .csv."
            )
        files = {c: files[c] for c in cell_types}
    if not files:
        raise DataError("No cell type was given.")
    tables: dict[str, pd.DataFrame] = {}
    labels: dict[str, str] = {}
    for ct, src in files.items():
        if not isinstance(src, pd.DataFrame) and not Path(src).is_file():
            raise DataError(f"Expression table of cell type {ct!r} ({src}) does not exist.")
        labels[ct] = f"the {ct} table" if isinstance(src, pd.DataFrame) else Path(src).name
        tables[ct] = load_expression(src, transform=transform, filter_zero_median=filter_zero_median)
    _same_samples(tables, labels)
    return tables


def read_abundance(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read cell-type abundances, samples x cell types (fractions or any non-negative scale).

    The first column holds the sample ids. Returns float32, index sample ids (str).

    Raises
    ------
    DataError
        Unreadable table, non-numeric or missing values, negative values, duplicate samples.
    """
    if isinstance(source, pd.DataFrame):
        df, name = source.copy(), "the abundance table"
    else:
        path = Path(source)
        df, name = read_table(path), path.name
        df = df.set_index(df.columns[0])
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise DataError(f"{name} has no samples or no cell types.")
    if df.index.duplicated().any():
        raise DataError(
            f"{name} lists samples more than once (e.g. {df.index[df.index.duplicated()][:3].tolist()})."
        )
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise DataError(
            f"{name} has non-numeric values in column(s) {non_numeric[:3]}; it must be samples x cell types "
            "with the sample id in the first column."
        )
    values = df.to_numpy(np.float64)
    if not np.isfinite(values).all():
        bad = df.columns[~np.isfinite(values).all(axis=0)].tolist()
        raise DataError(f"{name} has empty, NaN or infinite values (cell types {bad[:3]}).")
    if (values < 0).any():
        raise DataError(f"{name} has negative abundances.")
    out = pd.DataFrame(values.astype(np.float32), index=df.index, columns=df.columns)
    out.index.name = "sample_id"
    return out


def load_deconvolved(
    expression: str | Path | Mapping[str, str | Path | pd.DataFrame] | None,
    abundance: str | Path | pd.DataFrame | None = None,
    cell_types: Sequence[str] | None = None,
    transform: str = "auto",
    filter_zero_median: bool = True,
) -> DeconvolvedTargets:
    """Cell-type expression tables and the abundance table, checked to cover the same samples.

    See :func:`read_celltype_expression` and :func:`read_abundance`.
    """
    if expression is None and abundance is None:
        raise DataError("Give cell-type expression tables, an abundance table, or both.")
    expr = (
        read_celltype_expression(expression, cell_types, transform, filter_zero_median)
        if expression is not None
        else {}
    )
    notes = []
    for ct, tab in expr.items():
        dropped = tab.attrs.get("n_genes_dropped_zero_median", 0) + tab.attrs.get("n_genes_dropped_nan", 0)
        if dropped:
            notes.append(
                f"{ct}: {dropped} of {tab.attrs.get('n_genes_in')} genes dropped (zero median or NaN)"
            )
    ab = read_abundance(abundance) if abundance is not None else None
    if ab is not None and expr:
        first = next(iter(expr))
        name = Path(abundance).name if not isinstance(abundance, pd.DataFrame) else "the abundance table"
        _same_samples(
            {first: expr[first], ABUNDANCE: ab}, {first: f"{first}'s expression table", ABUNDANCE: name}
        )
    return DeconvolvedTargets(expression=expr, abundance=ab, notes=notes)


def read_responders(
    source: str | Path | pd.DataFrame, label_column: str = RESPONDER, positive: Any | None = None
) -> pd.Series:
    """0/1 responder label per sample from a table with ``sample_id`` and ``label_column``.

    ``positive`` names the value of class 1 (default: 1/True, see
    :func:`napari_he2rna.transfer.binary_labels`). Rows without a label are left out.
    """
    from .transfer import binary_labels

    if isinstance(source, pd.DataFrame):
        df, name = source.copy(), "the responder table"
        if "sample_id" not in df.columns and df.index.name == "sample_id":
            df = df.reset_index()
    else:
        df, name = read_table(Path(source)), Path(source).name
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("sample_id", label_column):
        if col not in df.columns:
            raise DataError(f"{name} lacks the column {col!r} (has {', '.join(df.columns)}).")
    df = df[df[label_column].notna()]
    if df.empty:
        raise DataError(f"{name} has no labelled sample.")
    df["sample_id"] = df["sample_id"].astype(str)
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].head(3).tolist()
        raise DataError(f"{name} lists samples more than once (e.g. {dup}).")
    labels = binary_labels(df[label_column], positive)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{name}: every sample has the same label; a classifier needs both classes.")
    return pd.Series(labels, index=pd.Index(df["sample_id"], name="sample_id"), name=RESPONDER)


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


# ------------------------------------------------------------------------------------------ evaluation


def untrained_null(
    result: NestedCVResult, features: Mapping[str, np.ndarray], samples: pd.DataFrame, seed: int = 12345
) -> np.ndarray:
    """Predictions of each outer fold's architecture, untrained, on that fold's test samples.

    Returns
    -------
    np.ndarray
        ``(null_inits, n_samples, n_outputs)``, the null of :func:`napari_he2rna.evaluation.evaluate`.
    """
    cfg = result.config
    pos = {s: i for i, s in enumerate(result.sample_ids)}
    out = np.full((cfg.null_inits, len(pos), len(result.names)), np.nan, dtype=np.float32)
    for o in result.outer:
        test = o.test_ids
        cohort = Cohort(
            expression=result.oof.loc[test],  # only its index and width are used
            samples=samples.loc[test],
            features=ScaledFeatures(features, FeatureScaler(o.feature_mean, o.feature_std)),
        )
        out[:, [pos[s] for s in test]] = untrained_predictions(
            cohort,
            cfg.hidden(o.width),
            cfg.null_inits,
            cfg.ks,
            cfg.dropout,
            seed=seed,
            device=cfg.device,
            standardize=False,  # already scaled with the outer fold's training samples
        )
    return out


def evaluate_regression(
    result: NestedCVResult,
    targets: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    samples: pd.DataFrame,
) -> Evaluation:
    """Per output and cancer type: Pearson R on the outer test folds, untrained null, Holm–Šidák and BH.

    See :func:`napari_he2rna.evaluation.evaluate` (R within each outer fold, averaged over folds).
    """
    cfg = result.config
    null = untrained_null(result, features, samples) if cfg.null_inits > 0 else None
    truth = targets.loc[result.sample_ids, result.names]
    types = samples.loc[result.sample_ids, "cancer_type"].astype(str).to_numpy()
    with np.errstate(divide="ignore"):  # statsmodels' Holm-Sidak takes log1p(-p), -inf for p = 1: harmless
        return evaluate(truth, result.oof, types, result.folds, null, alpha=cfg.alpha)


def evaluate_classifier(result: NestedCVResult, labels: pd.Series, samples: pd.DataFrame) -> dict[str, Any]:
    """ROC AUC of the outer test predictions over patients (pooled folds, per fold, per cancer type).

    ``p_mann_whitney``: one-sided Mann–Whitney U test that responders' patient scores are higher (AUC > 0.5).
    """
    from scipy.stats import mannwhitneyu

    ids = result.sample_ids
    score = result.oof.iloc[:, 0].to_numpy(np.float64)
    y = labels.loc[ids].to_numpy(np.float64)
    patients = samples.loc[ids, "patient_id"].astype(str).to_numpy()
    types = samples.loc[ids, "cancer_type"].astype(str).to_numpy()
    per = pd.DataFrame({"s": score, "y": y, "p": patients}).groupby("p").agg(s=("s", "mean"), y=("y", "max"))
    pos, neg = per.loc[per["y"] == 1, "s"], per.loc[per["y"] == 0, "s"]
    p_mw = (
        float(mannwhitneyu(pos, neg, alternative="greater").pvalue) if len(pos) and len(neg) else float("nan")
    )
    fold_auc = [
        patient_auc(score[result.folds == f], y[result.folds == f], patients[result.folds == f])
        for f in range(len(result.outer))
    ]
    type_auc = {
        t: patient_auc(score[types == t], y[types == t], patients[types == t]) for t in sorted(set(types))
    }

    def clean(v: float) -> float | None:
        return None if not np.isfinite(v) else round(float(v), 4)

    return {
        "auc_patients": clean(patient_auc(score, y, patients)),
        "p_mann_whitney": None if not np.isfinite(p_mw) else float(f"{p_mw:.3g}"),
        "auc_per_outer_fold": [clean(a) for a in fold_auc],
        "auc_outer_fold_mean": clean(float(np.nanmean(fold_auc))) if np.isfinite(fold_auc).any() else None,
        "auc_per_cancer_type": {t: clean(a) for t, a in type_auc.items()},
        "n_samples": int(len(ids)),
        "n_patients": int(len(per)),
        "n_responder_patients": int(len(pos)),
    }


# ------------------------------------------------------------------------------------------ bundles


def _padded(model: HE2RNA, hidden: Sequence[int]) -> HE2RNA:
    """The same function with wider hidden layers: extra units get zero weights in and out (and bias 0)."""
    out = HE2RNA(model.input_dim, model.n_genes, hidden, model.dropout_p)
    with torch.no_grad():
        for src, dst in zip(model.layers, out.layers, strict=True):
            dst.weight.zero_()
            dst.bias.zero_()
            o, i, _ = src.weight.shape
            dst.weight[:o, :i] = src.weight
            dst.bias[:o] = src.bias
    return out


def bundle_models(result: NestedCVResult) -> list[HE2RNA]:
    """The outer fold models, padded to one architecture and taking raw (unstandardised) features."""
    hidden = result.config.hidden(max(o.width for o in result.outer))
    out = []
    for model, o in zip(result.models, result.outer, strict=True):
        m = _padded(model, hidden)
        FeatureScaler(o.feature_mean, o.feature_std).fold_into(m)
        out.append(m.eval())
    return out


def save_result_bundle(
    path: str | Path,
    result: NestedCVResult,
    backbone: str,
    tile_um: float,
    samples: pd.DataFrame,
    evaluation: Evaluation | dict | None = None,
    extra: Mapping[str, Any] | None = None,
    demo: bool = False,
) -> Path:
    """Write the outer fold models of a nested CV as one model bundle (genes = ``result.names``).

    Metadata: ``folds`` (outer fold per sample, so :func:`napari_he2rna.training.bundle_oof_predictions`
    gives back the outer test predictions), ``validation_r`` (outer-test R per cancer type, regression),
    ``cohort`` and ``slide_ex`` (task, grid, the choice of every outer fold, evaluation summary).
    """
    models = bundle_models(result)
    sheet = samples.loc[result.sample_ids]
    counts = sheet["cancer_type"].astype(str).value_counts().sort_index()
    cfg = result.config
    info: dict[str, Any] = {
        "task": result.task,
        "outer_folds": len(result.outer),
        "inner_folds": cfg.inner_folds,
        "grid": {"widths": list(cfg.widths), "layers": cfg.layers, "epochs": list(cfg.epochs)},
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "choices": result.choices(),
        "note": (
            "outer fold models (nested CV); narrower folds zero-padded to the widest; the standardisation of "
            "each fold (outer training samples) is folded into its first layer: the bundle takes raw features"
        ),
    }
    meta: dict[str, Any] = {
        "cohort": {
            "n_samples": int(len(sheet)),
            "n_patients": int(sheet["patient_id"].nunique()),
            "n_genes": len(result.names),
            "cancer_types": {str(k): int(v) for k, v in counts.items()},
        },
        "folds": {s: int(f) for s, f in zip(result.sample_ids, result.folds, strict=True)},
        "slide_ex": info,
    }
    if isinstance(evaluation, Evaluation):
        wide = evaluation.per_gene.pivot(index="cancer_type", columns="gene", values="r")
        meta["validation_r"] = {
            str(t): {str(g): (None if not np.isfinite(v) else round(float(v), 4)) for g, v in row.items()}
            for t, row in wide.iterrows()
        }
        info["summary"] = json.loads(evaluation.summary.to_json(orient="records"))
        if "significant" in evaluation.per_gene:
            sig = evaluation.per_gene[evaluation.per_gene["significant"].astype(bool)]
            info["significant_holm_sidak"] = {
                str(t): sorted(sub["gene"].astype(str)) for t, sub in sig.groupby("cancer_type")
            }
    elif isinstance(evaluation, dict):
        info["evaluation"] = evaluation
    meta.update(extra or {})
    dim = models[0].input_dim
    return save_bundle(path, models, result.names, backbone, dim, tile_um, cfg.ks, meta, demo=demo)


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass
class SlideExResult:
    """Everything one SLIDE-EX run produced (see :func:`run_slide_ex`)."""

    samples: pd.DataFrame  # matched sample sheet (index sample ids)
    folds: pd.Series  # outer fold per sample (shared by every task)
    celltypes: dict[str, NestedCVResult] = field(default_factory=dict)
    abundance: NestedCVResult | None = None
    responder: NestedCVResult | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)  # cell type or "abundance"
    responder_evaluation: dict[str, Any] | None = None
    original_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # output -> (cell type, gene)
    notes: list[str] = field(default_factory=list)
    config: NestedCVConfig | None = None

    def regressions(self) -> dict[str, NestedCVResult]:
        out = dict(self.celltypes)
        if self.abundance is not None:
            out[ABUNDANCE] = self.abundance
        return out

    def per_gene(self) -> pd.DataFrame:
        """One row per (target, cancer type, output): R on the outer test folds, p-values, significance."""
        frames = []
        for target, ev in self.evaluations.items():
            df = ev.per_gene.rename(columns={"gene": "name"}).copy()
            df.insert(0, "target", target)
            df.insert(1, "cell_type", [self.original_names.get(n, ("", ""))[0] for n in df["name"]])
            df.insert(2, "gene", [self.original_names.get(n, ("", ""))[1] for n in df["name"]])
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _short(self, target: str, name: str) -> str:
        """A cell type's gene without the cell type; abundances keep their full name."""
        ct, gene = self.original_names.get(name, ("", name))
        return gene if target == ct else name

    def summary(self) -> pd.DataFrame:
        """One row per (target, cancer type): outputs, mean R, significant outputs (Holm–Šidák, BH), names."""
        rows = []
        for target, ev in self.evaluations.items():
            for _, s in ev.summary.iterrows():
                sub = ev.per_gene[ev.per_gene["cancer_type"] == s["cancer_type"]]
                row = {
                    "target": target,
                    "cancer_type": s["cancer_type"],
                    "n_samples": int(s["n_samples"]),
                    "n_outputs": int(s["n_genes"]),
                    "mean_r": float(s["mean_r"]),
                }
                if "significant" in sub:
                    sig = sub[sub["significant"].astype(bool)]
                    row.update(
                        n_significant_holm_sidak=int(len(sig)),
                        n_significant_bh=int(sub["significant_bh"].astype(bool).sum()),
                        significant=";".join(
                            self._short(target, n) for n in sig.sort_values("r", ascending=False)["gene"]
                        ),
                    )
                rows.append(row)
        return pd.DataFrame(rows)


def _renumber(folds: np.ndarray) -> np.ndarray:
    """Fold numbers 0..k-1 (a subset of samples may leave a fold empty)."""
    return np.unique(folds, return_inverse=True)[1].astype(np.int64)


def run_slide_ex(
    features: Mapping[str, np.ndarray],
    samples: pd.DataFrame,
    targets: DeconvolvedTargets,
    responders: pd.Series | None = None,
    config: NestedCVConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SlideExResult:
    """SLIDE-EX: nested CV per cell type (expression), for the abundances, and the responder classifier.

    Parameters
    ----------
    features
        ``sample_id -> (n_supertiles, dim)`` slide features.
    samples
        Sample sheet (:func:`napari_he2rna.training.load_samples`): ``patient_id``, ``cancer_type``.
    targets
        :func:`load_deconvolved`.
    responders
        :func:`read_responders` (0/1 per sample), or None to skip the classifier.
    config
        :class:`NestedCVConfig`.

    Returns
    -------
    SlideExResult

    Raises
    ------
    DataError
        Samples of the targets or the responder table missing from the sample sheet, no sample with
        features, too few patients for the folds.
    """
    config = config or NestedCVConfig()
    notes = list(targets.notes)
    ids = [str(s) for s in targets.sample_ids]
    if not ids:
        raise DataError("The deconvolved targets hold no sample.")
    resp_ids = [str(s) for s in responders.index] if responders is not None else []
    for what, group in (("deconvolved tables", ids), ("responder table", resp_ids)):
        unknown = [s for s in group if s not in samples.index]
        if unknown:
            raise DataError(
                f"{len(unknown)} samples of the {what} are not in the sample sheet (e.g. {unknown[:3]}); "
                "every sample needs a patient id so that patients are never split across folds."
            )
    all_ids = list(dict.fromkeys(ids + resp_ids))
    no_feat = [s for s in all_ids if s not in features]
    if no_feat:
        notes.append(f"{len(no_feat)} samples without features left out (e.g. {', '.join(no_feat[:3])})")
    all_ids = [s for s in all_ids if s in features]
    ids = [s for s in ids if s in features]
    if not ids:
        raise DataError("No sample of the deconvolved targets has slide features; check the sample ids.")
    sheet = samples.loc[all_ids]
    folds = pd.Series(
        outer_folds(sheet, config.outer_folds, config.seed, responders), index=all_ids, name="fold"
    )

    tasks: list[tuple[str, pd.DataFrame, str]] = []
    original: dict[str, tuple[str, str]] = {}
    for ct, tab in targets.expression.items():
        tab = tab.loc[ids]
        names = [target_name(ct, g) for g in tab.columns]
        original.update({n: (ct, str(g)) for n, g in zip(names, tab.columns, strict=True)})
        tasks.append((ct, tab.set_axis(names, axis=1), "regression"))
    if targets.abundance is not None:
        ab = targets.abundance.loc[ids]
        names = [abundance_name(c) for c in ab.columns]
        original.update({n: (str(c), ABUNDANCE) for n, c in zip(names, ab.columns, strict=True)})
        tasks.append((ABUNDANCE, ab.set_axis(names, axis=1), "regression"))
    if responders is not None:
        lab = responders.loc[[s for s in resp_ids if s in features]]
        if lab.nunique() < 2:
            raise DataError(
                "The responders with features all have the same label; the classifier needs both."
            )
        tasks.append((RESPONDER, lab.astype(np.float32).to_frame(RESPONDER), "classification"))

    per_task = config.outer_folds * (len(config.widths) * config.inner_folds + 1)
    out = SlideExResult(samples=sheet, folds=folds, original_names=original, notes=notes, config=config)
    for t, (name, tab, task) in enumerate(tasks):

        def prog(d: int, total: int, msg: str, t=t, name=name) -> None:
            report(progress, t * per_task + d, len(tasks) * per_task, f"{name}: {msg}")

        res = nested_cross_validate(
            features, tab, sheet, config, task, _renumber(folds.loc[tab.index].to_numpy()), prog, cancel
        )
        if task == "classification":
            out.responder = res
            out.responder_evaluation = evaluate_classifier(res, responders, sheet)
        else:
            if name == ABUNDANCE:
                out.abundance = res
            else:
                out.celltypes[name] = res
            out.evaluations[name] = evaluate_regression(res, tab, features, sheet)
    return out


# ------------------------------------------------------------------------------------------ writing


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return stem or "target"


def _write_text(path: Path, text: str) -> None:
    """Atomically, with the user's umask mode (see :mod:`napari_he2rna.safe_output`)."""
    prepare_folder(path.parent)
    atomic_write_text(path, text)


def _write_csv(path: Path, df: pd.DataFrame, index: bool = False) -> None:
    _write_text(path, df.to_csv(index=index, lineterminator="\n"))


def write_slide_ex(
    result: SlideExResult,
    out_dir: str | Path,
    backbone: str,
    tile_um: float = 112.0,
    demo: bool = False,
) -> dict[str, Path]:
    """Write the bundles and tables of a SLIDE-EX run into ``out_dir``.

    Files: ``models/<cell type>.safetensors`` (outputs ``"<cell type> <gene>"``),
    ``models/abundance.safetensors`` (``"<cell type> abundance"``), ``models/responder.safetensors``
    (``"responder"``), ``summary.csv``, ``per_gene.csv``, ``predictions.csv`` (outer test predictions),
    ``outer_folds.csv``,
    ``inner_scores.csv`` (the hyper-parameter grid scored in every outer fold), ``slide_ex.json`` and
    ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    extra = {"slide_ex_outputs": "see slide_ex.json next to the models folder"}
    for target, res in result.regressions().items():
        p = out / "models" / f"{_safe_stem(target)}.safetensors"
        paths[f"model:{target}"] = save_result_bundle(
            p, res, backbone, tile_um, result.samples, result.evaluations.get(target), extra, demo
        )
    if result.responder is not None:
        paths[f"model:{RESPONDER}"] = save_result_bundle(
            out / "models" / f"{RESPONDER}.safetensors",
            result.responder,
            backbone,
            tile_um,
            result.samples,
            result.responder_evaluation,
            extra,
            demo,
        )

    summary, per_gene = result.summary(), result.per_gene()
    paths["summary"], paths["per_gene"] = out / "summary.csv", out / "per_gene.csv"
    _write_csv(paths["summary"], summary)
    _write_csv(paths["per_gene"], per_gene)
    folds = result.samples[["patient_id", "cancer_type"]].assign(fold=result.folds).rename_axis("sample_id")
    paths["outer_folds"] = out / "outer_folds.csv"
    _write_csv(paths["outer_folds"], folds, index=True)
    preds, inner = [], []
    every = dict(result.regressions())
    if result.responder is not None:
        every[RESPONDER] = result.responder
    for target, res in every.items():
        long = (
            res.oof.rename_axis("sample_id")
            .reset_index()
            .melt(id_vars="sample_id", var_name="name", value_name="predicted")
        )
        long.insert(0, "target", target)
        long["outer_fold"] = long["sample_id"].map(dict(zip(res.sample_ids, res.folds, strict=True)))
        preds.append(long)
        for o in res.outer:
            tab = o.inner_scores.copy()
            tab.insert(0, "target", target)
            tab.insert(1, "outer_fold", o.fold)
            tab["chosen"] = (tab["width"] == o.width) & (tab["epochs"] == o.epochs)
            inner.append(tab)
    paths["predictions"], paths["inner_scores"] = out / "predictions.csv", out / "inner_scores.csv"
    _write_csv(paths["predictions"], pd.concat(preds, ignore_index=True))
    _write_csv(paths["inner_scores"], pd.concat(inner, ignore_index=True))

    cfg = result.config or NestedCVConfig()
    doc = {
        "config": asdict(cfg),
        "backbone": backbone,
        "tile_um": tile_um,
        "n_samples": int(len(result.samples)),
        "n_patients": int(result.samples["patient_id"].nunique()),
        "summary": json.loads(summary.to_json(orient="records")) if not summary.empty else [],
        "choices": {t: r.choices() for t, r in every.items()},
        "responder": result.responder_evaluation,
        "notes": result.notes,
        "models": {
            k.split(":", 1)[1]: str(v.relative_to(out)) for k, v in paths.items() if k.startswith("model:")
        },
    }
    paths["json"] = out / "slide_ex.json"
    _write_text(paths["json"], json.dumps(doc, indent=2, default=json_default))
    paths["report"] = out / "report.md"
    _write_text(paths["report"], _report(result, summary, per_gene, doc))
    return paths


def _report(result: SlideExResult, summary: pd.DataFrame, per_gene: pd.DataFrame, doc: dict) -> str:
    from .evaluation import md_table

    cfg = result.config or NestedCVConfig()
    lines = [
        "# SLIDE-EX: cell-type-specific expression and abundance from slide features",
        "",
        f"{doc['n_samples']} samples of {doc['n_patients']} patients; nested cross-validation with "
        f"{cfg.outer_folds} outer and {cfg.inner_folds} inner patient-grouped folds; inner grid: widths "
        f"{list(cfg.widths)} x {cfg.layers} layers, epochs {list(cfg.epochs)}.",
        "Pearson R between outer-test predictions and the deconvolved targets, per cancer type, within "
        "each outer fold and averaged over folds; significance: one-sided empirical p against the same "
        f"architecture untrained ({cfg.null_inits} inits), Holm–Šidák per cell type and cancer type, "
        f"alpha = {cfg.alpha}.",
        "",
        "## Summary",
        "",
        md_table(summary) if not summary.empty else "(no regression target)",
        "",
    ]
    if not per_gene.empty:
        cols = [
            c
            for c in ("target", "cancer_type", "name", "r", "p_empirical", "p_holm_sidak", "significant")
            if c in per_gene
        ]
        lines += ["## Per gene", "", md_table(per_gene[cols]), ""]
    if result.responder_evaluation:
        ev = result.responder_evaluation
        lines += [
            "## Direct responder classifier (baseline)",
            "",
            f"Patient-level ROC AUC on the outer test folds: {ev['auc_patients']} "
            f"(one-sided Mann–Whitney p = {ev['p_mann_whitney']}; {ev['n_patients']} patients, "
            f"{ev['n_responder_patients']} responders); "
            f"per outer fold: {ev['auc_per_outer_fold']}; per cancer type: {ev['auc_per_cancer_type']}.",
            "",
        ]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    lines += [
        "Files: summary.csv, per_gene.csv, predictions.csv, outer_folds.csv, inner_scores.csv, "
        "slide_ex.json, models/*.safetensors.",
        "",
    ]
    return "\n".join(lines)
