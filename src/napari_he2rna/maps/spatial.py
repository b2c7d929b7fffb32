"""Virtual spatialization: per-tile gene (set) scores, heatmap rasters and their exports.

HE2RNA's spatialization skips the top-k aggregation: the score of a tile for a gene is the model's predicted
expression for that tile alone (units of the training target, ``log10(1 + FPKM-UQ)``). A gene set scores the
mean of its genes. A heatmap is the score column laid back onto the tile grid: one pixel per tile, ``NaN``
off tissue, placed in µm over the slide layer.

Everything here is plain NumPy/pandas/matplotlib (Agg): no Qt, no napari. The widgets and the CLI only wire
these functions (see :mod:`napari_he2rna.session` for the per-slide state they share).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import GeneError, He2rnaError

if TYPE_CHECKING:  # only for type hints: keeps this module importable before tiling/model exist
    from ..model.bundle import ModelBundle
    from ..slides.tiling import TileGrid

#: Units of every tile score and slide prediction (the HE2RNA training target).
SCORE_UNITS = "predicted log10(1+FPKM-UQ)"

#: Built-in gene sets of the HE2RNA paper's spatialization figures.
GENE_SETS: dict[str, list[str]] = {
    "T cells": ["CD3D", "CD3E", "CD3G", "CD247"],
    "B cells": ["CD19", "MS4A1"],
    "epithelium": ["TP63", "KRT8", "KRT18"],
    "proliferation": ["MKI67"],
}

#: Tile-table columns written before the score columns of the tile CSV.
TILE_CSV_COLUMNS = [
    "tile_id",
    "row",
    "col",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "size_px",
    "size_um",
    "tissue_fraction",
]


#: ``format`` of the metadata sidecar (``<stem>.json``) that goes with a tile CSV, GeoJSON and ``.h5ad``.
TILE_METADATA_FORMAT = "napari-he2rna tile scores"


class PartialGeneSetWarning(UserWarning):
    """Some genes of a gene set are not in the model; the set is scored with the genes that are."""


class ExportError(He2rnaError):
    """An export file cannot be written (folder missing or read-only, disk full, ...)."""


class OutputExistsError(ExportError):
    """An export would overwrite an existing file and overwriting was not asked for."""


# --------------------------------------------------------------------------------------------------------
# Gene sets and names
# --------------------------------------------------------------------------------------------------------
def _split_genes(text: str) -> list[str]:
    for sep in "+,;\t":
        text = text.replace(sep, " ")
    return [g for g in text.split() if g]


def parse_gene_sets(spec: str | os.PathLike) -> dict[str, list[str]]:
    """Parse user-defined gene sets from an inline spec or a file.

    Parameters
    ----------
    spec
        Either an inline spec ``"name=G1+G2;other=G3+G4"`` (genes may also be separated by commas or spaces),
        or the path of a file: ``.json`` holding ``{"name": ["G1", "G2"], ...}``, or a GMT-like text file with
        one set per line, either ``name<TAB>description<TAB>G1<TAB>G2...`` (MSigDB GMT) or ``name=G1+G2`` /
        ``name: G1, G2``. Blank lines and lines starting with ``#`` are ignored.

    Returns
    -------
    dict
        Set name -> gene symbols, in the order given, duplicates removed.

    Raises
    ------
    GeneError
        The spec or file is malformed, or a set has no genes.
    """
    text = str(spec)
    path = Path(text).expanduser()
    looks_inline = "=" in text and not path.is_file()
    if not looks_inline and path.is_file():
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GeneError(f"cannot read the gene-set file {path}: {exc}") from exc
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(content)
            except json.JSONDecodeError as exc:
                raise GeneError(
                    f"the gene-set file {path} is not valid JSON ({exc.msg}, line {exc.lineno})."
                ) from exc
            if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
                raise GeneError(
                    f'the gene-set file {path} must hold an object {{"set name": ["GENE", ...]}}.'
                )
            sets = {str(k).strip(): [str(g).strip() for g in v if str(g).strip()] for k, v in data.items()}
        else:
            sets = {}
            for lineno, line in enumerate(content.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if "\t" in line and "=" not in line and ":" not in line.split("\t", 1)[0]:
                    fields = [f.strip() for f in line.split("\t")]
                    name, genes = fields[0], [g for g in fields[2:] if g]  # GMT: name, description, genes
                else:
                    sep = "=" if "=" in line else ":" if ":" in line else None
                    if sep is None:
                        raise GeneError(
                            f"line {lineno} of {path} is not 'name=G1+G2', 'name: G1, G2' or a GMT line."
                        )
                    name, _, rest = line.partition(sep)
                    name, genes = name.strip(), _split_genes(rest)
                sets[name] = genes
    elif "=" in text:
        sets = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            name, sep, rest = part.partition("=")
            if not sep or not name.strip():
                raise GeneError(f"cannot read the gene set {part.strip()!r}: write it as 'name=GENE1+GENE2'.")
            sets[name.strip()] = _split_genes(rest)
    else:
        raise GeneError(
            f"{text!r} is neither a gene-set file nor a spec like 'name=GENE1+GENE2;other=GENE3'."
        )
    out: dict[str, list[str]] = {}
    for name, genes in sets.items():
        if not name:
            raise GeneError("a gene set has an empty name.")
        if not genes:
            raise GeneError(f"the gene set {name!r} lists no genes.")
        out[name] = list(dict.fromkeys(genes))
    return out


def split_names(text: str) -> list[str]:
    """Split a comma-separated list of names (``'CD3D, MKI67,T cells'``), keeping spaces inside names."""
    return [
        n.strip().strip('"').strip("'").strip() for n in text.split(",") if n.strip().strip("\"'").strip()
    ]


class GeneLookup:
    """A model's genes indexed for name lookup (exact and case-insensitive), built once per model.

    :func:`resolve_names` accepts one in place of the gene list: on a 30,000-gene model, building the
    case-insensitive index costs about 10 ms, which a viewer pays once instead of at every gene pick.
    """

    def __init__(self, genes: Sequence[str]) -> None:
        self.genes: list[str] = list(genes)
        self.exact: frozenset[str] = frozenset(self.genes)
        self.upper: dict[str, str] = {g.upper(): g for g in self.genes}


def resolve_names(
    bundle_genes: Sequence[str] | GeneLookup,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Map each requested gene or gene-set name to the model genes it is scored with.

    A name is looked up as a gene of the model (exact, then case-insensitive), then as a gene set (the
    built-in :data:`GENE_SETS` plus ``gene_sets``, case-insensitive), then as an inline set in the syntax of
    :func:`parse_gene_sets`: ``name=G1+G2`` (the set ``name``) or ``G1+G2`` (a set named as written). A set
    whose genes are partly missing from the model is scored with the genes present and a
    :class:`PartialGeneSetWarning` names the missing ones.

    Parameters
    ----------
    bundle_genes
        The model's gene symbols (``ModelBundle.genes``), or a :class:`GeneLookup` of them.
    names
        Gene symbols and/or set names, as the user typed them.
    gene_sets
        User-defined sets (name -> genes); they take precedence over built-in sets of the same name.

    Returns
    -------
    dict
        Canonical name (the model's gene spelling or the set's name) -> list of model genes, in request order.

    Raises
    ------
    GeneError
        A name is neither a model gene nor a known set (with close-match suggestions), a set has none of its
        genes in the model, or no name was given.
    """
    lookup = bundle_genes if isinstance(bundle_genes, GeneLookup) else GeneLookup(bundle_genes)
    genes, gene_set, upper = lookup.genes, lookup.exact, lookup.upper
    sets = {**GENE_SETS, **(dict(gene_sets) if gene_sets else {})}
    sets_lower = {k.lower(): k for k in sets}
    out: dict[str, list[str]] = {}
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        if name in gene_set:
            out[name] = [name]
        elif name.upper() in upper:
            out[upper[name.upper()]] = [upper[name.upper()]]
        elif name.lower() in sets_lower:
            set_name = sets_lower[name.lower()]
            out[set_name] = _set_members(set_name, sets[set_name], upper)
        elif "=" in name:  # an inline set, as the Model dock takes it: name=G1+G2
            for set_name, members in parse_gene_sets(name).items():
                out[set_name] = _set_members(set_name, members, upper)
        elif "+" in name:  # an unnamed set: G1+G2, named as written
            out[name] = _set_members(name, _split_genes(name), upper)
        else:
            raise GeneError(_unknown_name_message(name, genes, list(sets)))
    if not out:
        raise GeneError("no gene or gene set was given.")
    return out


