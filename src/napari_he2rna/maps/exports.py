"""Exports of tile scores: the tile table, its metadata sidecar, CSV, AnnData, GeoJSON and TIFF writers.

Every file is written atomically (temp file + rename, :func:`atomic_write`) and never overwritten unless asked
(:class:`OutputExistsError`). :func:`export_csv` and its siblings write what a
:class:`~napari_he2rna.maps.session.SlideSession` holds (the session's ``export_*`` methods call them).
Plain NumPy/pandas: no Qt, no napari.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import GeneError, He2rnaError
from ..model.mixed import map_models
from . import map_display, readout
from .gene_sets import PartialGeneSetWarning, is_distance_name
from .heatmaps import heatmap_transform, render_heatmap_png
from .map_style import PERCENTILE_UNITS
from .scoring import SCORE_UNITS

if TYPE_CHECKING:  # only for type hints
    from ..slides.tiling import TileGrid
    from .session import SlideSession


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


class ExportError(He2rnaError):
    """An export file cannot be written (folder missing or read-only, disk full, ...)."""


class OutputExistsError(ExportError):
    """An export would overwrite an existing file and overwriting was not asked for."""


# --------------------------------------------------------------------------------------------------------
# Files
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

    Keys: ``format`` (:data:`TILE_METADATA_FORMAT`), ``package_version``, ``units`` (of the score columns:
    :func:`readout.tile_score_units` of ``units``, the model's output unit), then ``slide_info``
    (slide, mpp, tile size, model, backbone, demo, the out-of-distribution summary ...), ``tile_px``,
    ``mpp``, ``slide_width`` / ``slide_height`` (level-0 px), ``coordinates``, ``score_columns``,
    ``column_units`` (score column -> unit, :func:`readout.column_units`), ``map_units`` (what the maps
    paint), ``slide_predictions`` (name -> value, or ``{}``) and ``slide_prediction_units`` (``units``).
    """
    from .. import __version__

    width, height = (int(v) for v in grid.slide_dimensions)
    meta: dict[str, Any] = {
        "format": TILE_METADATA_FORMAT,
        "package_version": __version__,
        "units": readout.tile_score_units(units),
        **(dict(slide_info) if slide_info else {}),
    }
    meta.setdefault("tile_px", int(grid.tile_px))
    meta.setdefault("mpp", float(grid.mpp))
    meta.update(
        slide_width=width,
        slide_height=height,
        coordinates="level-0 pixels from the slide's top-left corner (x right, y down); µm = px * mpp",
        score_columns=[str(c) for c in columns],
        column_units=readout.column_units(columns, units),
        map_units=PERCENTILE_UNITS,
        slide_predictions=(
            {str(k): float(v) for k, v in pd.Series(predictions, dtype=np.float64).items()}
            if predictions is not None
            else {}
        ),
        slide_prediction_units=units,
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


# --------------------------------------------------------------------------------------------------------
# A session's exports (the ``export_*`` and ``render_png`` methods of SlideSession)
# --------------------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "score"


def _score_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if not is_distance_name(n)]


def export_info(session: SlideSession, names: Iterable[str]) -> dict[str, Any]:
    """The session's :meth:`~SlideSession.slide_info` and ``map_models``: which model made each map of
    ``names`` (``"HE2RNA"``, ``"linear baseline"`` or ``"HE2RNA + linear baseline"`` for a set of both)."""
    import warnings

    info = session.slide_info()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialGeneSetWarning)  # reported when the names were scored
        resolved = session.resolve(_score_names(names))
    info["map_models"] = map_models(session.bundle, resolved)
    return info


def export_csv(session: SlideSession, path: str | Path, names: Iterable[str], overwrite: bool = False):
    """Tile CSV + ``<stem>_slide.csv`` (see :func:`write_tile_scores_csv`); returns both paths."""
    names = _score_names(names)
    _, grid, _ = session.require_ready()
    session.assessment()  # its summary goes in the header
    scores = session.scores_with_distance(session.scores_frame(names))
    return write_tile_scores_csv(
        path,
        grid,
        scores,
        export_info(session, names),
        session.slide_predictions(names),
        overwrite,
        units=readout.output_unit(session.bundle),
    )


def export_metadata(session: SlideSession, names: Iterable[str]) -> dict[str, Any]:
    """The metadata of an export of ``names`` (see :func:`tile_metadata`)."""
    names = _score_names(names)
    _, grid, _ = session.require_ready()
    session.assessment()  # its summary goes in the metadata
    columns = list(session.scores_with_distance(session.scores_frame(names)).columns)
    return tile_metadata(
        grid,
        columns,
        export_info(session, names),
        session.slide_predictions(names),
        readout.output_unit(session.bundle),
    )


def _tile_export(session: SlideSession, names: Iterable[str]):
    """(grid, the tile scores of ``names`` with the feature distance, the export metadata)."""
    names = _score_names(names)
    _, grid, _ = session.require_ready()
    return grid, session.scores_with_distance(session.scores_frame(names)), export_metadata(session, names)


def export_geojson(
    session: SlideSession, path: str | Path, names: Iterable[str], overwrite: bool = False
) -> Path:
    """The tiles as QuPath GeoJSON (see :func:`write_geojson_tiles`)."""
    grid, scores, meta = _tile_export(session, names)
    return write_geojson_tiles(path, grid, scores, overwrite=overwrite, metadata=meta)


def export_h5ad(
    session: SlideSession, path: str | Path, names: Iterable[str], overwrite: bool = False
) -> Path:
    """The tiles as AnnData (see :func:`write_anndata`)."""
    grid, scores, meta = _tile_export(session, names)
    return write_anndata(path, grid, scores, meta, overwrite=overwrite)


def export_heatmap_tiff(session: SlideSession, path: str | Path, name: str, overwrite: bool = False) -> Path:
    _, grid, _ = session.require_ready()
    return write_heatmap_tiff(
        path, session.raster(name), grid, session.canonical(name), overwrite, units=session.units(name)
    )


def render_png(
    session: SlideSession, path: str | Path, name: str, thumbnail=None, overwrite: bool = False, **kw
) -> Path:
    """PNG of a name's heatmap over the thumbnail (``thumbnail`` = (image, downsample) to reuse one).

    It says what the viewer's map says (:func:`map_display.png_options`): the percentile within the slide
    with the slide prediction, a set's genes, the distance's threshold, and the sentence (grey, hatched map)
    when the slide is outside the model's training data (:meth:`SlideSession.warning`).
    """
    bundle, grid, _ = session.require_ready()
    thumb, ds = thumbnail if thumbnail is not None else session.thumbnail()
    kw = {**map_display.png_options(session, name), **kw}
    return render_heatmap_png(
        path,
        thumb,
        ds,
        grid,
        session.scores(name),
        session.canonical(name),
        slide_name=Path(session.slide.path).name,
        demo=bool(bundle.demo),
        overwrite=overwrite,
        **kw,
    )
