"""The tile grid the truth is binned into.

The grid is duck-typed (see ``tiling.TileGrid``): ``grid.table`` with ``row`` and ``col``,
``grid.tile_px``, ``grid.mpp``, ``grid.n_rows``, ``grid.n_cols`` and ``grid.slide_dimensions`` (width,
height) in level-0 px. Tile (row, col) covers level-0 x in ``[col * tile_px, (col + 1) * tile_px)``, y
likewise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def tile_index(grid: Any) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the tiles of ``grid.table``, int64, in its order."""
    table = grid.table
    return table["row"].to_numpy(np.int64), table["col"].to_numpy(np.int64)