def _set_members(set_name: str, genes: Sequence[str], upper: Mapping[str, str]) -> list[str]:
    """The model genes of a set (case-insensitive); warns about the missing ones, refuses a set of none."""
    members = [upper.get(g.upper()) for g in genes]
    present = [g for g in dict.fromkeys(members) if g is not None]
    missing = [g for g, m in zip(genes, members, strict=True) if m is None]
    if not present:
        raise GeneError(f"none of the genes of the set {set_name!r} ({', '.join(genes)}) is in the model.")
    if missing:
        warnings.warn(
            f"gene set {set_name!r}: {', '.join(missing)} not in the model; "
            f"scored with {', '.join(present)}.",
            PartialGeneSetWarning,
            stacklevel=3,
        )
    return present


def _unknown_name_message(name: str, genes: list[str], set_names: list[str]) -> str:
    # difflib on upper-cased symbols: gene symbols are case-insensitive for people ("cd3d" means CD3D).
    by_upper: dict[str, str] = {g.upper(): g for g in genes}
    by_upper.update({s.upper(): s for s in set_names})
    close = difflib.get_close_matches(name.upper(), list(by_upper), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(by_upper[c]) for c in close)}?" if close else ""
    return f"{name!r} is not a gene of this model nor a known gene set.{hint}"


