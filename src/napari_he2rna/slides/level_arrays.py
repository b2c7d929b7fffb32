"""A slide level as a lazy dask array (napari's multiscale data) whose viewport slices are one read each.

:class:`LevelView` is a level, or a window of one, indexable like a NumPy array: indexing it reads just that
region through :meth:`Slide.read_level_region <napari_he2rna.slides.slide.Slide.read_level_region>`.
:class:`LevelArray` is the dask array over it, chunked along the slide's tile grid.

Why a dask array subclass: dask slices a chunked array into one task per chunk the slice touches plus one
that joins them, and each ``compute()`` spends 0.6-0.9 ms of dask's own work on one core (the slice, graph
optimisation, ordering, the scheduler) while the other cores have nothing to do. A 512 px viewport of a level
chunked 1024 px touches two chunks on average, each of whose reads decodes only a few tiles. And napari turns
dask's task fusion off while it slices (``optimization.fuse.active = False``, see
``napari.utils._dask_utils``), so each of those tasks read its whole chunk: 34 tiles decoded for a 512 px
viewport that shows 9. For a level whose tiles the slide decodes on several threads itself
(:meth:`Slide.parallel_reads`), a viewport slice is therefore one chunk over exactly that region: one task,
one read, its tiles decoded on all cores, whatever dask's optimisation settings.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph
from dask.utils import parse_bytes

if TYPE_CHECKING:
    from .slide import Slide

__all__ = ["LevelView", "LevelArray", "level_array"]

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
    """One pyramid level, or the ``(y, x, height, width)`` window of it, as a NumPy-indexable array:
    ``view[y0:y1, x0:x1]`` reads just that region.

    It is what the level's dask array is built on (``dask.array.from_array``); indexing it reads through
    :meth:`Slide.read_level_region`, so a region holds the level's stored pixels at any downsample.
    """

    def __init__(self, slide: Slide, level: int, window: tuple[int, int, int, int] | None = None) -> None:
        self.slide = slide
        self.level = level
        if window is None:
            width, height = slide.level_dimensions[level]
            window = (0, 0, height, width)
        self.origin = (int(window[0]), int(window[1]))
        self.shape = (int(window[2]), int(window[3]), 3)
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
        oy, ox = self.origin
        region = self.slide.read_level_region((ox + x0, oy + y0), self.level, (x1 - x0, y1 - y0))
        if all(isinstance(i, slice) and i == slice(None) for i in local):
            return region
        return region[tuple(local)]

    def __repr__(self) -> str:
        return (
            f"LevelView({self.slide.path.name!r}, level={self.level}, origin={self.origin}, "
            f"shape={self.shape})"
        )


def _region(index: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` when ``index`` is a basic slice of an (h, w, 3) array that keeps all three
    channels in order (step-1 slices, at most one Ellipsis), else None."""
    if not isinstance(index, tuple):
        index = (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        if index.count(Ellipsis) > 1:
            return None
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    if len(index) > len(shape):
        return None
    index = index + (slice(None),) * (len(shape) - len(index))
    try:
        (y0, y1, ys), (x0, x1, xs), channels = (i.indices(n) for i, n in zip(index, shape, strict=True))
    except (TypeError, ValueError):  # a bound that is not an integer, a zero step: dask says what is wrong
        return None
    if ys != 1 or xs != 1 or channels != (0, shape[2], 1):
        return None
    return y0, max(y0, y1), x0, max(x0, x1)


class LevelArray(da.Array):
    """A native pyramid level as a dask array, chunked along the slide's tile grid, whose viewport slices are
    one task each (see the module's docstring for why).

    A basic slice (step-1 slices keeping the three channels) of a level that :meth:`Slide.parallel_reads`,
    no larger than dask's ``array.chunk-size``, is a one-chunk :class:`LevelArray` over exactly that region;
    other slices, and levels read on one thread, are dask's own (one task per chunk). Everything else
    (``blocks``, ``rechunk``, ``map_blocks``, ``compute`` of the whole level, ...) is a plain dask array's.
    """

    _view: LevelView | None = None

    def __getitem__(self, index: Any) -> da.Array:
        view = self._view
        region = _region(index, self.shape) if view is not None else None
        if region is None:
            return super().__getitem__(index)
        y0, y1, x0, x1 = region
        if (y0, y1, x0, x1) == (0, self.shape[0], 0, self.shape[1]):
            return self
        h, w = y1 - y0, x1 - x0
        too_big = h * w * 3 > parse_bytes(dask.config.get("array.chunk-size"))
        if h == 0 or w == 0 or too_big or not view.slide.parallel_reads(view.level):
            return super().__getitem__(index)
        oy, ox = view.origin
        window = LevelView(view.slide, view.level, (oy + y0, ox + x0, h, w))
        # the name is the region's, so that napari's dask cache finds a region it has already read
        return _region_array(window, name=f"{self.name}-y{y0}-{y1}-x{x0}-{x1}")

    @staticmethod
    def __dask_optimize__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        # Its graph is one read per chunk and nothing else: nothing to cull, fuse or slice. dask's array
        # optimisation of it costs about 0.1 ms of each viewport's compute(), while the other cores wait.
        # (Arrays made from it, by blocks, rechunk, ..., are plain dask arrays, optimised as usual.)
        return dsk

    def chunked(self) -> da.Array:
        """This level as a plain dask array: its slices span its chunks (one task per chunk touched)."""
        return da.Array(self.dask, self.name, self.chunks, meta=self._meta)


def _read_window(view: LevelView) -> np.ndarray:
    return view[:, :]


def _region_array(view: LevelView, name: str) -> LevelArray:
    """The one-chunk :class:`LevelArray` of ``view``'s window: a graph of one task that reads it whole.

    Written as a one-task graph rather than with dask.array.from_array (whose getter layer dask must build,
    then materialise at each compute): 0.2 ms less of dask's time per viewport.
    """
    h, w, _ = view.shape
    graph = HighLevelGraph.from_collections(name, {(name, 0, 0, 0): (_read_window, view)}, dependencies=())
    out = LevelArray(graph, name, ((h,), (w,), (3,)), meta=np.empty((0, 0, 0), dtype=np.uint8))
    out._view = view
    return out


def level_array(view: LevelView, chunk: tuple[int, int], name: str | None = None) -> LevelArray:
    """The :class:`LevelArray` over ``view``, in ``chunk`` = (height, width) px chunks.

    dask.array.from_array fuses a slice of a chunk into the chunk's read (fancy getter) when task fusion is
    on. The name is explicit: dask would otherwise try to hash the slide.
    """
    if name is None:
        name = (
            f"he2rna-slide-{id(view.slide):x}-{next(_ARRAY_IDS)}-level{view.level}-chunk{chunk[0]}x{chunk[1]}"
        )
    arr = da.from_array(
        view,
        chunks=(chunk[0], chunk[1], 3),
        name=name,
        lock=False,
        asarray=True,
        fancy=True,
        inline_array=True,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
    out = LevelArray(arr.dask, arr.name, arr.chunks, meta=arr._meta)
    out._view = view
    return out
