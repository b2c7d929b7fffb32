"""Tile features: a slide's tiles through a backbone, batch by batch, into an ``(n_tiles, dim)`` matrix.

A slide becomes an ``(n_tiles, dim)`` float32 matrix aligned to the rows of its :class:`~.tiling.TileGrid`.

* :class:`ExtractOptions` holds what an extraction needs to know (backbone and weights, tiling, batch size,
  device, precision, reader threads, supertiles); the cache (:mod:`.feature_cache`) and the cohort tasks
  (:mod:`.extract_cohort`) take the same object.
* :func:`extract_features` reads tiles in a thread pool while the model runs on the previous batch
  (OpenSlide releases the GIL while decoding), autocasts on GPU and halves the batch on out-of-memory;
  :func:`iter_features` yields the batches as they come.
* :func:`supertiles` groups tiles into the paper's supertiles (k-means on positions, mean features).

The backbones are in :mod:`.backbones`, the zarr cache in :mod:`.feature_cache`, cohorts in
:mod:`.extract_cohort`. Nothing here imports Qt or napari.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import TileSizeError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from ..slides.tiling import MIN_TILE_PX, TileGrid, read_tiles, tile_side_px
from .backbones import Backbone
from .devices import resolve_device
from .precision import precision_name, resolve_precision
from .store_dtype import check_dtype

__all__ = [
    "ExtractOptions",
    "effective_precision",
    "BatchRunner",
    "iter_features",
    "extract_features",
    "supertiles",
]


@dataclass(frozen=True)
class ExtractOptions:
    """How a slide's features are made; one object for the cache, the cohort tasks and the commands.

    Attributes
    ----------
    backbone : str
        Registry name of the backbone (:data:`~.backbones.BACKBONES`), used where a backbone is built by name.
    weights : str or Path, optional
        A local weights file (or snapshot folder) for it; otherwise the usual places are searched.
    tile_um, min_tissue, max_tiles, seed
        Tiling, see :func:`~.tiling.tile_grid` (tile side in µm, smallest tissue fraction kept, at most
        this many tiles sampled with ``seed``; ``max_tiles=None`` keeps all).
    batch_size : int
        Tiles per forward pass (halved on GPU out-of-memory).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (:func:`~.devices.resolve_device`).
    precision : str
        ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (:func:`~.precision.resolve_precision`).
    num_workers : int
        Tile reader threads.
    supertile_k : int
        Clusters of the supertiles stored beside the features.
    tile_px, tile_magnification : int, float, optional
        The tile size in pixels at a magnification instead of ``tile_um`` (e.g. 256 px at 20x: SEQUOIA's
        tiles); on a slide it is :func:`~..slides.tiling.tile_side_px` level-0 pixels (:meth:`for_slide`).
    input_px : int, optional
        Feed the backbone each tile read at this side, not resized to its input side (e.g. 256 for
        SEQUOIA's ResNet50 features); None: resized to the backbone's ``input_px``. Part of the store's name
        and provenance, so features of one input size are never served for the other.
    dtype : str, optional
        ``"float32"`` or ``"float16"``: what the store keeps (float16 halves its size and read time; readers
        always return float32). None: new stores are float32 and an existing one is used in the dtype it
        has; a dtype asked re-extracts a store kept in the other (:mod:`.store_dtype`).
    """

    backbone: str = "resnet50-imagenet"
    weights: str | Path | None = None
    tile_um: float = 112.0
    min_tissue: float = 0.5
    max_tiles: int | None = 8000
    seed: int = 0
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 2
    supertile_k: int = 100
    tile_px: int | None = None
    tile_magnification: float | None = None
    input_px: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype(self.dtype))  # "float16", np.float16: one spelling
        px, mag = self.tile_px, self.tile_magnification
        if (px is None) != (mag is None):
            raise TileSizeError("A tile size in pixels needs its magnification, and a magnification pixels.")
        if px is not None and (int(px) < 1 or not float(mag) > 0):
            raise TileSizeError(f"A tile of {px} px at {mag}x is not a tile size.")
        if self.input_px is not None and int(self.input_px) < MIN_TILE_PX:
            raise TileSizeError(f"A backbone input of {self.input_px} px is too small (< {MIN_TILE_PX} px).")

    def replace(self, **changes) -> ExtractOptions:
        """A copy with ``changes``; an unknown option name is a ``TypeError`` naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unknown extraction option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def of(cls, options: ExtractOptions | None = None, **changes) -> ExtractOptions:
        """``options`` (default: the defaults) with ``changes`` applied."""
        return (options if options is not None else cls()).replace(**changes)

    @classmethod
    def for_model(cls, bundle, options: ExtractOptions | None = None, **changes) -> ExtractOptions:
        """The options that make the features a model bundle expects: its backbone, its tile size (µm, or
        pixels at a magnification) and its input handling (``input_resize=False``: tiles fed at
        ``tile_px``), on top of ``options`` with ``changes``.

        Raises :class:`~..errors.ModelError` for a bundle whose tiles are not resized but whose size in
        pixels is not recorded.
        """
        from ..errors import ModelError

        tile_px = getattr(bundle, "tile_px", None)
        input_px = None
        if not getattr(bundle, "input_resize", True):
            if tile_px is None:
                raise ModelError(
                    "The model says its tiles were fed to the backbone without resizing but not their size "
                    "in pixels; convert it again with --tile-px and --magnification."
                )
            input_px = int(tile_px)
        model = {
            "backbone": bundle.backbone,
            "tile_um": float(bundle.tile_um),
            "tile_px": None if tile_px is None else int(tile_px),
            "tile_magnification": None if tile_px is None else float(bundle.tile_magnification),
            "input_px": input_px,
        }
        return cls.of(options, **model).replace(**changes)

    def for_slide(self, slide) -> ExtractOptions:
        """These options with ``tile_um`` the side, on ``slide``, of a tile given in pixels at a magnification
        (:func:`~..slides.tiling.tile_side_px` level-0 pixels times the slide's mpp; warns when the slide's
        magnification is estimated from its pixel size); unchanged for a tile size in µm."""
        if self.tile_px is None:
            return self
        side = tile_side_px(slide, self.tile_px, self.tile_magnification)
        return self.replace(tile_um=side * float(slide.require_mpp()))

    def tile_label(self) -> str:
        """The tile size and input handling in a store's name: ``112um`` (as stores have always been
        named), ``256px20x``, with ``-in256`` when the tiles are fed at their own size."""
        tile = (
            f"{self.tile_um:g}um"
            if self.tile_px is None
            else f"{int(self.tile_px)}px{float(self.tile_magnification):g}x"
        )
        return tile if self.input_px is None else f"{tile}-in{int(self.input_px)}"


def effective_precision(backbone: Backbone, precision: str = "auto") -> str:
    """The precision ``backbone`` runs in for ``precision`` (fp32 for backbones that never autocast)."""
    return precision_name(resolve_precision(precision, backbone.device) if backbone.autocast else None)


class BatchRunner:
    """Runs the backbone on uint8 batches, autocast + channels_last on GPU, halving the batch on OOM.

    ``resize=False`` feeds the tiles at their own size (see :meth:`Backbone.preprocess`).
    """

    def __init__(self, backbone: Backbone, batch_size: int, precision: str, resize: bool = True) -> None:
        self.backbone = backbone
        self.resize = bool(resize)
        self.device = backbone.device
        self.dtype = resolve_precision(precision, self.device) if backbone.autocast else None
        self.batch_size = max(int(batch_size), 1)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            backbone.to(memory_format=torch.channels_last)

    def _forward(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles)
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.inference_mode():
            inp = self.backbone.preprocess(x, resize=self.resize)
            if self.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            ctx = (
                torch.autocast(self.device.type, dtype=self.dtype)
                if self.dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = self.backbone(inp)
            return out.float().cpu().numpy()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        outs, start = [], 0
        while start < len(tiles):
            chunk = tiles[start : start + self.batch_size]
            try:
                outs.append(self._forward(chunk))
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(self.batch_size // 2, 1)
                torch.cuda.empty_cache()
                warnings.warn(f"out of GPU memory: batch size lowered to {self.batch_size}", stacklevel=2)
                continue
            start += len(chunk)
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


def iter_features(
    slide,
    grid: TileGrid,
    backbone: Backbone,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 32,
    precision: str = "auto",
    num_workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    input_px: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Features batch by batch, in order: yields ``(rows (b,), features (b, dim) float32)``.

    Tiles are read at the backbone's ``input_px`` side, or with ``input_px`` at that side and fed to the
    backbone as they are (not resized again). Reader threads decode the next batches while the model runs on
    the current one (prefetch of ``num_workers + 1`` batches). Stops with :class:`~.errors.Cancelled` between
    batches when ``cancel`` is set, leaving nothing half-done (the caller has every batch yielded so far).
    """
    rows = np.arange(len(grid.table)) if indices is None else np.asarray(indices, dtype=np.int64)
    total = len(rows)
    run = BatchRunner(backbone, batch_size, precision, resize=input_px is None)
    side = int(input_px) if input_px is not None else backbone.input_px
    batches = [rows[i : i + run.batch_size] for i in range(0, total, run.batch_size)]
    if total == 0:
        return
    workers = max(int(num_workers), 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="he2rna-tiles")
    pending: deque = deque()
    next_batch = 0

    def submit() -> None:
        nonlocal next_batch
        if next_batch < len(batches):
            pending.append(pool.submit(read_tiles, slide, grid, batches[next_batch], side, 1))
            next_batch += 1

    done, start = 0, time.perf_counter()
    try:
        for _ in range(workers + 1):
            submit()
        for batch_rows in batches:
            check_cancel(cancel)
            tiles = pending.popleft().result()
            submit()
            feats = run(tiles)
            done += len(batch_rows)
            rate = done / max(time.perf_counter() - start, 1e-9)
            report(progress, done, total, f"{rate:.1f} tiles/s")
            yield batch_rows, feats
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def extract_features(
    slide,
    grid: TileGrid,
    backbone: Backbone,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    input_px: int | None = None,
) -> np.ndarray:
    """Features of every tile of ``grid``.

    Parameters
    ----------
    slide : Slide
    grid : TileGrid
    backbone : Backbone
        From :func:`get_backbone`; moved to ``device`` unless that is ``"auto"``.
    batch_size : int
        Tiles per forward pass (halved on GPU out-of-memory).
    device : str
        ``"auto"`` keeps the backbone where it is.
    precision : str
        ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (autocast dtype; see :func:`resolve_precision`).
    num_workers : int
        Tile reader threads.
    progress, cancel
        See :mod:`napari_he2rna.jobs`; progress messages give the rate in tiles/s.
    input_px : int, optional
        Feed the tiles at this side, not resized to the backbone's (:func:`iter_features`).

    Returns
    -------
    (N, dim) float32, rows aligned to ``grid.table``.
    """
    if device not in (None, "auto"):
        backbone.to(resolve_device(device))
    out = np.empty((len(grid.table), backbone.dim), dtype=np.float32)
    for rows, feats in iter_features(
        slide, grid, backbone, None, batch_size, precision, num_workers, progress, cancel, input_px
    ):
        out[rows] = feats
    return out


# ----------------------------------------------------------------------------------------------- supertiles
def supertiles(
    grid: TileGrid, features: np.ndarray, k: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's supertiles: k-means (scikit-learn) on tile positions, mean feature per cluster.

    Parameters
    ----------
    grid : TileGrid
    features : (N, dim) array
    k : int
        Clusters; ``min(k, N)`` are made.
    seed : int

    Returns
    -------
    centroid_features : (k, dim) float32
    labels : (N,) int64, the cluster of each tile.
    """
    return supertile_means(grid.centers(), features, k, seed)


def supertile_means(
    centers: np.ndarray, features: np.ndarray, k: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`supertiles` from the tile centres ``(N, 2)`` (level-0 px): what a model trained on supertiles
    predicts a slide from (``ModelBundle.slide_inputs``), computed exactly as the training cohort's were."""
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    if n == 0:
        raise ValueError("no tiles to group into supertiles")
    k = min(int(k), n)
    if k == n:
        labels = np.arange(n, dtype=np.int64)
    else:
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(np.asarray(centers, dtype=np.float64))
        labels = km.labels_.astype(np.int64)
    sums = np.zeros((k, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), labels