# --------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------
def _needed_genes(resolved: Mapping[str, Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(g for genes in resolved.values() for g in genes))


def score_resolved(
    bundle: ModelBundle, features: np.ndarray, resolved: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """Per-tile scores of already resolved names (``name -> model genes``, see :func:`resolve_names`).

    Calls ``bundle.tile_scores`` once, for the union of the genes needed, never for all the model's genes.

    Returns
    -------
    pandas.DataFrame
        (N, len(resolved)) float32, one column per name, RangeIndex aligned with ``grid.table`` rows.
    """
    needed = _needed_genes(resolved)
    raw = np.asarray(bundle.tile_scores(features, needed), dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != len(needed):
        raise He2rnaError(
            f"the model returned tile scores of shape {raw.shape}, expected (N, {len(needed)})."
        )
    col = {g: i for i, g in enumerate(needed)}
    data = {name: raw[:, [col[g] for g in genes]].mean(axis=1) for name, genes in resolved.items()}
    return pd.DataFrame(data, index=pd.RangeIndex(raw.shape[0]), dtype=np.float32)


def predict_resolved(
    bundle: ModelBundle, features: np.ndarray, resolved: Mapping[str, Sequence[str]]
) -> pd.Series:
    """Slide-level predictions of already resolved names; a set is the mean of its genes' predictions."""
    needed = _needed_genes(resolved)
    raw = np.asarray(bundle.slide_prediction(features, needed), dtype=np.float64).reshape(-1)
    col = {g: i for i, g in enumerate(needed)}
    values = {name: float(raw[[col[g] for g in genes]].mean()) for name, genes in resolved.items()}
    return pd.Series(values, name="slide_prediction", dtype=np.float64)


def score_tiles(
    bundle: ModelBundle,
    features: np.ndarray,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Per-tile scores of genes and gene sets, computed only for the genes needed.

    Parameters
    ----------
    bundle
        A loaded model (``genes`` and ``tile_scores(features, genes) -> (N, G)``).
    features
        (N, dim) float features of the grid's tiles, in ``grid.table`` row order.
    names
        Gene symbols and/or set names (see :func:`resolve_names`).
    gene_sets
        Extra user-defined sets.

    Returns
    -------
    pandas.DataFrame
        (N, len(names)) float32, one column per canonical name, rows aligned with ``grid.table`` rows
        (RangeIndex). A set's column is the mean of its genes' tile scores. Units: :data:`SCORE_UNITS`.
    """
    return score_resolved(bundle, features, resolve_names(bundle.genes, names, gene_sets))


def slide_predictions(
    bundle: ModelBundle,
    features: np.ndarray,
    names: Iterable[str],
    gene_sets: Mapping[str, Sequence[str]] | None = None,
) -> pd.Series:
    """Slide-level predictions (HE2RNA top-k aggregation) of genes and gene sets.

    Returns
    -------
    pandas.Series
        float, indexed by canonical name; a set is the mean of its genes' slide predictions.
        Units: :data:`SCORE_UNITS`.
    """
    return predict_resolved(bundle, features, resolve_names(bundle.genes, names, gene_sets))


# --------------------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------------------
def heatmap_raster(grid: TileGrid, values: np.ndarray | pd.Series | Sequence[float]) -> np.ndarray:
    """Lay per-tile values back onto the tile grid.

    Parameters
    ----------
    grid
        The tile grid; ``grid.table`` has ``row`` and ``col``.
    values
        (N,) one value per ``grid.table`` row (a Series is taken by position).

    Returns
    -------
    numpy.ndarray
        (grid.n_rows, grid.n_cols) float32: ``raster[row, col]`` is the tile's value, ``NaN`` where there is
        no kept tile (off tissue).
    """
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    table = grid.table
    if len(vals) != len(table):
        raise ValueError(f"{len(vals)} values for a grid of {len(table)} tiles")
    raster = np.full((int(grid.n_rows), int(grid.n_cols)), np.nan, dtype=np.float32)
    raster[table["row"].to_numpy(dtype=np.intp), table["col"].to_numpy(dtype=np.intp)] = vals
    return raster


def heatmap_transform(grid: TileGrid) -> tuple[tuple[float, float], tuple[float, float]]:
    """``scale`` and ``translate`` (µm, (y, x)) of a one-pixel-per-tile heatmap layer.

    napari puts pixel centres on integer data coordinates: level-0 pixel ``i`` of the slide layer
    (``scale = mpp``) is centred at ``i * mpp`` µm, so tile ``c`` (pixels ``c*T ... c*T + T - 1``) is centred
    at ``(c*T + (T - 1)/2) * mpp``. Hence ``scale = T * mpp`` and ``translate = (T - 1)/2 * mpp`` (the grid
    starts at level-0 (0, 0)).

    Returns
    -------
    tuple
        ``((s, s), (t, t))`` with ``s = tile_px * mpp`` and ``t = (tile_px - 1) / 2 * mpp``, in µm.
    """
    s = grid.tile_side_um
    t = (float(grid.tile_px) - 1.0) / 2.0 * float(grid.mpp)
    return (s, s), (t, t)


def robust_limits(
    values: np.ndarray | pd.Series | Sequence[float], percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """Contrast limits from robust percentiles of the finite values.

    Returns
    -------
    tuple
        ``(low, high)`` with ``low < high`` always (napari refuses equal limits): a constant map gets
        ``(v - 0.5, v + 0.5)``, an empty/all-NaN one ``(0, 1)``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, percentiles))
    if not hi > lo:
        return lo - 0.5, lo + 0.5
    return lo, hi


# --------------------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------------------
def _check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    for p in paths:
        if p.is_dir():
            raise ExportError(f"{p} is a folder; give a file name to write to.")
        if p.exists() and not overwrite:
            raise OutputExistsError(
                f"{p} already exists; choose another name or allow overwriting (CLI: --overwrite)."
            )
    for parent in {p.parent for p in paths}:
        if not parent.is_dir():
            raise ExportError(f"cannot write to {parent}: the folder does not exist.")
        if not os.access(parent, os.W_OK):
            raise ExportError(f"cannot write to {parent}: the folder is read-only.")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], overwrite: bool = False) -> Path:
    """Write a file atomically through :func:`napari_he2rna.safe_output.atomic_write` (temp file + rename).

    Raises :class:`OutputExistsError` if ``path`` exists and not ``overwrite``, :class:`ExportError` if the
    folder is missing or read-only or the write fails; no temporary file is left behind on any error
    (including :class:`~napari_he2rna.errors.Cancelled` or ``KeyboardInterrupt`` raised by ``write``).
    """
    from ..safe_output import OutputError
    from ..safe_output import atomic_write as safe_atomic_write

    path = Path(path)
    _check_writable([path], overwrite)
    try:
        return safe_atomic_write(path, write, overwrite=True)  # the existing file was checked just above
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def slide_csv_path(path: str | os.PathLike) -> Path:
    """The side file with slide-level predictions that goes with a tile CSV: ``<stem>_slide.csv``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_slide.csv")


def tile_table(grid: TileGrid, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """The tile table in export form (:data:`TILE_CSV_COLUMNS`, level-0 px and µm), plus score columns."""
    t = grid.table
    mpp = float(grid.mpp)
    size_px = t["size"].to_numpy() if "size" in t else np.full(len(t), int(grid.tile_px))
    out = pd.DataFrame(
        {
            "tile_id": t["tile_id"].to_numpy(),
            "row": t["row"].to_numpy(),
            "col": t["col"].to_numpy(),
            "x_px": t["x"].to_numpy(),
            "y_px": t["y"].to_numpy(),
            "x_um": t["x"].to_numpy(dtype=np.float64) * mpp,
            "y_um": t["y"].to_numpy(dtype=np.float64) * mpp,
            "size_px": size_px,
            "size_um": size_px.astype(np.float64) * mpp,
            "tissue_fraction": t["tissue_fraction"].to_numpy(),
        }
    )
    if scores is not None:
        if len(scores) != len(out):
            raise ValueError(f"{len(scores)} score rows for a grid of {len(out)} tiles")
        clash = [c for c in scores.columns if c in TILE_CSV_COLUMNS]
        if clash:
            raise GeneError(f"the names {clash} clash with the tile table's columns; rename those gene sets.")
        for c in scores.columns:
            out[c] = scores[c].to_numpy()
    return out


def tile_metadata_path(path: str | os.PathLike) -> Path:
    """The metadata sidecar that goes with a tile CSV: ``<stem>.json`` next to it."""
    return Path(path).with_suffix(".json")


def _plain(value: Any) -> Any:
    """A JSON-able form of a metadata value (NumPy scalars become Python numbers, NaN becomes None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def tile_metadata(
    grid: TileGrid,
    columns: Sequence[str],
    slide_info: Mapping[str, Any] | None = None,
    predictions: Mapping[str, float] | pd.Series | None = None,
    units: str = SCORE_UNITS,
) -> dict[str, Any]:
    """What a tile table does not say itself, for its sidecar JSON, GeoJSON and ``.h5ad``.

    Keys: ``format`` (:data:`TILE_METADATA_FORMAT`), ``package_version``, ``units``, then ``slide_info``
    (slide, mpp, tile size, model, backbone, demo, the out-of-distribution summary ...), ``tile_px``,
    ``mpp``, ``slide_width`` / ``slide_height`` (level-0 px), ``coordinates``, ``score_columns`` and
    ``slide_predictions`` (name -> value, or ``{}``).
    """
    from .. import __version__

    width, height = (int(v) for v in grid.slide_dimensions)
    meta: dict[str, Any] = {
        "format": TILE_METADATA_FORMAT,
        "package_version": __version__,
        "units": units,
        **(dict(slide_info) if slide_info else {}),
    }
    meta.setdefault("tile_px", int(grid.tile_px))
    meta.setdefault("mpp", float(grid.mpp))
    meta.update(
        slide_width=width,
        slide_height=height,
        coordinates="level-0 pixels from the slide's top-left corner (x right, y down); µm = px * mpp",
        score_columns=[str(c) for c in columns],
        slide_predictions=(
            {str(k): float(v) for k, v in pd.Series(predictions, dtype=np.float64).items()}
            if predictions is not None
            else {}
        ),
    )
    return _plain(meta)


def write_tile_scores_csv(
    path: str | os.PathLike,
    grid: TileGrid,
    scores_df: pd.DataFrame,
    slide_info: Mapping[str, Any] | None = None,
    predictions: Mapping[str, float] | pd.Series | None = None,
    overwrite: bool = False,
    units: str = SCORE_UNITS,
    side_file: bool = True,
) -> tuple[Path, Path | None]:
    """Write one row per tile with its position and scores, a metadata sidecar and the slide-level file.

    The tile CSV is a plain table with one header row (``pd.read_csv(path)``, Excel and R's ``read.csv``
    read it as is): :data:`TILE_CSV_COLUMNS` (positions in level-0 px and µm, top-left corner) then one
    column per gene or set. What the table does not say (slide, mpp, tile size, model, backbone, demo flag,
    units, the out-of-distribution summary, slide-level predictions, package version) is in the sidecar
    :func:`tile_metadata_path` (``<stem>.json``, see :func:`tile_metadata`). The side file
    ``<stem>_slide.csv`` has columns ``slide, name, slide_prediction, units``. All are written atomically
    (temp file + rename), and none is overwritten unless ``overwrite``.

    Parameters
    ----------
    path
        Destination ``.csv``.
    grid
        The tile grid the scores belong to.
    scores_df
        (N, k) scores aligned with ``grid.table`` rows (as from :func:`score_tiles`).
    slide_info
        Small key -> value facts for the sidecar (slide name, mpp, model, backbone, demo ...).
    predictions
        Slide-level prediction per name; ``None`` writes no side file.
    overwrite
        Replace existing files.
    units
        What the scores are in (the bundle's output unit; default :data:`SCORE_UNITS`).
    side_file
        Write ``predictions`` to the side file too (``False``: only in the sidecar's metadata, for
        ``he2rna predict``, whose slide-level table is its own ``<slide>_prediction.csv``).

    Returns
    -------
    tuple
        (tile CSV path, side file path or ``None``); the sidecar is at ``tile_metadata_path(path)``.
    """
    path = Path(path)
    side = slide_csv_path(path) if predictions is not None and side_file else None
    meta_path = tile_metadata_path(path)
    if meta_path == path:
        raise ExportError(f"{path} ends in .json; give the tile table a .csv name.")
    _check_writable([path, meta_path] + ([side] if side else []), overwrite)
    table = tile_table(grid, scores_df)
    preds = pd.Series(predictions, dtype=np.float64) if predictions is not None else None
    meta = tile_metadata(grid, list(scores_df.columns), slide_info, preds, units)
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"

    if side is not None and preds is not None:
        slide_name = (slide_info or {}).get("slide", "")
        side_df = pd.DataFrame(
            {
                "slide": slide_name,
                "name": list(preds.index),
                "slide_prediction": preds.to_numpy(),
                "units": units,
            }
        )
        atomic_write(side, lambda tmp: side_df.to_csv(tmp, index=False, float_format="%.6g"), overwrite)
    atomic_write(meta_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"), overwrite)
    return path, side


def write_anndata(
    path: str | os.PathLike,
    grid: TileGrid,
    scores_df: pd.DataFrame,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the tiles as an AnnData ``.h5ad``: tiles x genes/sets, for scanpy/squidpy.

    ``X`` (float32) holds the scores (one variable per gene, set or ``feature_distance``); ``obs`` the tile
    table (:data:`TILE_CSV_COLUMNS`, indexed by the tile id as text); ``obsm["spatial"]`` the top-left
    corners in level-0 px (x, y) and ``obsm["spatial_um"]`` the same in µm; ``uns["napari_he2rna"]`` the
    metadata (:func:`tile_metadata`; values that HDF5 cannot hold, such as None, are written as "").
    Written atomically; not overwritten unless ``overwrite``.
    """
    try:
        import anndata
    except ImportError:  # a dependency; only a broken install lacks it
        raise ExportError("writing .h5ad needs the anndata package (pip install anndata).") from None

    table = tile_table(grid, None)
    if len(scores_df) != len(table):
        raise ValueError(f"{len(scores_df)} score rows for a grid of {len(table)} tiles")
    obs = table.set_axis(table["tile_id"].astype(str).to_numpy(), axis=0)
    var = pd.DataFrame(index=pd.Index([str(c) for c in scores_df.columns], dtype=object))
    adata = anndata.AnnData(X=scores_df.to_numpy(dtype=np.float32, copy=True), obs=obs, var=var)
    adata.obsm["spatial"] = table[["x_px", "y_px"]].to_numpy(dtype=np.float64)
    adata.obsm["spatial_um"] = table[["x_um", "y_um"]].to_numpy(dtype=np.float64)

    def storable(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): storable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [storable(v) for v in value] if value else ""
        return "" if value is None else value

    adata.uns["napari_he2rna"] = storable(_plain(dict(metadata or {})))
    return atomic_write(path, lambda tmp: adata.write_h5ad(tmp), overwrite)


def write_geojson_tiles(
    path: str | os.PathLike,
    grid: TileGrid,
    scores_df: pd.DataFrame | None = None,
    object_type: str = "tile",
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the tiles as a QuPath-loadable GeoJSON FeatureCollection with their scores as measurements.

    One square ``Polygon`` per tile in level-0 pixels (origin top-left, x then y, closed ring),
    ``properties.objectType`` = ``object_type`` ("tile" or "detection"), ``properties.name`` = ``tile <id>``,
    ``properties.measurements`` = ``{"tissue_fraction": ..., <gene or set>: score, ...}`` (non-finite values
    are left out: JSON has no NaN). ``metadata`` (:func:`tile_metadata`) goes in the collection's
    ``napari_he2rna`` member, which QuPath ignores. Written atomically; not overwritten unless ``overwrite``.
    """
    if object_type not in ("tile", "detection", "annotation"):
        raise ValueError(f"object_type must be 'tile', 'detection' or 'annotation', not {object_type!r}")
    t = grid.table
    xs, ys = t["x"].to_numpy(dtype=np.int64), t["y"].to_numpy(dtype=np.int64)
    sizes = t["size"].to_numpy(dtype=np.int64) if "size" in t else np.full(len(t), int(grid.tile_px))
    ids, tf = t["tile_id"].to_numpy(), t["tissue_fraction"].to_numpy(dtype=np.float64)
    cols = (
        {} if scores_df is None else {c: scores_df[c].to_numpy(dtype=np.float64) for c in scores_df.columns}
    )
    if scores_df is not None and len(scores_df) != len(t):
        raise ValueError(f"{len(scores_df)} score rows for a grid of {len(t)} tiles")
    features = []
    for i in range(len(t)):
        x, y, s = int(xs[i]), int(ys[i]), int(sizes[i])
        meas = {"tissue_fraction": round(float(tf[i]), 6)}
        meas.update({c: round(float(v[i]), 6) for c, v in cols.items() if math.isfinite(v[i])})
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": object_type,
                    "name": f"tile {int(ids[i])}",
                    "measurements": meas,
                },
            }
        )
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if metadata is not None:
        doc["napari_he2rna"] = _plain(dict(metadata))

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, separators=(",", ":"))

    return atomic_write(path, write, overwrite)


