"""Progressive painting: the order tiles are extracted in, and the coarse map shown while they arrive.

No Qt, no napari. The viewer extracts a slide's tiles in :func:`spread_order` (a coarse lattice of tiles,
every ``step``-th row and column, first; then the lattice at half the step; and so on down to every tile),
scores each batch as it arrives (:class:`napari_he2rna.maps.session.SlideSession`), and paints the tiles not
scored yet with the value of their nearest scored tile (:func:`nearest_fill`): after the first ~1/16 of the
tiles the whole slide has a coarse map, which then sharpens tile by tile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle
    from ..slides.tiling import TileGrid
    from .session import SlideSession


def coarse_step(n_tiles: int) -> int:
    """Lattice step of the first pass: 4 (1/16 of the tiles) from 400 tiles, 2 from 50, else 1."""
    if n_tiles >= 400:
        return 4
    if n_tiles >= 50:
        return 2
    return 1


def level_of(rows: np.ndarray, cols: np.ndarray, step: int) -> np.ndarray:
    """Pass of each tile: 0 for the coarsest lattice (row and col multiples of ``step``), then 1, ..."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    level = np.full(rows.shape, 0, dtype=np.int64)
    s, lv = int(step), 0
    assigned = np.zeros(rows.shape, dtype=bool)
    while s >= 1:
        on = ~assigned & (rows % s == 0) & (cols % s == 0)
        level[on] = lv
        assigned |= on
        s //= 2
        lv += 1
    return level


