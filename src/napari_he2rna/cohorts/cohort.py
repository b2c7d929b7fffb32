"""A cohort: expression table, sample sheet and slide features, matched by sample id.

A cohort is three things matched by sample id: an expression table (samples x genes), a sample sheet
(sample id, patient id, cancer type, slide) and one feature matrix per sample (``(n_tiles, dim)``: the
supertiles of the slide, or all its tiles). Features are given as a mapping ``sample_id -> array`` (a dict,
or a lazy :class:`LazyFeatures`) or a callable ``sample_id -> array``, so training can be tested without
slides; :func:`cohort_features` builds that mapping from the feature cache of
:mod:`napari_he2rna.features`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report

FeatureSource = Mapping[str, np.ndarray] | Callable[[str], np.ndarray]

#: Above this, a table is taken to hold raw FPKM-UQ (log10(1 + FPKM-UQ) of real genes stays below ~7).
RAW_THRESHOLD = 50.0

SAMPLE_COLUMNS = ("sample_id", "patient_id", "cancer_type")

#: Column names that hold slide paths in sheets of other tools (any case); one of them is taken as ``slide``.
SLIDE_COLUMN_NAMES = ("slide", "slide_path", "path", "file", "file_name", "filename", "wsi", "image")

# ------------------------------------------------------------------------------------------ cohort data


def read_table(path: Path) -> pd.DataFrame:
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

    Genes with missing (NaN) or infinite values are left out, never imputed or clipped, and named in
    ``attrs`` (:func:`dropped_genes_summary` says which).

    Returns
    -------
    pd.DataFrame
        float32, index = sample ids (str), columns = genes. ``attrs`` records the transform, what was
        dropped and whether the table was read as genes x samples.
    """
    if isinstance(path, pd.DataFrame):
        df = path.copy()
        name = "the expression table"
    else:
        path = Path(path)
        name = path.name
        df = read_table(path)
        df = df.set_index(df.columns[0])
    if genes_as_rows:
        df = df.T
    elif _lists_genes(df):
        raise DataError(
            f"{name} looks like genes x samples (its first column, {df.index.name!r}, lists genes): "
            "pass --genes-as-rows."
        )
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
    inf_genes = np.isinf(values).any(axis=0) & ~nan_genes  # left out as NaN genes are, never clipped
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0 and transform != "log":
        raise DataError(f"{name} has negative values: give FPKM-UQ or log10(1 + FPKM-UQ) values.")
    if transform == "auto":
        transform = "raw" if finite.size and finite.max() > RAW_THRESHOLD else "log"
    if transform == "raw":
        with np.errstate(invalid="ignore"):  # -inf: its gene is left out below
            values = np.log10(1.0 + values)
    elif transform != "log":
        raise DataError(f"Unknown expression transform {transform!r} (use auto, raw or log).")
    keep = ~nan_genes & ~inf_genes
    zero_median = np.zeros_like(keep)
    if filter_zero_median:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes: reported below, by name
            med = np.nanmedian(values, axis=0)
        zero_median = (med == 0) & keep
        keep &= ~zero_median
    if not keep.any():
        raise DataError(
            f"{name} has no gene left: {int(nan_genes.sum())} genes have missing values, "
            f"{int(inf_genes.sum())} infinite values and {int(zero_median.sum())} a zero median."
        )
    out = pd.DataFrame(values[:, keep].astype(np.float32), index=df.index, columns=df.columns[keep])
    out.index.name = "sample_id"
    dropped = {str(g): "missing values" for g in df.columns[nan_genes]}
    dropped.update({str(g): "infinite values" for g in df.columns[inf_genes]})
    dropped.update({str(g): "zero median" for g in df.columns[zero_median]})
    # where each left-out infinite gene has its first infinite value: the summary names gene and sample
    first_inf = np.isinf(values[:, inf_genes]).argmax(axis=0)
    out.attrs.update(
        transform="log10(1+x)" if transform == "raw" else "none (already log)",
        n_genes_in=int(df.shape[1]),
        n_genes_dropped_zero_median=int(zero_median.sum()),
        n_genes_dropped_nan=int(nan_genes.sum()),
        n_genes_dropped_infinite=int(inf_genes.sum()),
        dropped_genes=dropped,
        infinite_in={str(g): str(df.index[i]) for g, i in zip(df.columns[inf_genes], first_inf, strict=True)},
        genes_as_rows=bool(genes_as_rows),
    )
    return out