def write_heatmap_tiff(
    path: str | os.PathLike,
    raster: np.ndarray,
    grid: TileGrid,
    name: str | None = None,
    overwrite: bool = False,
    units: str = SCORE_UNITS,
) -> Path:
    """Write a heatmap raster as a georeferenced float32 TIFF.

    One pixel per tile (``NaN`` off tissue). The TIFF resolution tags hold the pixel size (centimetre unit,
    ``XResolution = 10000 / (tile_px * mpp)`` pixels per cm, i.e. ``tile_px * mpp`` µm per pixel, as OpenSlide
    and QuPath read it); the JSON ImageDescription (tifffile "shaped" metadata) holds ``pixel_size_um``,
    ``origin_um`` (level-0 µm of the top-left corner of pixel (0, 0)), ``origin_px``, ``tile_px``, ``mpp``,
    the napari ``scale``/``translate`` and the gene/set name and units.
    """
    import tifffile  # only this export needs it

    arr = np.ascontiguousarray(raster, dtype=np.float32)
    if arr.shape != (int(grid.n_rows), int(grid.n_cols)):
        raise ValueError(f"raster shape {arr.shape} does not match the grid ({grid.n_rows}, {grid.n_cols})")
    px_um = grid.tile_side_um
    scale, translate = heatmap_transform(grid)
    meta = {
        "name": name or "",
        "units": units,
        "pixel_size_um": px_um,
        "origin_um": [0.0, 0.0],
        "origin_px": [0, 0],
        "tile_px": int(grid.tile_px),
        "mpp": float(grid.mpp),
        "napari_scale_um": list(scale),
        "napari_translate_um": list(translate),
        "axes": "YX",
    }
    res = 1e4 / px_um  # pixels per centimetre

    def write(tmp: Path) -> None:
        tifffile.imwrite(
            tmp,
            arr,
            photometric="minisblack",
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            metadata=meta,
        )

    return atomic_write(path, write, overwrite)


