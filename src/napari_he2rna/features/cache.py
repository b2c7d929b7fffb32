"""The zarr feature cache: one store per (slide, backbone, tile size), resumable, checksummed, locked.

* :func:`load_or_extract` keeps features in one zarr store per (slide, backbone, tile size), written batch by
  batch into ``<name>.partial`` so an interrupted run resumes, then renamed when complete. A lock file
  ``<name>.lock`` beside it keeps two processes from writing one store at once (the second waits; a writer
  whose lock file was deleted or replaced meanwhile stops before it commits), and a sha256 of every array,
  supertiles included, kept in the provenance, is checked on each read: a store that changed on disk is
  recomputed (its supertiles only, when only they changed) with one warning naming it.
* :func:`cache_path`, :func:`read_cache`, :func:`read_supertiles`, :func:`is_cached` name and read stores.

Layout (format ``napari-he2rna-features`` version 1): ``grid/<column>`` (the tile table), ``features``
``(N, dim)`` float32 or float16 (its ``dtype`` attribute; readers return float32, see :mod:`.store_dtype`),
``done`` ``(N,)`` bool, ``supertiles/features`` ``(k, dim)`` float32, ``supertiles/labels`` ``(N,)`` and the
provenance attributes (:data:`MUST_MATCH` decide whether a store is reused, with the dtype when one is asked).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__, settings
from ..errors import CacheError, CacheWarning
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..safe_output import OutputError, exclusive_lock, prepare_folder
from ..slides.tiling import TileGrid, check_tile_size, mask_method, tile_grid
from .backbones import Backbone, get_backbone
from .devices import resolve_device
from .extraction import ExtractOptions, effective_precision, iter_features, supertiles
from .store_dtype import dtype_mismatch, new_store_dtype, stored_dtype, to_store

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "MUST_MATCH",
    "load_or_extract",
    "cache_path",
    "read_cache",
    "read_supertiles",
    "is_cached",
]

CACHE_FORMAT = "napari-he2rna-features"
CACHE_FORMAT_VERSION = 1


_GRID_INT_COLUMNS = ["tile_id", "row", "col", "x", "y", "size"]


def cache_path(
    slide,
    backbone: Backbone | str,
    tile_um: float = 112.0,
    cache_dir: str | Path | None = None,
    *,
    options: ExtractOptions | None = None,
) -> Path:
    """The zarr store of (slide, backbone, tile size): ``<stem>-<fingerprint>-<backbone>-<tile>um.zarr``.

    With ``options`` their tile size and input handling name it instead of ``tile_um``
    (:meth:`~.extraction.ExtractOptions.tile_label`: ``...-112um.zarr`` as before,
    ``...-256px20x-in256.zarr`` for SEQUOIA's 256 px tiles at 20x fed without resizing).

    Characters other than letters, digits, ``-``, ``_`` and ``.`` in the slide stem and the backbone name
    (``hf-hub:org/name``) become ``_``; registry names have none, so their stores keep their names.
    """
    name = backbone if isinstance(backbone, str) else backbone.name
    root = Path(cache_dir) if cache_dir is not None else settings.cache_dir()
    stem = _file_safe(Path(slide.path).stem)[:60]
    tile = options.tile_label() if options is not None else f"{tile_um:g}um"
    return root / f"{stem}-{slide.fingerprint()[:16]}-{_file_safe(name)}-{tile}.zarr"


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _provenance(slide, backbone: Backbone, options: ExtractOptions) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "slide_fingerprint": slide.fingerprint(),
        "slide_path": str(Path(slide.path).resolve()),
        "backbone": backbone.name,
        "weights_hash": backbone.weights_hash,
        "feature_dim": int(backbone.dim),
        # bf16 features differ from fp32 ones (cosine >= 0.999): a store of one is not reused as the other
        "precision": effective_precision(backbone, options.precision),
        "tile_um": float(options.tile_um),
        # The tile size in px at a magnification and the backbone's input side (None: µm, resized to the
        # backbone's input; what stores written before these existed mean, so they still match).
        "tile_px_at": (
            None if options.tile_px is None else [int(options.tile_px), float(options.tile_magnification)]
        ),
        "input_px": None if options.input_px is None else int(options.input_px),
        "mpp": float(slide.require_mpp()),
        "min_tissue": float(options.min_tissue),
        "tissue_mask": mask_method(),  # a store tiled with another mask (e.g. keeping pen ink) is not reused
        "max_tiles": None if options.max_tiles is None else int(options.max_tiles),
        "seed": int(options.seed),
        # what a new store is written in; an existing one serves any dtype unless one is asked
        "dtype": new_store_dtype(options.dtype),
        "library_version": __version__,
    }


# These must match for a store to be reused (and the dtype, when one is asked: see _validate_complete);
# slide_path and library_version are provenance only.
MUST_MATCH = [
    "format",
    "format_version",
    "slide_fingerprint",
    "backbone",
    "weights_hash",
    "feature_dim",
    "precision",
    "tile_um",
    "tile_px_at",
    "input_px",
    "mpp",
    "min_tissue",
    "tissue_mask",
    "max_tiles",
    "seed",
]


def _mismatch(attrs: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key in MUST_MATCH:
        a, b = attrs.get(key), expected[key]
        same = (
            math.isclose(a, b, rel_tol=1e-9)
            if isinstance(b, float) and isinstance(a, (int, float))
            else a == b
        )
        if not same:
            return f"{key} is {a!r}, expected {b!r}"
    return None


def _grid_from_group(group, attrs: dict[str, Any]) -> TileGrid:
    cols = {c: np.asarray(group[f"grid/{c}"][:], dtype=np.int64) for c in _GRID_INT_COLUMNS}
    cols["tissue_fraction"] = np.asarray(group["grid/tissue_fraction"][:], dtype=np.float64)
    n = {len(v) for v in cols.values()}
    if len(n) != 1:
        raise CacheError("the grid columns of the feature cache have different lengths.")
    return TileGrid(
        table=pd.DataFrame(cols),
        tile_px=int(attrs["tile_px"]),
        tile_um=float(attrs["tile_um"]),
        mpp=float(attrs["mpp"]),
        n_rows=int(attrs["n_rows"]),
        n_cols=int(attrs["n_cols"]),
        slide_dimensions=tuple(int(v) for v in attrs["slide_dimensions"]),
    )


def _digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (what was decoded, so any corrupt chunk changes it)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def _grid_arrays(grid: TileGrid) -> dict[str, np.ndarray]:
    arrays = {f"grid/{c}": grid.table[c].to_numpy(dtype=np.int64) for c in _GRID_INT_COLUMNS}
    arrays["grid/tissue_fraction"] = grid.table["tissue_fraction"].to_numpy(dtype=np.float64)
    return arrays


def _verify_checksums(path: Path, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """CacheError naming the arrays of ``arrays`` whose digest differs from the one stored at completion.

    Stores written before checksums were kept (no ``checksums`` attribute) are read unverified.
    """
    stored = attrs.get("checksums")
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise CacheError(f"the feature cache {path.name} has an unreadable checksum list.")
    bad = [name for name, arr in arrays.items() if stored.get(name) != _digest(arr)]
    if bad:
        which = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CacheError(
            f"the feature cache {path.name} changed on disk since it was written "
            f"(checksum of {which} differs)."
        )


def read_cache(path: str | Path) -> tuple[TileGrid, np.ndarray, dict[str, Any]]:
    """Grid, features (float32, whatever the store's dtype) and provenance of a complete store (no checks
    against a slide).

    Raises
    ------
    CacheError
        Unreadable, incomplete or inconsistent store (missing chunks show up as NaN features), or one whose
        arrays no longer match the checksums stored when it was completed (a flipped bit, a chunk copied
        from another store).
    """
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != CACHE_FORMAT:
            raise CacheError(f"{path} is not a napari-he2rna feature cache.")
        if not attrs.get("complete"):
            raise CacheError(f"{path} is an unfinished feature cache.")
        grid = _grid_from_group(group, attrs)
        stored = group["features"]
        stored_dtype(attrs, stored.dtype, str(path))
        features = np.asarray(stored[:])  # as stored: its checksum is of these bytes
        done = np.asarray(group["done"][:], dtype=bool)
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"the feature cache {path} is unreadable ({type(exc).__name__}: {exc}).") from exc
    if features.shape != (len(grid.table), int(attrs["feature_dim"])) or not done.all():
        raise CacheError(f"the feature cache {path} is incomplete (shape {features.shape}).")
    _verify_checksums(path, attrs, {"features": features, "done": done, **_grid_arrays(grid)})
    if not np.isfinite(features).all():
        raise CacheError(f"the feature cache {path} holds missing or non-finite features.")
    return grid, features.astype(np.float32, copy=False), attrs


def read_features(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """The ``(n_tiles, dim)`` features, as float32, of a store already checked when opened
    (:func:`read_cache`, :func:`load_or_extract`): only their shape is checked, not their checksums nor every
    value, so re-reading a cohort every epoch costs the read alone. Raises :class:`CacheError` when
    unreadable or reshaped."""
    import zarr

    path = Path(path)
    try:
        features = zarr.open_group(str(path), mode="r")["features"]
        if tuple(features.shape) != tuple(shape):
            raise CacheError(f"the feature cache {path} changed shape since it was opened: {features.shape}.")
        return np.asarray(features[:], dtype=np.float32)
    except CacheError:
        raise
    except Exception as exc:
        raise CacheError(f"the feature cache {path} is unreadable ({type(exc).__name__}: {exc}).") from exc


def read_supertiles(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The supertiles stored beside the features: ``(k, dim)`` mean features and ``(N,)`` labels.

    Checked against the store's checksums like the tile arrays (stores written before supertiles had
    checksums are read unverified). Raises :class:`CacheError` when unreadable or changed on disk.
    """
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        centroids = np.asarray(group["supertiles/features"][:], dtype=np.float32)
        labels = np.asarray(group["supertiles/labels"][:], dtype=np.int64)
    except Exception as exc:
        raise CacheError(f"the supertiles of {path} are unreadable ({type(exc).__name__}: {exc}).") from exc
    attrs = dict(group.attrs)
    stored = attrs.get("checksums")
    arrays = {"supertiles/features": centroids, "supertiles/labels": labels}
    if isinstance(stored, dict):  # an older store may have checksums of its tile arrays only
        arrays = {name: arr for name, arr in arrays.items() if name in stored}
    _verify_checksums(path, attrs, arrays)
    return centroids, labels


def _has_supertile_checksums(attrs: dict[str, Any]) -> bool:
    stored = attrs.get("checksums")
    return isinstance(stored, dict) and any(str(name).startswith("supertiles/") for name in stored)


def _sound_supertiles(path: Path, attrs: dict[str, Any], repair: bool = True) -> bool:
    """Whether the supertiles of a complete store match their checksums; warns (naming it, and saying
    whether they are recomputed: ``repair``) when not.

    Stores without supertile checksums (written before they were kept) are taken as they are.
    """
    if not _has_supertile_checksums(attrs):
        return True
    try:
        read_supertiles(path)
    except CacheError as exc:
        then = "recomputing its supertiles" if repair else "they cannot be repaired in a read-only cache"
        warnings.warn(f"{str(exc).rstrip('.')}; {then}.", CacheWarning, stacklevel=3)
        return False
    return True


def _write_supertiles(group, centroids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Store supertiles in ``group``; returns them by array name."""
    group.create_array("supertiles/features", data=centroids, overwrite=True)
    group.create_array("supertiles/labels", data=labels, overwrite=True)
    return {"supertiles/features": centroids, "supertiles/labels": labels}


def _repair_supertiles(path: Path, grid: TileGrid, features: np.ndarray, options: ExtractOptions) -> None:
    """Recompute the supertiles of a complete store whose tile arrays are sound, and their checksums.

    Interrupted, it leaves supertiles that do not match their checksums: the next read repairs them again.
    """
    import zarr

    centroids, labels = supertiles(grid, features, k=options.supertile_k, seed=options.seed)
    group = zarr.open_group(str(path), mode="r+")
    arrays = _write_supertiles(group, centroids, labels)
    checksums = dict(group.attrs["checksums"])
    checksums.update({name: _digest(arr) for name, arr in arrays.items()})
    group.attrs.update({"supertile_k": int(len(arrays["supertiles/features"])), "checksums": checksums})


def _remove_store(path: Path) -> None:
    """Delete one of *our* stores (named ``*.zarr`` / ``*.zarr.partial``), nothing else."""
    if not path.exists():
        return
    if not (path.name.endswith(".zarr") or path.name.endswith(".zarr.partial")):
        raise CacheError(f"refusing to delete {path}: not a feature cache store.")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _validate_complete(
    path: Path, expected: dict[str, Any], dtype: str | None = None
) -> tuple[TileGrid, np.ndarray, dict[str, Any]] | None:
    """Cached grid, features and attributes if ``path`` is a complete, matching, sound store, in ``dtype``
    when one is asked; else None (warned). Its supertiles are checked apart (:func:`_sound_supertiles`):
    they can be repaired alone."""
    if not path.exists():
        return None
    try:
        grid, features, attrs = read_cache(path)
    except CacheError as exc:
        warnings.warn(f"{str(exc).rstrip('.')}; recomputing it.", CacheWarning, stacklevel=3)
        return None
    reason = _mismatch(attrs, expected) or dtype_mismatch(str(attrs.get("dtype", "float32")), dtype)
    if reason:
        warnings.warn(
            f"the feature cache {path.name} is stale ({reason}); recomputing it.", CacheWarning, stacklevel=3
        )
        return None
    return grid, features, attrs


def is_cached(
    slide,
    backbone: Backbone,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    **changes: Any,
) -> bool:
    """Whether a complete, matching store exists for these settings (read, so a corrupt one, or one whose
    supertiles changed on disk, is not).

    ``options`` (default :class:`~.features.ExtractOptions`) with ``changes`` (its field names) applied.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = ExtractOptions.of(options, **changes).for_slide(slide)
        expected = _provenance(slide, backbone, options)
        path = cache_path(slide, backbone, options.tile_um, cache_dir, options=options)
        cached = _validate_complete(path, expected, options.dtype)
        return cached is not None and _sound_supertiles(path, cached[2])


def _open_partial(partial: Path, expected: dict[str, Any], dtype: str | None):
    """A resumable partial store (group, grid, done), in ``dtype`` when one is asked (else in the one it
    was begun in), or None when absent/unsound (then removed)."""
    import zarr

    if not partial.exists():
        return None
    try:
        group = zarr.open_group(str(partial), mode="r+")
        attrs = dict(group.attrs)
        reason = _mismatch(attrs, expected) or dtype_mismatch(
            stored_dtype(attrs, group["features"].dtype, partial.name), dtype
        )
        if reason is None:
            grid = _grid_from_group(group, attrs)
            done = np.asarray(group["done"][:], dtype=bool)
            if group["features"].shape == (len(grid.table), expected["feature_dim"]) and done.shape == (
                len(grid.table),
            ):
                return group, grid, done
            reason = "its arrays do not match its grid"
    except Exception as exc:
        reason = f"unreadable ({type(exc).__name__}: {exc})"
    warnings.warn(
        f"discarding the unfinished feature cache {partial.name}: {reason}.", CacheWarning, stacklevel=3
    )
    _remove_store(partial)
    return None


def _create_partial(partial: Path, grid: TileGrid, expected: dict[str, Any], chunk_rows: int):
    import zarr

    _remove_store(partial)
    group = zarr.open_group(str(partial), mode="w")
    n = len(grid.table)
    for col in _GRID_INT_COLUMNS:
        group.create_array(f"grid/{col}", data=grid.table[col].to_numpy(dtype=np.int64), chunks=(max(n, 1),))
    group.create_array(
        "grid/tissue_fraction",
        data=grid.table["tissue_fraction"].to_numpy(dtype=np.float64),
        chunks=(max(n, 1),),
    )
    # NaN fill: a chunk lost on disk reads back as NaN, which read_cache rejects, never as plausible zeros.
    group.create_array(
        "features",
        shape=(n, expected["feature_dim"]),
        dtype=expected["dtype"],
        chunks=(chunk_rows, expected["feature_dim"]),
        fill_value=np.nan,
    )
    group.create_array("done", shape=(n,), dtype="bool", chunks=(chunk_rows,), fill_value=False)
    group.attrs.update(
        {
            **expected,
            "tile_px": int(grid.tile_px),
            "n_rows": int(grid.n_rows),
            "n_cols": int(grid.n_cols),
            "slide_dimensions": [int(v) for v in grid.slide_dimensions],
            "n_tiles": n,
            "complete": False,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    return group


def load_or_extract(
    slide,
    backbone: Backbone | str | None = None,
    options: ExtractOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    grid_ready: Callable[[TileGrid], None] | None = None,
    order: Callable[[TileGrid, np.ndarray], np.ndarray] | None = None,
    batch_ready: Callable[[np.ndarray, np.ndarray], None] | None = None,
    **changes: Any,
) -> tuple[TileGrid, np.ndarray]:
    """Cached features of a slide: read them if a sound store exists, else compute (resuming) and store.

    The store ``cache_path(slide, backbone, tile_um, cache_dir)`` holds the grid table columns
    (``grid/<column>``), ``features`` (N, dim) float32 or float16 (``options.dtype``: None reuses a store
    of either and writes float32; a dtype asked re-extracts a store of the other), ``done`` (N,) bool,
    ``supertiles/features`` (k, dim) and ``supertiles/labels`` (N,), and provenance attributes (slide
    fingerprint and path, backbone name and weights hash, precision, tile µm, mpp, tiling parameters, dtype,
    library version, ``complete``). It is written batch by batch into ``<name>.partial`` and renamed when
    complete, so a killed or cancelled run resumes from the rows already done; a stale (other weights, pixel
    size or tiling parameters) or corrupt store is recomputed with a warning.

    Parameters
    ----------
    slide : Slide
    backbone : Backbone or str, optional
        A built backbone, or a registry name (built with ``options.weights`` on ``options.device``);
        default ``options.backbone``.
    options : ExtractOptions, optional
        Tiling, batch size, device, precision, reader threads and supertiles (default: the defaults).
    cache_dir : path, optional
        Folder of the stores (default :func:`settings.cache_dir`).
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress messages give the rate in tiles/s.
    grid_ready : callable, optional
        Called with the tile grid as soon as it is known, before the long extraction (the viewer draws the
        tile outline with it).
    order : callable, optional
        ``order(grid, rows) -> rows``: the order in which the rows still to do are extracted (the viewer
        extracts a coarse lattice of tiles first, see :func:`napari_he2rna.maps.progressive.spread_order`).
    batch_ready : callable, optional
        ``batch_ready(rows, features)`` after each batch is stored (and once, first, with the rows a resumed
        store already had), so a caller can use features as they arrive (the viewer paints them).
    **changes
        Fields of :class:`~.features.ExtractOptions` to change (``tile_um=...``, ``max_tiles=...``,
        ``device=...``): ``load_or_extract(slide, "hed-stats", max_tiles=100)``.

    Returns
    -------
    grid : TileGrid
    features : (N, dim) float32, whatever the store's dtype
    """
    import zarr  # noqa: F401  (fail early with ImportError rather than after extracting)

    options = ExtractOptions.of(options, **changes).for_slide(slide)  # a tile in px: its µm on this slide
    # before any store is named or made
    check_tile_size(options.tile_um, slide.require_mpp(), slide.dimensions)
    if backbone is None:
        backbone = options.backbone
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, weights=options.weights, device=options.device)
    elif options.device not in (None, "auto"):
        backbone.to(resolve_device(options.device))
    final = cache_path(slide, backbone, options.tile_um, cache_dir, options=options)
    if not final.parent.is_dir():
        _writable_cache_folder(final.parent)
    expected = _provenance(slide, backbone, options)
    # One writer per store across processes (CLI runs, widgets, dask workers); a read-only cache has no
    # lock file, and needs none: nothing can be written there.
    lock = final.with_name(final.name + ".lock")
    with exclusive_lock(
        lock, what=f"the feature cache {final.name}", cancelled=lambda: check_cancel(cancel)
    ) as held:
        owner = _lock_identity(lock) if held else None
        cached = _validate_complete(final, expected, options.dtype)
        if cached is not None:
            grid, features, attrs = cached
            if not _sound_supertiles(final, attrs, repair=held) and held:  # the tile features are sound
                _repair_supertiles(final, grid, features, options)
            if grid_ready is not None:
                grid_ready(grid)
            report(progress, len(grid.table), len(grid.table), "cached")
            return grid, features
        _writable_cache_folder(final.parent)
        return _extract_into_store(
            slide,
            backbone,
            final,
            expected,
            options,
            progress,
            cancel,
            grid_ready,
            order,
            batch_ready,
            still_held=(lambda: _check_lock(lock, owner, final)) if held else None,
        )


def _lock_identity(lock: Path) -> tuple[int, int] | None:
    """(device, inode) of the lock file just taken: while it is held open, its inode cannot be reused."""
    try:
        st = os.stat(lock)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_lock(lock: Path, owner: tuple[int, int] | None, final: Path) -> None:
    """CacheError when the lock file of ``final`` is no longer the one this process holds (deleted, perhaps
    re-created by another writer): committing then could replace that writer's store."""
    if owner is None or _lock_identity(lock) != owner:
        raise CacheError(
            f"the lock file {lock.name} was deleted or replaced while this process was writing the feature "
            f"cache {final.name}, so another process may be writing it too: nothing was committed, run "
            "again to resume it (and leave *.lock files alone while he2rna runs)."
        )


def _writable_cache_folder(folder: Path) -> None:
    try:
        prepare_folder(folder, "feature cache folder", "choose another cache folder (--cache-dir)")
    except OutputError as exc:
        raise CacheError(str(exc)) from None


def _extract_into_store(
    slide,
    backbone: Backbone,
    final: Path,
    expected: dict[str, Any],
    options: ExtractOptions,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    grid_ready: Callable[[TileGrid], None] | None,
    order: Callable[[TileGrid, np.ndarray], np.ndarray] | None = None,
    batch_ready: Callable[[np.ndarray, np.ndarray], None] | None = None,
    still_held: Callable[[], None] | None = None,
) -> tuple[TileGrid, np.ndarray]:
    """Compute the features of ``final`` into its ``.partial`` store (resuming it), then rename it.

    ``still_held()`` raises when this process no longer holds the store's lock: it is asked after each
    batch, before the supertiles are written and before the store replaces ``final``.
    """
    check_held = still_held or (lambda: None)
    partial = final.with_name(final.name + ".partial")
    opened = _open_partial(partial, expected, options.dtype)
    if opened is None:
        grid = tile_grid(
            slide,
            tile_um=options.tile_um,
            min_tissue=options.min_tissue,
            max_tiles=options.max_tiles,
            seed=options.seed,
        )
        group = _create_partial(partial, grid, expected, chunk_rows=max(int(options.batch_size), 1) * 8)
        done = np.zeros(len(grid.table), dtype=bool)
    else:
        group, grid, done = opened
    if grid_ready is not None:
        grid_ready(grid)
    todo = np.flatnonzero(~done)
    if order is not None:
        todo = np.asarray(order(grid, todo), dtype=np.int64)
    features_arr, done_arr = group["features"], group["done"]
    dtype = features_arr.dtype.name  # asked, or the one a resumed store was begun in
    n_done = int(done.sum())
    if batch_ready is not None and n_done:
        have = np.flatnonzero(done)
        batch_ready(have, np.asarray(features_arr.oindex[have], dtype=np.float32))

    def progress_with_offset(d: int, total: int, message: str) -> None:
        report(progress, n_done + d, n_done + total, message)

    for rows, feats in iter_features(
        slide,
        grid,
        backbone,
        todo,
        options.batch_size,
        options.precision,
        options.num_workers,
        progress_with_offset if progress else None,
        cancel,
        input_px=options.input_px,  # None: resized to the backbone's input side
    ):
        # In grid order rows are mostly contiguous: write the span, then mark it done; a spread order
        # writes the batch's rows at once (each chunk touched once per batch).
        feats = to_store(feats, dtype, backbone.name, Path(slide.path).name)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows) and np.array_equal(rows, np.arange(lo, hi)):
            features_arr[lo:hi] = feats
            done_arr[lo:hi] = True
        else:
            features_arr.oindex[rows] = feats
            done_arr.oindex[rows] = True
        if batch_ready is not None:
            batch_ready(rows, feats.astype(np.float32, copy=False))  # the values stored
        check_held()

    stored = np.asarray(features_arr[:])  # in the store's dtype: its checksum is of these bytes
    features = stored.astype(np.float32, copy=False)
    done_all = np.asarray(done_arr[:], dtype=bool)
    if not done_all.all() or not np.isfinite(features).all():
        raise CacheError(
            f"the feature cache {partial} lost rows while being written; run again to redo them."
        )
    centroids, labels = supertiles(grid, features, k=options.supertile_k, seed=options.seed)
    check_held()
    arrays = {
        "features": stored,
        "done": done_all,
        **_grid_arrays(grid),
        **_write_supertiles(group, centroids, labels),
    }
    group.attrs.update(
        {
            "complete": True,
            "supertile_k": int(len(centroids)),
            "checksums": {name: _digest(arr) for name, arr in arrays.items()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    check_held()
    _remove_store(final)  # a stale or corrupt store of ours
    os.replace(partial, final)
    return grid, features