def spread_order(grid: TileGrid, todo: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """``todo`` (rows of ``grid.table``; default all) in a spatially spread order.

    Coarse lattice first (see :func:`coarse_step`), then the finer passes; inside a pass the tiles are
    shuffled (seeded) so that every batch covers the whole slide rather than a strip of it.
    """
    todo = np.arange(len(grid.table)) if todo is None else np.asarray(todo, dtype=np.int64)
    if todo.size == 0:
        return todo
    r = grid.table["row"].to_numpy(dtype=np.int64)[todo]
    c = grid.table["col"].to_numpy(dtype=np.int64)[todo]
    level = level_of(r, c, coarse_step(len(grid.table)))
    key = np.random.default_rng(seed).random(todo.size)
    return todo[np.lexsort((key, level))]


def first_pass_size(grid: TileGrid) -> int:
    """How many tiles the coarse lattice (the first pass of :func:`spread_order`) has."""
    r = grid.table["row"].to_numpy(dtype=np.int64)
    c = grid.table["col"].to_numpy(dtype=np.int64)
    return int((level_of(r, c, coarse_step(len(grid.table))) == 0).sum())


def nearest_fill(grid: TileGrid, values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(N,) ``values`` where ``known``, elsewhere the value of the nearest known tile (in grid cells).

    All NaN when no tile is known. Costs one distance transform of the (n_rows, n_cols) grid: about a
    millisecond at 8,000 tiles.
    """
    from scipy.ndimage import distance_transform_edt

    values = np.asarray(values, dtype=np.float32)
    known = np.asarray(known, dtype=bool)
    if not known.any():
        return np.full(values.shape, np.nan, dtype=np.float32)
    if known.all():
        return values.copy()
    rows = grid.table["row"].to_numpy(dtype=np.intp)
    cols = grid.table["col"].to_numpy(dtype=np.intp)
    shape = (int(grid.n_rows), int(grid.n_cols))
    raster = np.full(shape, np.nan, dtype=np.float32)
    raster[rows[known], cols[known]] = values[known]
    missing = np.ones(shape, dtype=bool)
    missing[rows[known], cols[known]] = False
    _, (ir, ic) = distance_transform_edt(missing, return_indices=True)
    out = values.copy()
    out[~known] = raster[ir[rows[~known], cols[~known]], ic[rows[~known], cols[~known]]]
    return out


@dataclass
class LiveFeatures:
    """Features arriving during a run (progressive painting): rows done so far and their hidden layers."""

    grid: TileGrid
    bundle: ModelBundle
    features: np.ndarray  # (N, dim) float32, valid where ``done``
    hidden: list  # per fold (N, h) torch tensors, valid where ``done``
    done: np.ndarray  # (N,) bool

    @property
    def n_done(self) -> int:
        return int(self.done.sum())


#: Largest backbone (parameters) whose blank warm-up batch runs on a CPU. The blank batch costs as much as
#: a real one: for ResNet50 (25 M) about 1 s, hidden behind the tiling; for a ViT-L/H/g foundation model
#: (0.3-1.1 G) it would cost several times the tiling it overlaps and delay the first tiles instead.
WARM_UP_MAX_CPU_PARAMS = 100_000_000


def warm_up_extraction(
    backbone, batch_size: int, precision: str = "auto", input_px: int | None = None
) -> None:
    """Set up what an extraction needs before its first tile, so that the first painted tiles come sooner.

    Runs the backbone once on a batch of blank tiles, as the extraction will (same batch shape and precision:
    the first batch costs about 1 s more than the next ones, kernel set-up; on a CPU only for backbones up to
    :data:`WARM_UP_MAX_CPU_PARAMS`). Meant for a thread while the slide is tiled. Failures are left to the
    real run to report. ``input_px``: the tiles' side when they are fed as read (not resized).
    """
    from ..features.extraction import BatchRunner

    try:
        n_params = sum(p.numel() for p in backbone.parameters())
        if backbone.device.type != "cpu" or n_params <= WARM_UP_MAX_CPU_PARAMS:
            px = int(input_px or backbone.input_px)
            blank = np.full((int(batch_size), px, px, 3), 255, dtype=np.uint8)
            BatchRunner(backbone, batch_size, precision, resize=input_px is None)(blank)
    except Exception:  # noqa: BLE001 - the extraction that follows raises the same error with its context
        log.debug("extraction warm-up failed", exc_info=True)


def import_supertile_libraries() -> None:
    """Import the clustering library of the run's last step (scikit-learn: 1.5-2 s the first time).

    Meant for a thread started once the coarse map is painted: then it overlaps the rest of the extraction
    instead of delaying either the first tiles or the end of the run.
    """
    try:
        import sklearn.cluster  # noqa: F401
    except Exception:  # noqa: BLE001 - the supertile step raises the same error with its context
        log.debug("scikit-learn import failed", exc_info=True)


def extraction_hooks(
    session: SlideSession,
    bundle: ModelBundle,
    backbone,
    batch_size: int,
    cache_dir: str | Path | None,
    grid_ready: Callable[[TileGrid], None] | None,
    batch_ready: Callable[[int, int], None] | None,
) -> dict[str, Callable]:
    """The ``order``, ``grid_ready`` and ``batch_ready`` hooks of a progressive run of
    :meth:`SlideSession.compute_features` (``load_or_extract``'s keywords).

    The tiles go in :func:`spread_order`; each batch is kept in the session's ``live`` features
    (:meth:`SlideSession.take_batch`) before ``batch_ready(n_done, n_total)`` is called. While the slide is
    tiled the backbone's first batch is run (:func:`warm_up_extraction`, when the features are not cached);
    once the coarse map is done, the last step's library is imported (:func:`import_supertile_libraries`).
    """
    from ..features.cache import cache_path
    from ..features.extraction import ExtractOptions

    warm = None
    coarse = {"size": None, "imports": None}
    options = ExtractOptions.for_model(bundle)  # its tile size and input side name its store
    if not cache_path(session.slide, backbone, bundle.tile_um, cache_dir, options=options).exists():
        # While the slide is tiled: the backbone's first batch.
        warm = threading.Thread(
            target=warm_up_extraction,
            args=(backbone, batch_size, "auto", options.input_px),
            name="he2rna-warm-up",
            daemon=True,
        )
        warm.start()

    def order(grid: TileGrid, rows: np.ndarray) -> np.ndarray:
        if warm is not None:
            warm.join()  # the extraction starts once the warm-up is done: they would share the cores
        return spread_order(grid, rows)

    def on_grid(grid: TileGrid) -> None:
        session.start_live(grid, bundle, backbone.dim)
        coarse["size"] = first_pass_size(grid)
        if grid_ready is not None:
            grid_ready(grid)

    def on_batch(rows: np.ndarray, feats: np.ndarray) -> None:
        live = session.take_batch(bundle, rows, feats)
        if live is None:
            return
        if coarse["imports"] is None and live.n_done >= (coarse["size"] or 0):
            # The coarse map is there: the last step's import now overlaps the rest of the extraction.
            coarse["imports"] = threading.Thread(
                target=import_supertile_libraries, name="he2rna-imports", daemon=True
            )
            coarse["imports"].start()
        if batch_ready is not None:
            batch_ready(live.n_done, len(live.done))

    return {"order": order, "batch_ready": on_batch, "grid_ready": on_grid}