def _nice_length(target: float) -> float:
    """The largest 1/2/5 x 10^k not above ``target`` (> 0)."""
    if target <= 0:
        return 1.0
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return float(m * 10**exp)
    return float(10**exp)


def _length_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def render_heatmap_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float | tuple[float, float],
    grid: TileGrid,
    values: np.ndarray | pd.Series,
    name: str,
    cmap: str = "magma",
    alpha: float = 0.6,
    slide_name: str | None = None,
    demo: bool = False,
    limits: tuple[float, float] | None = None,
    dpi: int = 100,
    overwrite: bool = False,
    warning: str | None = None,
    units: str = SCORE_UNITS,
) -> Path:
    """Render a heatmap over the slide thumbnail to PNG (matplotlib Agg, no GUI).

    Parameters
    ----------
    path
        Destination ``.png``.
    thumbnail
        (h, w, 3) uint8 image of the whole slide.
    thumb_downsample
        Level-0 pixels per thumbnail pixel (a number, or (x, y) factors).
    grid
        The tile grid (level-0 px, ``mpp`` µm/px).
    values
        (N,) per-tile scores aligned with ``grid.table`` rows.
    name
        Gene or set name (title and colorbar label).
    cmap, alpha
        Perceptual colormap and heatmap opacity over the tissue.
    slide_name
        Shown in the title.
    demo
        Add the "DEMO model trained on synthetic slides" warning in a corner.
    limits
        Colour limits; default :func:`robust_limits` (1st-99th percentile).
    warning
        A sentence drawn in red under the picture (and kept in the PNG's ``Warning`` text chunk), e.g. that
        the slide is outside the model's training data (:mod:`napari_he2rna.ood`).
    units
        Colour-bar units (default :data:`SCORE_UNITS`).

    The picture is in µm: the thumbnail and the heatmap share one extent, a scale bar gives µm/mm.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    thumb = np.asarray(thumbnail)
    if np.ndim(thumb_downsample) == 0:
        dsx = dsy = float(thumb_downsample)
    else:
        dsx, dsy = (float(v) for v in thumb_downsample)
    mpp = float(grid.mpp)
    h, w = thumb.shape[:2]
    width_um, height_um = w * dsx * mpp, h * dsy * mpp
    raster = heatmap_raster(grid, values)
    tile_um = grid.tile_side_um
    lo, hi = limits if limits is not None else robust_limits(values)

    fig = Figure(figsize=(8, 8 * max(min(height_um / max(width_um, 1e-9), 2.0), 0.4) + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(thumb, extent=(0, width_um, height_um, 0), interpolation="antialiased")
    colormap = matplotlib.colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))
    im = ax.imshow(
        np.ma.masked_invalid(raster),
        cmap=colormap,
        vmin=lo,
        vmax=hi,
        alpha=alpha,
        interpolation="nearest",
        extent=(0, grid.n_cols * tile_um, grid.n_rows * tile_um, 0),
    )
    ax.set_xlim(0, width_um)
    ax.set_ylim(height_um, 0)
    ax.set_axis_off()
    title = f"{name} — {slide_name}" if slide_name else name
    ax.set_title(title, fontsize=11)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label(f"{name}: {units}")
    cbar.solids.set_alpha(1.0)  # the legend shows the colours themselves, not their blend with the tissue
    bar_um = _nice_length(width_um / 5)
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            bar_um,
            _length_label(bar_um),
            "lower left",
            pad=0.4,
            borderpad=0.6,
            sep=4,
            color="black",
            frameon=True,
            size_vertical=max(height_um / 150, 1e-9),
        )
    )
    if demo:
        ax.text(
            0.99,
            0.99,
            "DEMO model trained on synthetic slides",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=9,
            color="darkred",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "darkred"},
        )
    fig.tight_layout()
    meta = {"Title": title}
    if warning:
        import textwrap

        text = "WARNING: " + warning
        fig.text(
            0.5,
            0.0,
            textwrap.fill(text, width=95),
            ha="center",
            va="top",
            fontsize=9,
            color="darkred",
            bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "darkred"},
        )
        meta["Warning"] = text
    return atomic_write(
        path,
        lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=meta),
        overwrite,
    )
