"""Open a whole-slide image: levels, pixel size, regions, a thumbnail and a lazy dask pyramid.

Three backends sit behind one :class:`Slide` (:mod:`.backends`): OpenSlide for the whole-slide formats (the
TIFF tiles of Aperio and generic TIFF decoded natively, :mod:`.native_tiles`), tifffile for OME-TIFF and the
TIFFs OpenSlide refuses, Pillow for small plain images.

Coordinates are level-0 pixels, ``(x, y)`` for points and ``(width, height)`` for sizes; arrays are
``(row, col, channel) = (y, x, rgb)``. Every region comes back as ``uint8`` RGB composited onto white (or the
slide's own background colour), never RGBA.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import dask.array as da
import dask.threaded
import numpy as np

from ..errors import MissingMPPError, SlideError
from .backends import PLAUSIBLE_MPP, WSI_SUFFIXES, Backend, open_backend, plausible_mpp, positive_float
from .level_arrays import LevelArray, LevelView, level_array

__all__ = [
    "Slide",
    "LevelView",
    "open_slide",
    "WSI_SUFFIXES",
    "IMAGE_SUFFIXES",
    "TIFF_SUFFIXES",
    "SLIDE_SUFFIXES",
]

# WSI_SUFFIXES (suffixes that promise a whole-slide image) is defined with the backends, which check it.
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = WSI_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES

# The pyramid is padded by 2x coarsening until its smallest level fits this many pixels per side, so that a
# slide with a single huge level does not make napari load that whole level when zoomed out.
PYRAMID_MIN_SIDE = 2048


# --------------------------------------------------------------------------------------------------- helpers
def validate_mpp(mpp: Any) -> float:
    """A user-given pixel size as a positive float (µm/px), or :class:`SlideError` saying what was wrong."""
    value = positive_float(mpp)
    if value is None:
        raise SlideError(f"The pixel size must be a positive number of µm per pixel, not {mpp!r}.")
    if plausible_mpp(value) is None:
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


# --------------------------------------------------------------------------------------------------- Slide
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

    def __init__(self, path: Path, backend: Backend, mpp: float | None = None) -> None:
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
        side = _chunk_for_tile(self._tile_sizes[level], chunk)
        return level_array(LevelView(self, level), (side, side))

    def parallel_reads(self, level: int) -> bool:
        """Whether one read of ``level`` decodes its tiles on several threads (native TIFF tiles), so that a
        viewport is best read in one piece rather than chunk by chunk on dask's threads."""
        return self._backend.parallel_reads(level)

    def pyramid(self, chunk: int = 1024) -> list[da.Array]:
        """The slide as a lazy multiscale pyramid for napari.

        One dask array per native level, chunked along the slide's own tile grid (a whole number of tiles, at
        most ``chunk`` px), read on demand in the level's own pixel coordinates (:meth:`read_level_region`,
        so chunks hold the stored pixels at any downsample). A viewport slice of a level whose tiles decode
        on several threads is one task reading exactly that region, its tiles decoded on all cores
        (:class:`~.level_arrays.LevelArray`); other slices read only the region they cover when dask fuses
        the slice into each chunk's read. Then 2x-coarsened levels until the smallest fits
        :data:`PYRAMID_MIN_SIDE` px. Building it reads no pixels.

        Parameters
        ----------
        chunk : int
            Largest chunk side in pixels: what a whole-level computation, ``blocks``, ``rechunk`` or a slice
            of a level read on one thread works in (a viewport of a level whose tiles decode on several
            threads is one read whatever the chunks), and the coarsened levels' chunk side.

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
    if isinstance(level, LevelArray):  # dask's slicing: a coarse chunk computes its own source chunks only
        level = level.chunked()
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
        backend = open_backend(path)
    except SlideError:
        raise
    except PermissionError as exc:
        raise SlideError(f"{path.name} cannot be read: permission denied.") from exc
    except OSError as exc:
        raise SlideError(f"{path.name} cannot be read: {exc.strerror or exc}.") from exc
    return Slide(path, backend, mpp=mpp)