# First-column headers of a genes x samples table, and how Ensembl gene ids begin.
_GENE_HEADERS = {"gene", "genes", "gene_id", "gene_ids", "gene_name", "gene_symbol", "symbol", "hugo_symbol"}
_GENE_ID_PREFIXES = ("ENSG", "ENSMUSG")


def _lists_genes(df: pd.DataFrame) -> bool:
    """Whether the row labels of a samples x genes table are in fact genes (a transposed table)."""
    if str(df.index.name).strip().lower() in _GENE_HEADERS:
        return True
    labels = df.index.astype(str)
    return len(labels) > 0 and float(np.mean([s.startswith(_GENE_ID_PREFIXES) for s in labels])) > 0.5


def genes_as_rows_hint(expression: pd.DataFrame, sample_ids: Sequence[str]) -> str:
    """A hint (starting with a space) when the expression table's *columns* are the sample ids, else ''."""
    ids = set(map(str, sample_ids))
    in_columns = sum(str(c) in ids for c in expression.columns)
    in_rows = sum(str(i) in ids for i in expression.index)
    if in_columns > in_rows and expression.attrs.get("genes_as_rows"):
        return (
            f" {in_columns} sample ids are read as genes because of --genes-as-rows: the expression table "
            "is samples x genes already, leave --genes-as-rows out."
        )
    if in_columns > in_rows:
        return (
            f" {in_columns} sample ids are column names of the expression table: it is genes x samples, "
            "pass --genes-as-rows."
        )
    return ""


