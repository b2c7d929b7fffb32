"""Open a whole-slide image: levels, pixel size, regions, a thumbnail and a lazy dask pyramid.

Three backends sit behind one :class:`Slide`:

- **OpenSlide** (openslide-python with the openslide-bin wheel) for everything OpenSlide reads: Aperio .svs,
  Hamamatsu .ndpi/.vms/.vmu, MIRAX .mrxs, Leica .scn, Ventana .bif, Philips TIFF, DICOM WSI, generic tiled
  TIFF. For Aperio and generic TIFF the pixels come from the TIFF tiles themselves (:class:`NativeTiles`,
  tifffile + imagecodecs): OpenSlide reads through level-0 coordinates and resamples a level whose downsample
  is not an integer (Aperio writes 2.0005, 4.0002, ...), shifting every chunk off the level's origin.
- **tifffile** (+ its zarr store) for OME-TIFF (whose reduced levels live in SubIFDs, which OpenSlide ignores)
  and for TIFFs OpenSlide refuses (e.g. striped, not tiled).
- **Pillow** for small plain images (PNG, JPEG), as a single level.

Coordinates are level-0 pixels, ``(x, y)`` for points and ``(width, height)`` for sizes; arrays are
``(row, col, channel) = (y, x, rgb)``. Every region comes back as ``uint8`` RGB composited onto white (or the
slide's own background colour), never RGBA.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import dask.array as da
import dask.threaded
import numpy as np

from ..errors import MissingMPPError, SlideError

__all__ = ["Slide", "open_slide", "WSI_SUFFIXES", "IMAGE_SUFFIXES", "TIFF_SUFFIXES", "SLIDE_SUFFIXES"]

# Suffixes that promise a whole-slide image: a plain image under one of these names is a mistake to report.
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".dcm", ".vms", ".vmu", ".svslide", ".tf8", ".btf")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = WSI_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES

# Plain images are read whole into memory; beyond Pillow's own decompression-bomb limit (~9.5k px square)
# they must be converted to a tiled pyramid.
MAX_PLAIN_IMAGE_PIXELS = 89_478_485
# Pixel sizes outside this range (µm/px) are not microscope pixel sizes: typically an image editor's default
# 72 or 96 dpi written into the TIFF/PNG resolution tags. Using them would be a silent guess, so they are
# treated as missing (the user is asked for the pixel size instead).
PLAUSIBLE_MPP = (0.01, 100.0)
# The pyramid is padded by 2x coarsening until its smallest level fits this many pixels per side, so that a
# slide with a single huge level does not make napari load that whole level when zoomed out.
PYRAMID_MIN_SIDE = 2048

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAGIC_NAMES = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF87a": "a GIF image",
    b"GIF89a": "a GIF image",
    b"BM": "a BMP image",
    b"PK\x03\x04": "a ZIP archive",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
}
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- helpers
def _sniff(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(16)


def _magic_name(head: bytes) -> str | None:
    for magic, name in _MAGIC_NAMES.items():
        if head.startswith(magic):
            return name
    return None


def _parse_background(props: dict[str, str]) -> tuple[int, int, int]:
    """OpenSlide's ``openslide.background-color`` (``RRGGBB`` hex) or white."""
    text = props.get("openslide.background-color", "")
    try:
        value = int(text, 16)
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    except ValueError:
        return (255, 255, 255)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(h, w, 4) uint8 RGBA (not premultiplied) -> (h, w, 3) uint8 RGB over ``background``.

    One copy of the RGB planes; the blend (in uint16) touches only the pixels that are not opaque, so a
    region inside the scan costs a copy and an alpha scan, nothing more.
    """
    out = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the common case inside the tissue scan
        return out
    where = alpha != 255
    a = alpha[where][:, None].astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out[where] = ((out[where].astype(np.uint16) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
    return out


def _fill(out: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint an (h, w, c) uint8 block with one colour.

    ``out[...] = colour`` broadcasts a 3-vector pixel by pixel (1.6 ms for 512 x 512); one row painted, then
    copied row by row, runs at memory speed.
    """
    if out.size == 0:
        return
    out[0] = colour
    out[1:] = out[0]


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _resolution_mpp(x_resolution: Any, unit: Any) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit, maybe a (num, den) rational) and ResolutionUnit."""
    if isinstance(x_resolution, tuple | list) and len(x_resolution) == 2:
        num, den = x_resolution
        x_resolution = num / den if den else None
    else:
        x_resolution = (
            _float(str(x_resolution).split("/")[0]) if isinstance(x_resolution, str) else x_resolution
        )
    res = _float(x_resolution)
    if res is None:
        return None
    unit = str(unit).lower()
    if unit in ("centimeter", "3", "resunit.centimeter"):
        return 10_000.0 / res
    if unit in ("inch", "2", "resunit.inch"):
        return 25_400.0 / res
    return None  # "none"/1: the numbers have no physical unit


def _plausible(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def validate_mpp(mpp: Any) -> float:
    """A user-given pixel size as a positive float (µm/px), or :class:`SlideError` saying what was wrong."""
    value = _float(mpp)
    if value is None:
        raise SlideError(f"The pixel size must be a positive number of µm per pixel, not {mpp!r}.")
    if _plausible(value) is None:
        raise SlideError(
            f"The pixel size {value:g} µm/px is outside what a microscope produces: give one between "
            f"{PLAUSIBLE_MPP[0]:g} and {PLAUSIBLE_MPP[1]:g} µm/px (0.25 at 40x, 0.5 at 20x)."
        )
    return value


def _chunk_for_tile(tile: int | None, chunk: int) -> int:
    """A chunk side that is a whole number of the slide's tiles, at most ``chunk`` (or one large tile)."""
    if not tile or tile <= 0:
        return chunk
    if tile >= chunk:
        return tile if tile <= 4 * chunk else chunk
    return tile * (chunk // tile)


def _halve(block: np.ndarray) -> np.ndarray:
    """2x2 mean of an (h, w, 3) uint8 block with even h and w, rounded, as uint8."""
    h, w, c = block.shape
    acc = block.reshape(h // 2, 2, w // 2, 2, c).sum(axis=(1, 3), dtype=np.uint16)
    return ((acc + 2) // 4).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- backends
class _Backend:
    """What a backend tells :class:`Slide`.

    ``read(location, level, size)`` takes ``location`` in level-0 pixels (OpenSlide's convention);
    ``read_level(location, level, size)`` takes it in pixels *of that level* and returns the level's stored
    pixels there, never resampled.
    """

    vendor: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    tile_sizes: list[int | None]
    properties: dict[str, str]
    mpp: float | None
    objective_power: float | None
    background: tuple[int, int, int] = (255, 255, 255)

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read_level((round(location[0] / ds), round(location[1] / ds)), level, size)

    def read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OpenSlideBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import openslide

        self._openslide = openslide
        self.handle = openslide.OpenSlide(str(path))
        props = dict(self.handle.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor", "openslide")
        self.level_dimensions = [tuple(map(int, d)) for d in self.handle.level_dimensions]
        self.level_downsamples = [float(d) for d in self.handle.level_downsamples]
        self.tile_sizes = [
            int(props[f"openslide.level[{i}].tile-width"])
            if f"openslide.level[{i}].tile-width" in props
            else None
            for i in range(len(self.level_dimensions))
        ]
        mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        if mpp is None and "tiff.XResolution" in props:
            mpp = _resolution_mpp(props["tiff.XResolution"], props.get("tiff.ResolutionUnit", ""))
        self.raw_mpp = mpp
        self.mpp = _plausible(mpp)
        self.objective_power = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.background = _parse_background(props)
        self.name = path.name
        self.native: NativeTiles | None = None
        if self.vendor in NATIVE_VENDORS:
            try:
                self.native = NativeTiles(path, self.level_dimensions, self.background)
            except Exception as exc:  # not parseable by tifffile: OpenSlide alone reads it
                _log.info("%s: reading through OpenSlide only (%s)", path.name, exc)
        # Per level: True once a native read was checked against OpenSlide's (exact) read at the level's
        # origin, False when it did not match (then OpenSlide reads that level), None before the check.
        self._native_ok: list[bool | None] = [None] * len(self.level_dimensions)
        self._check_lock = threading.Lock()

    def _use_native(self, level: int) -> bool:
        if self.native is None or not self.native.has(level):
            return False
        with self._check_lock:
            if self._native_ok[level] is None:
                self._native_ok[level] = self._native_matches(level)
        return bool(self._native_ok[level])

    def _native_matches(self, level: int) -> bool:
        """Whether tifffile's decode of the level's first tile equals OpenSlide's (within JPEG rounding)."""
        w, h = self.level_dimensions[level]
        side = self.native.tile_shape(level)
        size = (min(side[1], w), min(side[0], h))
        try:
            mine = self.native.read(level, (0, 0), size)
        except SlideError:
            return True  # a damaged first tile: the native reader names it; OpenSlide could only fail too
        theirs = self._openslide_read((0, 0), level, size)  # the origin: no fractional offset, no resampling
        diff = int(np.abs(mine.astype(np.int16) - theirs.astype(np.int16)).max())
        if diff > NATIVE_TOLERANCE:
            _log.warning(
                "%s level %d: tifffile's pixels differ from OpenSlide's by %d; reading it through OpenSlide",
                self.name,
                level,
                diff,
            )
        return diff <= NATIVE_TOLERANCE

    def _openslide_read(self, location, level, size):
        try:
            image = self.handle.read_region(location, level, size)
        except self._openslide.OpenSlideError as exc:
            ds = self.level_downsamples[level]
            raise SlideError(
                f"{self.name} cannot be read at level {level} near ({round(location[0] / ds)}, "
                f"{round(location[1] / ds)}) px of that level, the file is damaged there ({exc})."
            ) from exc
        return _composite(np.asarray(image), self.background)

    def read(self, location, level, size):
        if self._use_native(level):
            return super().read(location, level, size)
        return self._openslide_read(location, level, size)

    def read_level(self, location, level, size):
        if self._use_native(level):
            return self.native.read(level, location, size)
        # OpenSlide takes level-0 coordinates: exact when the downsample is an integer, resampled by a
        # fraction of a pixel otherwise (formats whose tiles it alone can read).
        ds = self.level_downsamples[level]
        return self._openslide_read((round(location[0] * ds), round(location[1] * ds)), level, size)

    def close(self) -> None:
        self.handle.close()
        if self.native is not None:
            self.native.close()


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
            _fill(out, fill)
            return out[..., :3].copy() if samples == 4 else out
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the level: only edge chunks
            _fill(out, fill)

        def paste(cells: list[tuple[int, int]]) -> None:
            for row, col in cells:
                ty0, ty1 = max(y0, row * th), min(y1, (row + 1) * th)
                tx0, tx1 = max(x0, col * tw), min(x1, (col + 1) * tw)
                tile = self._tile(level, row * across + col)
                if tile is None:  # a sparse (missing) tile
                    _fill(out[ty0 - y : ty1 - y, tx0 - x : tx1 - x], fill)
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
        return _composite(out, self.background) if samples == 4 else out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tif.close()


class _TiffBackend(_Backend):
    """OME-TIFF and plain (pyramidal) TIFF via tifffile's zarr store: only the needed tiles are decoded."""

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.tif = tifffile.TiffFile(str(path))
        try:
            series = self.tif.series[0]
            axes = series.axes
            levels = series.levels
            if not (axes.endswith("YXS") or axes.endswith("YX")) or any(
                n != 1 for n, a in zip(series.shape, axes, strict=False) if a not in "YXS"
            ):
                raise SlideError(
                    f"{path.name} holds a {axes} image stack, not a single 2-D RGB slide; "
                    "open one plane at a time."
                )
            self._arrays = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(levels))]
            self._axes = axes
            self.level_dimensions = []
            for level in levels:
                shape = dict(zip(axes, level.shape, strict=False))
                self.level_dimensions.append((int(shape["X"]), int(shape["Y"])))
            w0, h0 = self.level_dimensions[0]
            self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
            self.tile_sizes = [lv.keyframe.tilewidth or None for lv in levels]
            self.properties = {}
            page = self.tif.pages.first
            for tag in ("ImageDescription", "XResolution", "YResolution", "ResolutionUnit", "Software"):
                if tag in page.tags:
                    self.properties[f"tiff.{tag}"] = str(page.tags[tag].value)
            self.vendor = "ome-tiff" if self.tif.is_ome else "generic-tiff"
            mpp, self.objective_power = None, None
            if self.tif.is_ome:
                mpp, self.objective_power = self._ome_facts()
            if mpp is None and "XResolution" in page.tags:
                mpp = _resolution_mpp(
                    page.tags["XResolution"].value,
                    page.tags["ResolutionUnit"].value.name if "ResolutionUnit" in page.tags else "inch",
                )
            self.raw_mpp = mpp
            self.mpp = _plausible(mpp)
        except Exception:
            self.tif.close()
            raise

    def _ome_facts(self) -> tuple[float | None, float | None]:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(self.tif.ome_metadata or "")
        except ET.ParseError:
            return None, None
        mpp = power = None
        for el in root.iter():
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "Pixels" and mpp is None:
                size = _float(el.get("PhysicalSizeX"))
                unit = el.get("PhysicalSizeXUnit", "µm")
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                if size is not None and factor is not None:
                    mpp = size * factor
                    self.properties["ome.PhysicalSizeX"] = el.get("PhysicalSizeX", "")
                    self.properties["ome.PhysicalSizeXUnit"] = unit
            elif tag == "Objective" and power is None:
                power = _float(el.get("NominalMagnification"))
        return mpp, power

    def read_level(self, location, level, size):
        x, y = location
        w, h = size
        lw, lh = self.level_dimensions[level]
        out = np.empty((h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the level
            _fill(out, self.background)
        if x1 <= x0 or y1 <= y0:
            return out
        index = tuple(
            slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "S" else 0
            for a in self._axes
        )
        try:
            part = np.asarray(self._arrays[level][index])
            kept = [a for a in self._axes if a in "YXS"]
            if kept != ["Y", "X", "S"][: len(kept)]:  # planar RGB (SYX): samples first on disk
                part = np.transpose(part, [kept.index(a) for a in "YXS" if a in kept])
        except Exception as exc:  # tifffile/zarr raise many types for damaged tiles
            raise SlideError(
                f"{self.tif.filename} cannot be read at level {level}, region ({x0}, {y0}) px of that level: "
                f"its data is damaged ({type(exc).__name__}: {exc})."
            ) from exc
        if part.ndim == 2:  # greyscale
            part = np.repeat(part[..., None], 3, axis=2)
        if part.dtype != np.uint8:
            part = _to_uint8(part)
        if part.shape[2] == 4:
            part = _composite(part, self.background)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part[..., :3]
        return out

    def close(self) -> None:
        self.tif.close()


def _to_uint8(part: np.ndarray) -> np.ndarray:
    if part.dtype == np.uint16:  # 16-bit brightfield scans: keep the top byte
        return (part >> 8).astype(np.uint8)
    if part.dtype == bool:
        return part.astype(np.uint8) * 255
    return np.clip(part, 0, 255).astype(np.uint8)


class _ImageBackend(_Backend):
    """A small plain image (PNG, JPEG): read whole once, single level."""

    def __init__(self, path: Path) -> None:
        from PIL import Image

        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise SlideError(
                f"{path.name} is a plain image too large to read whole; convert it to a tiled pyramidal TIFF."
            ) from exc
        with image:
            if image.width * image.height > MAX_PLAIN_IMAGE_PIXELS:
                raise SlideError(
                    f"{path.name} is a {image.width}x{image.height} plain image, too large to read whole; "
                    "convert it to a tiled pyramidal TIFF first."
                )
            self.properties = {
                f"image.{k}": str(v)
                for k, v in image.info.items()
                if isinstance(v, str | int | float | tuple)
            }
            self.properties["image.format"] = str(image.format)
            dpi = image.info.get("dpi")
            rgba = image.convert("RGBA")
            self.vendor = "image"
            self.background = (255, 255, 255)
            self.pixels = _composite(np.asarray(rgba), self.background)
        self.level_dimensions = [(self.pixels.shape[1], self.pixels.shape[0])]
        self.level_downsamples = [1.0]
        self.tile_sizes = [None]
        self.raw_mpp = _resolution_mpp(dpi[0], "inch") if dpi else None
        self.mpp = _plausible(self.raw_mpp)
        self.objective_power = None

    def read_level(self, location, level, size):
        x, y = location
        w, h = size
        lw, lh = self.level_dimensions[0]
        out = np.empty((h, w, 3), dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):  # partly outside the image
            _fill(out, self.background)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.pixels[y0:y1, x0:x1]
        return out


# --------------------------------------------------------------------------------------------------- choosing
class _TifffileWarnings(logging.Handler):
    """Collects tifffile's warnings (it logs damaged directories, not raises) and keeps them off stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("tifffile")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TifffileWarnings:
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _tiff_damage(path: Path) -> str | None:
    """Why a TIFF file looks truncated or damaged, or None when its directories and tile data all fit."""
    import tifffile

    size = path.stat().st_size
    with _TifffileWarnings() as warnings:
        try:
            with tifffile.TiffFile(str(path)) as tif:
                pages = list(tif.pages)
                if not pages:
                    return "it has no readable image directory"
                for page in pages:
                    ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts, strict=False) if b]
                    if ends and max(ends) > size:
                        return "its image data runs past the end of the file"
        except Exception as exc:
            return f"its TIFF structure cannot be parsed ({exc})"
    if any("offset" in m for m in warnings.messages):
        return "its image directories point past the end of the file"
    return None


def _open_backend(path: Path) -> _Backend:
    import openslide

    suffix = path.suffix.lower()
    head = _sniff(path)
    is_tiff = head[:4] in _TIFF_MAGIC
    is_ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    plain = _magic_name(head)

    if plain is not None and suffix in WSI_SUFFIXES:
        rename = ".png" if "PNG" in plain else ".jpg" if "JPEG" in plain else None
        hint = f"; rename it to {rename} to open it as a plain image" if rename else ""
        raise SlideError(f"{path.name} is {plain}, not a whole-slide image{hint}.")

    if is_tiff and not is_ome:
        import tifffile

        try:
            with _TifffileWarnings(), tifffile.TiffFile(str(path)) as tif:
                is_ome = bool(tif.is_ome)
        except Exception:  # damaged: reported below once OpenSlide has had its say
            pass

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    # OpenSlide reads OME-TIFF as a one-level generic TIFF (it ignores SubIFD pyramids and OME pixel sizes).
    if fmt is not None and not (is_ome and fmt == "generic-tiff"):
        try:
            return _OpenSlideBackend(path)
        except openslide.OpenSlideError as exc:
            damage = _tiff_damage(path) if is_tiff else None
            if damage is not None:
                raise SlideError(f"{path.name} is truncated or damaged: {damage}.") from exc
            raise SlideError(f"OpenSlide recognised {path.name} as {fmt} but cannot open it: {exc}.") from exc

    if is_tiff:
        damage = _tiff_damage(path)
        if damage is not None:
            raise SlideError(f"{path.name} is truncated or damaged: {damage}.")
        if suffix in WSI_SUFFIXES and not is_ome:
            raise SlideError(
                f"{path.name} is a TIFF file that OpenSlide does not recognise as a {suffix} slide."
            )
        try:
            return _TiffBackend(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{path.name} is a TIFF file that neither OpenSlide nor tifffile can read: {exc}."
            ) from exc

    if plain is not None and suffix not in WSI_SUFFIXES:
        try:
            return _ImageBackend(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{path.name} is {plain} that Pillow cannot decode (truncated?): {exc}."
            ) from exc

    what = f"it is {plain}" if plain else "its content matches no format OpenSlide, tifffile or Pillow reads"
    raise SlideError(f"{path.name} is not a slide this plugin can open: {what}.")


# --------------------------------------------------------------------------------------------------- Slide
_ARRAY_IDS = itertools.count()


def _axis_window(index: Any, n: int) -> tuple[int, int, Any]:
    """``(lo, hi, local)``: the window ``[lo, hi)`` of an axis of length ``n`` that ``index`` touches, and the
    index that picks the same elements out of that window."""
    if isinstance(index, slice):
        start, stop, step = index.indices(n)
        if step == 1:
            return start, max(start, stop), slice(None)
        picked = range(start, stop, step)
        if not picked:
            return 0, 0, slice(0, 0)
        lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
        end = picked[-1] - lo + (1 if step > 0 else -1)
        return lo, hi, slice(picked[0] - lo, end if end >= 0 else None, step)
    if isinstance(index, int | np.integer):
        i = int(index) + (n if index < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {int(index)} is out of bounds for an axis of {n}")
        return i, i + 1, 0
    picked = np.asarray(index)
    if picked.dtype == bool:
        picked = np.flatnonzero(picked)
    picked = np.where(picked < 0, picked + n, picked).astype(np.intp)
    if picked.size == 0:
        return 0, 0, picked
    lo = int(picked.min())
    return lo, int(picked.max()) + 1, picked - lo


class LevelView:
    """One pyramid level as a NumPy-indexable array: ``view[y0:y1, x0:x1]`` reads just that region.

    It is what the level's dask array is built on (``dask.array.from_array``); indexing it reads through
    :meth:`Slide.read_level_region`, so a region holds the level's stored pixels at any downsample.
    """

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide = slide
        self.level = level
        width, height = slide.level_dimensions[level]
        self.shape = (height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        if any(i is Ellipsis for i in index):
            at = next(k for k, i in enumerate(index) if i is Ellipsis)
            rest = 3 - (len(index) - 1 - sum(i is None for i in index))
            index = index[:at] + (slice(None),) * rest + index[at + 1 :]
        spatial: list[tuple[int, int]] = []
        local: list[Any] = []
        for i in index:
            if i is None:
                local.append(None)
            elif len(spatial) < 2:
                lo, hi, pick = _axis_window(i, self.shape[len(spatial)])
                spatial.append((lo, hi))
                local.append(pick)
            else:
                local.append(i)
        while len(spatial) < 2:
            spatial.append((0, self.shape[len(spatial)]))
        (y0, y1), (x0, x1) = spatial
        region = self.slide.read_level_region((x0, y0), self.level, (x1 - x0, y1 - y0))
        if all(isinstance(i, slice) and i == slice(None) for i in local):
            return region
        return region[tuple(local)]

    def __repr__(self) -> str:
        return f"LevelView({self.slide.path.name!r}, level={self.level}, shape={self.shape})"


class Slide:
    """An open whole-slide image. Use :func:`open_slide`; close it (or use ``with``) to free the file handle.

    Attributes
    ----------
    path : Path
    vendor : str
        ``"aperio"``, ``"hamamatsu"``, ``"generic-tiff"``, ``"ome-tiff"``, ``"dicom"``, ``"image"``, ...
    dimensions : tuple[int, int]
        Level-0 ``(width, height)`` in pixels.
    level_count : int
    level_dimensions : list[tuple[int, int]]
        ``(width, height)`` of each native level.
    level_downsamples : list[float]
        Level-0 pixels per pixel of each native level.
    mpp : float or None
        µm per level-0 pixel; a user-given value overrides the file's; None when unknown.
    objective_power : float or None
        The scanner's objective magnification (e.g. 20, 40) when the file says it.
    properties : dict[str, str]
        The file's metadata (OpenSlide property names where OpenSlide reads the file).
    """

    def __init__(self, path: Path, backend: _Backend, mpp: float | None = None) -> None:
        self.path = path
        self._backend = backend
        self.vendor = backend.vendor
        self.level_dimensions = list(backend.level_dimensions)
        self.level_downsamples = list(backend.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.objective_power = backend.objective_power
        self.properties = dict(backend.properties)
        self.file_mpp = backend.mpp
        self._raw_mpp = getattr(backend, "raw_mpp", None)
        self._mpp = validate_mpp(mpp) if mpp is not None else backend.mpp
        self._tile_sizes = list(backend.tile_sizes)
        self._closed = False
        self._active_reads = 0
        self._state = threading.Condition()
        self._pyramids: dict[int, tuple[list[da.Array], list[float]]] = {}

    # -------------------------------------------------------------- pixel size
    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel, or None when neither the file nor the user gave it."""
        return self._mpp

    @mpp.setter
    def mpp(self, value: float | None) -> None:
        self._mpp = None if value is None else validate_mpp(value)

    def require_mpp(self) -> float:
        """The pixel size in µm/px, or :class:`MissingMPPError` telling the user how to give it."""
        if self._mpp is not None:
            return self._mpp
        said = ""
        if self._raw_mpp is not None:
            said = f" (its resolution tags say {self._raw_mpp:.4g} µm/px, an image editor's default)"
        raise MissingMPPError(
            f"{self.path.name} does not say its pixel size{said}: give it in µm/px with --mpp "
            "on the command line "
            "or in the µm/px field of the Slide widget."
        )

    # -------------------------------------------------------------- reading
    def _read(
        self, location: tuple[int, int], level: int, size: tuple[int, int], in_level: bool = False
    ) -> np.ndarray:
        # Reads run concurrently (OpenSlide and tifffile are thread safe); close() waits for them to finish so
        # a napari render thread never touches a freed OpenSlide handle.
        with self._state:
            if self._closed:
                raise SlideError(f"{self.path.name} was closed; open it again to read it.")
            self._active_reads += 1
        try:
            if in_level:
                return self._backend.read_level(location, level, size)
            return self._backend.read(location, level, size)
        finally:
            with self._state:
                self._active_reads -= 1
                self._state.notify_all()

    def _read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return self._read(location, level, size, in_level=True)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region as RGB.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in level-0 pixels.
        level : int
            Native level to read from, ``0 <= level < level_count``.
        size : (width, height)
            Size in pixels *of that level*.

        Returns
        -------
        np.ndarray
            ``(height, width, 3)`` uint8; outside the slide is the background colour (white).
        """
        w, h = self._checked_size(level, size)
        if w == 0 or h == 0:
            return np.empty((h, w, 3), dtype=np.uint8)
        return self._read((int(location[0]), int(location[1])), level, (w, h))

    def _checked_size(self, level: int, size: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"Level {level} does not exist: {self.path.name} has levels 0 to {self.level_count - 1}."
            )
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise SlideError(f"A region size must not be negative, got {w}x{h}.")
        return w, h

    def read_level_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region of one level in that level's own pixel coordinates: its stored pixels, not resampled.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in pixels *of that level*.
        level : int
            Native level, ``0 <= level < level_count``.
        size : (width, height)
            Size in pixels of that level.

        Returns
        -------
        np.ndarray
            ``(height, width, 3)`` uint8; outside the level is the background colour (white).
        """
        w, h = self._checked_size(level, size)
        if w == 0 or h == 0:
            return np.empty((h, w, 3), dtype=np.uint8)
        return self._read_level((int(location[0]), int(location[1])), level, (w, h))

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest native level whose downsample is at most ``downsample`` (level 0 if none)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    # -------------------------------------------------------------- pyramid
    def _level_array(self, level: int, chunk: int) -> da.Array:
        width, height = self.level_dimensions[level]
        side = _chunk_for_tile(self._tile_sizes[level], chunk)
        # dask.array.from_array over a view that reads regions on demand: dask fuses a viewport's slice of a
        # chunk into the chunk's read (fancy getter), so a 512 px viewport reads only the tiles it shows,
        # not its four whole chunks. The name is explicit: dask would otherwise try to hash the slide.
        return da.from_array(
            LevelView(self, level),
            chunks=(side, side, 3),
            name=f"he2rna-slide-{id(self):x}-{next(_ARRAY_IDS)}-level{level}-chunk{side}",
            lock=False,
            asarray=True,
            fancy=True,
            inline_array=True,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )

    def pyramid(self, chunk: int = 1024) -> list[da.Array]:
        """The slide as a lazy multiscale pyramid for napari.

        One dask array per native level, chunked along the slide's own tile grid (a whole number of tiles, at
        most ``chunk`` px), read on demand in the level's own pixel coordinates (:meth:`read_level_region`,
        so chunks hold the stored pixels at any downsample). A slice of a level reads only the region it
        covers (dask fuses the slice into each chunk's read), and the tiles of one read are decoded on all
        cores. Then 2x-coarsened levels until the smallest fits :data:`PYRAMID_MIN_SIDE` px. Building it
        reads no pixels.

        Parameters
        ----------
        chunk : int
            Largest chunk side in pixels. Large chunks mean few dask tasks per viewport (dask's per-task
            scheduling costs more than a tile's decode); a slice still reads only what it covers.

        Returns
        -------
        list of dask.array.Array
            ``(height, width, 3)`` uint8 per level, finest first; see :attr:`pyramid_downsamples`.
        """
        if chunk < 16:
            raise SlideError(f"The pyramid chunk size must be at least 16 px, got {chunk}.")
        if chunk not in self._pyramids:
            levels = [self._level_array(i, chunk) for i in range(self.level_count)]
            downsamples = list(self.level_downsamples)
            while max(levels[-1].shape[:2]) > PYRAMID_MIN_SIDE and min(levels[-1].shape[:2]) >= 2:
                levels.append(_coarsen(levels[-1], chunk))
                downsamples.append(downsamples[-1] * 2.0)
            self._pyramids[chunk] = (levels, downsamples)
        return list(self._pyramids[chunk][0])

    @property
    def pyramid_downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each :meth:`pyramid` level (native, then x2 per padded level)."""
        if not self._pyramids:
            self.pyramid()
        return list(next(iter(self._pyramids.values()))[1])

    # -------------------------------------------------------------- overview
    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, shrunk to fit ``max_size`` px on its longer side (never enlarged).

        Reads the coarsest pyramid level that is still at least ``max_size`` px, chunk by chunk.

        Returns
        -------
        np.ndarray
            ``(h, w, 3)`` uint8.
        """
        from PIL import Image

        levels = self.pyramid()
        pick = levels[0]
        for level in levels:
            if max(level.shape[:2]) >= max_size:
                pick = level
        # dask's threaded scheduler passed as a function: by name, dask imports dask.distributed first to
        # look for a client (~0.9 s on the first thumbnail of a process, i.e. before a viewer's first Run).
        pixels = pick.compute(scheduler=dask.threaded.get)
        h, w = pixels.shape[:2]
        width, height = self.dimensions
        scale = min(1.0, max_size / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if (w, h) == size:
            return pixels
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))

    def fingerprint(self) -> str:
        """A stable hex digest of the file's identity: size, first and last 64 KiB, dimensions.

        Independent of the file's path and modification time, so a copied or touched slide keeps its cache.
        """
        digest = hashlib.sha256()
        size = self.path.stat().st_size
        digest.update(f"{size}|{self.dimensions}|{self.level_dimensions}".encode())
        with open(self.path, "rb") as fh:
            digest.update(fh.read(65536))
            if size > 65536:
                fh.seek(max(65536, size - 65536))
                digest.update(fh.read(65536))
        quickhash = self.properties.get("openslide.quickhash-1")
        if quickhash:
            digest.update(quickhash.encode())
        return digest.hexdigest()

    # -------------------------------------------------------------- lifetime
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the file handle, after any read in flight has finished. Later reads raise SlideError."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._active_reads:
                self._state.wait()
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} µm/px" if self.mpp else "unknown µm/px"
        return (
            f"Slide({self.path.name!r}, vendor={self.vendor!r}, "
            f"{self.dimensions[0]}x{self.dimensions[1]} px, "
            f"{self.level_count} level(s), {mpp})"
        )

    def facts(self) -> dict[str, Any]:
        """What a person wants to know about the slide, in display order (CLI and Slide widget)."""
        levels = ", ".join(
            f"{w}x{h} (x{ds:.4g})"
            for (w, h), ds in zip(self.level_dimensions, self.level_downsamples, strict=True)
        )
        return {
            "file": str(self.path),
            "vendor": self.vendor,
            "dimensions": f"{self.dimensions[0]} x {self.dimensions[1]} px",
            "levels": f"{self.level_count}: {levels}",
            "µm/px": f"{self.mpp:.4g}" if self.mpp is not None else "unknown",
            "objective": f"{self.objective_power:g}x" if self.objective_power else "unknown",
        }


def _coarsen(level: da.Array, chunk: int) -> da.Array:
    """Half-size level: 2x2 means of ``level`` (odd last row/column dropped), chunked ``chunk`` px."""
    h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
    source = level[:h, :w].rechunk((2 * chunk, 2 * chunk, 3))
    return source.map_blocks(
        _halve,
        chunks=tuple(tuple(c // 2 for c in cs) for cs in source.chunks[:2]) + ((3,),),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image (or a small plain image) for reading.

    Parameters
    ----------
    path : str or PathLike
        The slide file (.svs, .ndpi, .mrxs, .scn, .tif/.tiff, OME-TIFF, .bif, .dcm, .png, .jpg, ...).
    mpp : float, optional
        µm per level-0 pixel; overrides what the file says (and is the way to give it when the file does not).

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        One sentence saying why the file cannot be opened: missing, a folder, empty, truncated, a plain image
        with a slide's name, or a format no backend reads.
    """
    path = Path(path).expanduser()
    if mpp is not None:
        mpp = validate_mpp(mpp)
    if not path.exists():
        raise SlideError(f"No such file: {path}.")
    if path.is_dir():
        raise SlideError(f"{path} is a folder, not a slide file; pick the slide file inside it.")
    if path.stat().st_size == 0:
        raise SlideError(f"{path.name} is empty (0 bytes); copy the slide again.")
    try:
        backend = _open_backend(path)
    except SlideError:
        raise
    except PermissionError as exc:
        raise SlideError(f"{path.name} cannot be read: permission denied.") from exc
    except OSError as exc:
        raise SlideError(f"{path.name} cannot be read: {exc.strerror or exc}.") from exc
    return Slide(path, backend, mpp=mpp)
