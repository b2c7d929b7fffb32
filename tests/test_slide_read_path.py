"""slide.py's read path: a viewport reads only its own tiles, in one task whatever dask fuses, any NumPy index
reads the right pixels, tiles decode on several threads, transparent pixels are composited exactly."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile

from napari_he2rna.slides.slide import LevelView, open_slide

TILE = 256


@pytest.fixture(scope="module")
def rgba_tiff(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A two-level tiled RGBA TIFF (lossless) with opaque, half-transparent and fully transparent areas."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 4), dtype=np.uint8)
    image[..., 3] = 255
    image[100:300, 200:500, 3] = rng.integers(0, 256, (200, 300))
    image[600:, :, 3] = 0
    path = tmp_path_factory.mktemp("rgba") / "rgba.tiff"
    opts = dict(tile=(TILE, TILE), photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, **opts)
        tw.write(np.ascontiguousarray(image[::2, ::2]), subfiletype=1, **opts)
    return path, image


def _over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:].astype(np.uint16)
    return ((rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def test_rgba_tiles_are_composited_on_white_exactly(rgba_tiff):
    path, image = rgba_tiff
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        np.testing.assert_array_equal(slide.pyramid()[0].compute(), _over_white(image))
        np.testing.assert_array_equal(
            slide.read_level_region((850, 650), 0, (100, 80))[:50, :50], _over_white(image[650:, 850:])
        )
        assert (slide.read_level_region((850, 650), 0, (100, 80))[50:] == 255).all()  # outside: white


def test_a_viewport_decodes_only_the_tiles_it_shows(rgba_tiff):
    path, image = rgba_tiff
    with open_slide(path) as slide:
        native = slide._backend.native
        assert native is not None
        level = slide.pyramid()[0]
        assert slide.pyramid(chunk=600)[0].chunks[0][:2] == (512, 188)  # whole tiles, at most the size asked
        slide.read_level_region((0, 0), 0, (1, 1))  # the level's first read checks tile 0 against OpenSlide
        native._cache.clear()
        got = level[300:520, 250:270].compute()  # rows 1-2, column 0-1 of the 256 px grid
        np.testing.assert_array_equal(got, _over_white(image[300:520, 250:270]))
        across = -(-900 // TILE)
        assert set(native._cache) == {(0, r * across + c) for r in (1, 2) for c in (0, 1)}


def test_level_view_indexes_like_numpy(rgba_tiff):
    path, image = rgba_tiff
    want = _over_white(image)
    with open_slide(path) as slide:
        view = LevelView(slide, 0)
        assert view.shape == (700, 900, 3) and view.dtype == np.uint8
        dask_level = slide.pyramid()[0]
        for index in [
            (slice(10, 40), slice(5, 900)),
            (slice(None, None, 3), slice(899, 100, -7)),
            (5, slice(20, 30), 1),
            ([3, 650, 7], slice(None)),
            (Ellipsis, 2),
            (slice(-30, None), np.arange(900) % 5 == 0),
            (None, slice(0, 4), slice(0, 4)),
            (slice(690, 710), slice(0, 0)),
        ]:
            got = view[index]
            assert got.shape == want[index].shape, index
            np.testing.assert_array_equal(got, want[index], err_msg=str(index))
            if not any(i is None for i in index):
                np.testing.assert_array_equal(dask_level[index].compute(), want[index], err_msg=str(index))


def test_tiles_decode_on_several_threads_and_concurrent_reads_agree(rgba_tiff, monkeypatch):
    import napari_he2rna.slides.native_tiles as native_tiles_module

    path, image = rgba_tiff
    want = _over_white(image)
    monkeypatch.setattr(native_tiles_module, "DECODE_THREADS", 3)
    with open_slide(path) as slide:
        native = slide._backend.native
        threads: set[str] = set()
        decode = native._tile

        def tile(level, index):
            threads.add(threading.current_thread().name)
            return decode(level, index)

        native._tile = tile
        np.testing.assert_array_equal(slide.read_level_region((0, 0), 0, (900, 700)), want)
        assert len(threads) >= 2  # this thread and the decode pool

        native._cache.clear()
        corners = [(x, y) for x in range(0, 800, 97) for y in range(0, 600, 89)]
        with ThreadPoolExecutor(4) as pool:
            blocks = list(pool.map(lambda c: slide.read_level_region(c, 0, (100, 100)), corners))
        for (x, y), block in zip(corners, blocks, strict=True):
            np.testing.assert_array_equal(block, want[y : y + 100, x : x + 100])


def _tasks(array) -> int:
    """Tasks that computing ``array`` runs, after dask's optimisation (as configured now)."""
    return len(dict(array.__dask_optimize__(array.__dask_graph__(), array.__dask_keys__())))


