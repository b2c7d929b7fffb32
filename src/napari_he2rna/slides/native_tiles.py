"""A slide's TIFF tile grids decoded natively (tifffile + imagecodecs), one region's tiles on several threads.

OpenSlide reads through level-0 coordinates and resamples a level whose downsample is not an integer (Aperio
writes 2.0005, 4.0002, ...), shifting every chunk off the level's origin; :class:`NativeTiles` reads a level's
own tiles instead, for the vendors in :data:`NATIVE_VENDORS` (the OpenSlide backend checks it against
OpenSlide's pixels first, see :mod:`.backends`).

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from .pixels import composite, paint

__all__ = ["NativeTiles", "NATIVE_VENDORS", "NATIVE_TOLERANCE", "NATIVE_CACHE_BYTES", "DECODE_THREADS"]

# OpenSlide vendors whose levels are plain TIFF tile grids, read natively by tifffile + imagecodecs so that a
# level's pixels are its own at every position (OpenSlide reads through level-0 coordinates and resamples a
# level whose downsample is not an integer, e.g. Aperio's 2.0005). Other vendors stitch, overlap or offset
# their tiles (Ventana, Leica, Philips sparse tiles, Hamamatsu), which only OpenSlide knows how to do.
NATIVE_VENDORS = ("aperio", "generic-tiff")
# Largest difference (grey levels) between two JPEG decoders' pixels that still counts as the same pixels.
NATIVE_TOLERANCE = 2
# Decoded tiles kept per slide (bytes): neighbouring tile reads share native tiles.
NATIVE_CACHE_BYTES = 64 * 2**20
# Threads that decode the tiles of one region together (the reading thread is one of them): a viewport read
# by a single dask task still uses every core. imagecodecs releases the GIL while it decodes.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_decode_pool: Any = None
_decode_pool_lock = threading.Lock()


def _in_parallel(work: Any, items: list) -> None:
    """``work(part)`` for parts of ``items``: one part in this thread, the others on the decode pool.

    A part the pool has not started yet (its threads are busy with another region) is taken back and run
    here, so a busy pool never leaves this thread waiting idle.
    """
    global _decode_pool
    parts = min(len(items), DECODE_THREADS)
    if parts < 2:
        work(items)
        return
    if _decode_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        with _decode_pool_lock:
            if _decode_pool is None:
                _decode_pool = ThreadPoolExecutor(DECODE_THREADS - 1, thread_name_prefix="he2rna-decode")
    chunks = [items[i::parts] for i in range(parts)]
    futures = [_decode_pool.submit(work, part) for part in chunks[1:]]
    try:
        work(chunks[0])
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    for future, part in zip(futures, chunks[1:], strict=True):
        if future.cancel():
            work(part)
        else:
            future.result()


class NativeTiles:
    """A slide's tile grids read straight from its TIFF pages with tifffile + imagecodecs.

    Each OpenSlide level is matched to the tiled 8-bit RGB(A) page of the same size. Tiles are read under
    a lock on the file handle, decoded outside it (imagecodecs releases the GIL) and kept in a small LRU
    cache.

    Parameters
    ----------
    path : Path
    level_dimensions : list of (width, height)
        The levels to serve, as OpenSlide lists them.
    background : (r, g, b)
        Colour of missing (sparse) tiles, of what lies outside the level, and under transparent pixels.
    """

    def __init__(
        self, path: Path, level_dimensions: list[tuple[int, int]], background: tuple[int, int, int]
    ) -> None:
        import tifffile

        self.name = path.name
        self.background = background
        self.level_dimensions = list(level_dimensions)
        self.tif = tifffile.TiffFile(str(path))
        self.pages: list[Any] = []
        try:
            candidates = [
                page
                for page in self.tif.pages
                if page.is_tiled
                and page.dtype == np.uint8
                and page.samplesperpixel in (3, 4)
                and page.planarconfig == 1
                and page.imagedepth == 1
            ]
            for w, h in self.level_dimensions:
                self.pages.append(
                    next((p for p in candidates if (p.imagewidth, p.imagelength) == (w, h)), None)
                )
        except Exception:
            self.tif.close()
            raise
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        # Tile bytes are read with os.pread on a descriptor of our own: no shared file position, so
        # concurrent reads need no lock (tifffile's handle seeks, and its lock is a no-op unless asked for).
        # Without os.pread (Windows) they go through tifffile's handle under a lock.
        self._fd = os.open(str(path), os.O_RDONLY) if hasattr(os, "pread") else None
        self._file_lock = threading.Lock()
        # per level: (tile height, tile width, tiles across, samples, jpegtables, offsets, byte counts)
        self._grid = [
            None
            if page is None
            else (
                int(page.tilelength),
                int(page.tilewidth),
                math.ceil(page.imagewidth / page.tilewidth),
                int(page.samplesperpixel),
                page.jpegtables,
                page.dataoffsets,
                page.databytecounts,
            )
            for page in self.pages
        ]

    def has(self, level: int) -> bool:
        return self.pages[level] is not None

    def tile_shape(self, level: int) -> tuple[int, int]:
        th, tw = self._grid[level][:2]
        return th, tw

    def _bytes(self, offset: int, count: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, count, offset)
        fh = self.tif.filehandle
        with self._file_lock:
            fh.seek(offset)
            return fh.read(count)

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile ``index`` of ``level`` as (th, tw, samples) uint8, None for a missing tile."""
        key = (level, index)
        with self._cache_lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        th, tw, across, samples, jpegtables, offsets, counts = self._grid[level]
        offset, count = int(offsets[index]), int(counts[index])
        if count == 0 or offset == 0:
            return None
        data = self._bytes(offset, count)
        try:
            if len(data) != count:
                raise ValueError(f"{count - len(data)} bytes missing at the end of the file")
            tile = self.pages[level].decode(data, index, jpegtables=jpegtables)[0]
            tile = np.asarray(tile).reshape(th, tw, samples)
        except Exception as exc:  # imagecodecs raises its own error types per codec
            row, col = divmod(index, across)
            raise SlideError(
                f"{self.name} cannot be read at level {level}, tile ({col * tw}, {row * th}) px of that "
                f"level: its data is damaged ({type(exc).__name__}: {exc})."
            ) from exc
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > NATIVE_CACHE_BYTES and len(self._cache) > 1:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def read(self, level: int, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """The level's own pixels: ``size`` (w, h) from ``location`` (x, y) in level pixels, as RGB."""
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        lw, lh = self.level_dimensions[level]
        th, tw, across, samples, *_ = self._grid[level]
        out = np.empty((h, w, samples), dtype=np.uint8)
        fill = (*self.background, 255)[:samples]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            paint(out, fill)
            return out[..., :3].copy() if samples == 4 else out
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the level: only edge chunks
            paint(out, fill)

        def paste(cells: list[tuple[int, int]]) -> None:
            for row, col in cells:
                ty0, ty1 = max(y0, row * th), min(y1, (row + 1) * th)
                tx0, tx1 = max(x0, col * tw), min(x1, (col + 1) * tw)
                tile = self._tile(level, row * across + col)
                if tile is None:  # a sparse (missing) tile
                    paint(out[ty0 - y : ty1 - y, tx0 - x : tx1 - x], fill)
                    continue
                out[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = tile[
                    ty0 - row * th : ty1 - row * th, tx0 - col * tw : tx1 - col * tw
                ]

        cells = [
            (row, col)
            for row in range(y0 // th, (y1 - 1) // th + 1)
            for col in range(x0 // tw, (x1 - 1) // tw + 1)
        ]
        with self._cache_lock:
            todo = [(r, c) for r, c in cells if (level, r * across + c) not in self._cache]
        if todo:
            decoding = set(todo)
            paste([cell for cell in cells if cell not in decoding])
            _in_parallel(paste, todo)
        else:
            paste(cells)
        return composite(out, self.background) if samples == 4 else out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tif.close()