def find_column(columns: Sequence[Any], wanted: str, sheet: str, what: str = "column") -> str:
    """The column named ``wanted`` as written; else the one that matches it ignoring case and spaces.

    Raises :class:`DataError` naming the sheet's columns when none (or several ignoring case) match.
    """
    names = [str(c) for c in columns]
    if wanted in names:
        return wanted
    folded = [c for c in names if c.strip().lower() == str(wanted).strip().lower()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        raise DataError(f"{sheet} has several columns named {wanted!r} ({', '.join(folded)}); rename one.")
    raise DataError(f"{sheet} has no {what} {wanted!r} (columns: {', '.join(names)}).")


def slide_column(columns: Sequence[Any], sheet: str, chosen: str | None = None) -> str | None:
    """The column of a sheet that holds the slide paths, or None when it has none.

    ``chosen`` (``--slide-column``) names it; otherwise the one column of :data:`SLIDE_COLUMN_NAMES` (any
    case) is taken. Raises :class:`DataError` when ``chosen`` is not a column, or when several candidate
    columns are present (the sentence names them and ``--slide-column``).
    """
    if chosen:
        return find_column(columns, chosen, sheet, "slide column")
    found = [str(c) for c in columns if str(c).strip().lower() in SLIDE_COLUMN_NAMES]
    if len(found) > 1:
        raise DataError(
            f"{sheet} has several columns that could hold the slides ({', '.join(found)}); "
            "choose one with --slide-column NAME."
        )
    return found[0] if found else None


def resolve_slide_paths(values: Iterable[Any], base: Path | None) -> list[Any]:
    """Slide paths of a sheet, relative ones resolved against the sheet's folder ``base`` (``~`` expanded)."""
    out = []
    for v in values:
        if isinstance(v, str) and v.strip():
            p = Path(v.strip()).expanduser()
            out.append(str(p if p.is_absolute() or base is None else base / p))
        else:
            out.append(v)
    return out


def load_samples(path: str | Path | pd.DataFrame, slide_column_name: str | None = None) -> pd.DataFrame:
    """Read a sample sheet: ``sample_id``, ``patient_id``, ``cancer_type`` and optionally the slides.

    The three required columns are matched ignoring case; the slide column is the one
    :func:`slide_column` finds (``slide``, ``slide_path``, ``file_name`` ... or ``slide_column_name``) and
    comes back as ``slide``. Other columns keep their names as written. Returns a DataFrame indexed by
    sample id (str). Relative slide paths are resolved against the sheet's folder.
    """
    if isinstance(path, pd.DataFrame):
        df, name, base = path.copy(), "the sample sheet", None
    else:
        path = Path(path)
        df, name, base = read_table(path), path.name, path.parent
    df.columns = [str(c).strip() for c in df.columns]
    if (
        df.index.name is not None
        and str(df.index.name).lower() == "sample_id"
        and not any(c.lower() == "sample_id" for c in df.columns)
    ):
        df = df.reset_index()
    rename = {}
    for c in SAMPLE_COLUMNS:
        hits = [col for col in df.columns if col.lower() == c]
        if len(hits) == 1:
            rename[hits[0]] = c
    df = df.rename(columns=rename)
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
    slides = slide_column(df.columns, name, slide_column_name)
    if slides is not None and slides != "slide":
        df = df.rename(columns={"slide": "slide (not used)"}).rename(columns={slides: "slide"})
    if "slide" in df.columns:
        df["slide"] = resolve_slide_paths(df["slide"], base)
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


class LazyFeatures(Mapping):
    """Features per sample read when asked for (never kept): a callable ``sample_id -> array`` seen as a
    mapping over ``ids``.

    ``tiles`` (optional) gives every tile of a sample when the mapping holds summaries (supertiles), and
    ``tile_mean`` the mean over all tiles; without them both fall back to the rows themselves.
    """

    def __init__(
        self,
        load: Callable[[str], np.ndarray],
        ids: Sequence[str],
        tiles: Callable[[str], np.ndarray] | None = None,
        tile_mean: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self._load, self._ids = load, list(ids)
        self._set = set(self._ids)
        self._tiles, self._tile_mean = tiles, tile_mean

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._set:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def tiles(self, key: str) -> np.ndarray:
        return self._tiles(key) if self._tiles is not None else self[key]

    def tile_mean(self, key: str) -> np.ndarray:
        if self._tile_mean is not None:
            return self._tile_mean(key)
        return np.asarray(self[key], dtype=np.float64).mean(axis=0)


def all_tiles(features: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """Every tile's features of a sample (``features.tiles`` when it holds supertiles, else its rows)."""
    get = getattr(features, "tiles", None)
    return np.asarray(get(key) if callable(get) else features[key], dtype=np.float32)


def tile_mean(features: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """The mean feature over all tiles of a sample, ``(dim,)`` float64 (weighted by supertile sizes when
    the mapping holds supertiles and knows them)."""
    get = getattr(features, "tile_mean", None)
    if callable(get):
        return np.asarray(get(key), dtype=np.float64)
    return np.asarray(features[key], dtype=np.float64).mean(axis=0)


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
        features = LazyFeatures(features, sheet_ids)
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
            + genes_as_rows_hint(expression, sheet_ids)
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


# ------------------------------------------------------------------------------------ cached features


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
) -> tuple[LazyFeatures | dict[str, np.ndarray], dict[str, str]]:
    """Features of every sample of a sample sheet, from the feature cache (extracted when missing).

    Uses :func:`napari_he2rna.features.cache.load_or_extract` on the sheet's ``slide`` column, so the cache is
    shared with ``he2rna extract`` and the viewer.

    Parameters
    ----------
    samples
        From :func:`load_samples`, with a ``slide`` column.
    supertiles
        True: ``(<= supertile_k, dim)`` supertile features per sample, loaded now and kept; False: all tiles,
        read from the cache per batch during training.

    Returns
    -------
    (features, failed)
        A :class:`LazyFeatures` mapping ``sample_id -> array`` of the samples with features (its ``tiles``
        reads all tiles of a sample, ``tile_mean`` their mean), and ``{sample_id: reason}`` for those whose
        slide could not be read.
    """
    from ..errors import Cancelled, He2rnaError
    from ..features import cache as feature_cache
    from ..features.backbones import get_backbone
    from ..features.extraction import supertiles as make_supertiles
    from ..slides.slide import open_slide

    if "slide" not in samples.columns:
        raise DataError("The sample sheet has no 'slide' column: features cannot be found for the samples.")
    bb = get_backbone(backbone, device=device)
    failed: dict[str, str] = {}
    stores: dict[str, Path] = {}
    shapes: dict[str, tuple[int, int]] = {}  # of each store checked when opened: later reads check only this
    kept: dict[str, np.ndarray] = {}
    means: dict[str, np.ndarray] = {}

    def extract(slide) -> tuple[Any, np.ndarray]:
        return feature_cache.load_or_extract(
            slide, bb, tile_um=tile_um, cache_dir=cache_dir, device=device, supertile_k=supertile_k,
            cancel=cancel,
        )  # fmt: skip

    def read_tiles(sid: str) -> np.ndarray:
        try:
            return feature_cache.read_features(stores[sid], shapes[sid])
        except He2rnaError:  # the store went away or broke since: check it again, else extract again
            try:
                tiles = feature_cache.read_cache(stores[sid])[1]
            except He2rnaError:
                with open_slide(samples.loc[sid, "slide"]) as slide:
                    tiles = extract(slide)[1]
            shapes[sid] = tiles.shape
            return tiles

    def read_train(sid: str) -> np.ndarray:
        return kept[sid] if supertiles else read_tiles(sid)

    def read_mean(sid: str) -> np.ndarray:
        if sid not in means:
            means[sid] = read_tiles(sid).astype(np.float64).mean(axis=0)
        return means[sid]

    ids = [str(s) for s in samples.index]
    for i, sid in enumerate(ids):
        check_cancel(cancel)
        slide_path = samples.loc[sid, "slide"]
        if not isinstance(slide_path, str) or not slide_path:
            failed[sid] = "no slide given"
        elif not Path(slide_path).is_file():
            failed[sid] = f"slide file not found: {slide_path}"
        else:
            try:
                with open_slide(slide_path) as slide:
                    grid, tiles = extract(slide)  # in tile mode too: extract now, train reads the cache
                    stores[sid] = feature_cache.cache_path(slide, bb, tile_um, cache_dir)
                shapes[sid] = tiles.shape
                means[sid] = tiles.astype(np.float64).mean(axis=0)
                if supertiles:
                    try:
                        st, _ = feature_cache.read_supertiles(stores[sid])
                    except Exception:  # noqa: BLE001 - an old store without supertiles: compute them
                        st, _ = make_supertiles(grid, tiles, k=supertile_k)
                    kept[sid] = st
            except Cancelled:
                raise
            except He2rnaError as exc:
                failed[sid] = str(exc)
        report(progress, i + 1, len(ids), sid)
    ok = [s for s in ids if s not in failed]
    return LazyFeatures(read_train, ok, tiles=read_tiles, tile_mean=read_mean), failed


def dropped_genes_summary(expression: pd.DataFrame, shown: int = 5) -> str:
    """One line naming the genes :func:`load_expression` left out and why (empty when none)."""
    dropped: dict[str, str] = expression.attrs.get("dropped_genes") or {}
    if not dropped:
        return ""
    parts = []
    where = expression.attrs.get("infinite_in") or {}
    for why in ("missing values", "infinite values", "zero median"):
        genes = [g for g, w in dropped.items() if w == why]
        if genes:
            names = ", ".join(g + (f" in sample {where[g]}" if g in where else "") for g in genes[:shown])
            names += f" and {len(genes) - shown} more" if len(genes) > shown else ""
            parts.append(f"{len(genes)} with {why} ({names})")
    hint = ""
    n_in = int(expression.attrs.get("n_genes_in", 0) or 0)
    n_nan = sum(1 for w in dropped.values() if w == "missing values")
    if n_in and n_nan > 0.1 * n_in:
        hint = "; many genes have missing values: fill or remove them (NaN cells are never imputed)"
    if any(w == "infinite values" for w in dropped.values()):
        hint += "; infinite values are left out with their genes, never clipped: fix them to keep those genes"
    return "genes left out: " + "; ".join(parts) + hint