@pytest.mark.parametrize("fuse", [True, False], ids=["dask-default", "napari-slicing"])
def test_a_viewport_is_one_read_of_its_own_tiles_whatever_dask_fuses(rgba_tiff, fuse):
    """napari turns dask's task fusion off while it slices: a viewport across chunk borders must still be one
    task that decodes only the tiles it shows (with dask's chunk tasks it decoded their whole chunks)."""
    path, image = rgba_tiff
    want = _over_white(image)
    with open_slide(path) as slide, dask.config.set({"optimization.fuse.active": fuse}):
        native = slide._backend.native
        level = slide.pyramid(chunk=256)[0]  # one tile per chunk: the viewport below spans 4 chunks
        assert level.numblocks[:2] == (3, 4)
        slide.read_level_region((0, 0), 0, (1, 1))  # the level's first read checks tile 0 against OpenSlide
        native._cache.clear()
        viewport = level[200:300, 250:270]
        assert viewport.numblocks == (1, 1, 1) and _tasks(viewport) == 1
        np.testing.assert_array_equal(viewport.compute(), want[200:300, 250:270])
        across = -(-900 // TILE)
        assert set(native._cache) == {(0, r * across + c) for r in (0, 1) for c in (0, 1)}
        # a slice of that slice is one read too, of the right pixels
        np.testing.assert_array_equal(viewport[10:20, 5:][:, :, :3].compute(), want[210:220, 255:270])
        # and the viewport is a dask array like any other: other indexing, arithmetic, rechunking
        np.testing.assert_array_equal(viewport[::3, 1].compute(), want[200:300:3, 251])
        got = (viewport.astype(np.int16) - 1).rechunk((50, 10, 3)).compute()
        np.testing.assert_array_equal(got, want[200:300, 250:270].astype(np.int16) - 1)


def test_level_slices_are_the_levels_pixels(rgba_tiff):
    path, image = rgba_tiff
    want = _over_white(image)
    with open_slide(path) as slide:
        level = slide.pyramid(chunk=256)[0]
        assert level[..., :3] is level and level[:, :] is level
        for index in [
            (slice(600, 1000), slice(-100, None)),  # past the edge, negative start
            (slice(5, 6),),
            (slice(1, 700), Ellipsis, slice(0, 3)),
            (slice(10, 300), slice(20, 800), slice(None)),
        ]:
            sliced = level[index]
            assert sliced.numblocks == (1, 1, 1), index
            np.testing.assert_array_equal(sliced.compute(), want[index], err_msg=str(index))
        # what is not a viewport goes through dask's own slicing, one task per chunk touched
        for index in [
            (slice(0, 600, 2), slice(3, 700)),
            (Ellipsis, 1),
            (slice(0, 500), 7),
            (Ellipsis, slice(0, 2)),
        ]:
            sliced = level[index]
            assert sliced.numblocks[0] > 1, index
            np.testing.assert_array_equal(sliced.compute(), want[index], err_msg=str(index))
        with dask.config.set({"array.chunk-size": "64kiB"}):  # larger than a chunk may be: dask's chunks
            assert level[0:300, 0:300].numblocks[:2] == (2, 2)
        slide._backend._native_ok[0] = False  # a level OpenSlide reads on one thread: dask's chunks
        assert level[0:300, 0:300].numblocks[:2] == (2, 2)
