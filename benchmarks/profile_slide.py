"""Where the time of a viewport read goes, in napari-he2rna's reader (the "Where the time goes" figures).

For random 512 x 512 viewports of the bench_slide.py slide (level 0, and the lowest level, whose tiles all
sit in the tile cache), per viewport: the tiles decoded (with dask's default settings, and with napari's,
which turn task fusion off while it slices), the dask tasks left after dask's optimisation, CPU and wall
milliseconds of the reader's own read of exactly that region (no dask), of the dask array's slice
computed with the synchronous scheduler and with 2 threads, and of one tile decode. Run it on one checkout,
then another, to compare (CPU milliseconds are the figure that a busy machine disturbs least)::

    PYTHONPATH=src .venv/bin/python benchmarks/profile_slide.py [--slide X.tiff] [--reads 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _timed(fn, items) -> tuple[float, float]:
    """(wall ms, CPU ms) per item of ``fn(item)`` over ``items``."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    n = len(items)
    return (time.perf_counter() - t0) / n * 1e3, (time.process_time() - cpu0) / n * 1e3


def profile(path: Path, reads: int, seed: int = 0) -> dict:
    import dask

    import napari_he2rna
    from napari_he2rna.slides.slide import open_slide

    out: dict = {"module": napari_he2rna.__file__, "load": os.getloadavg()}
    slide = open_slide(path)
    levels = slide.pyramid()
    native = getattr(slide._backend, "native", None)
    rng = np.random.default_rng(seed)
    for key, index in (("level0", 0), ("lowest", len(levels) - 1)):
        arr = levels[index]

        def viewport(corner, arr=arr):
            return arr[corner[0] : corner[0] + 512, corner[1] : corner[1] + 512].compute()

        h, w = arr.shape[:2]
        corners = [(int(rng.integers(0, h - 511)), int(rng.integers(0, w - 511))) for _ in range(reads)]
        arr[:512, :512].compute()  # first-read checks and decoder set-up
        out[f"{key}_chunk_px"] = int(arr.chunks[0][0])
        sliced = [arr[y : y + 512, x : x + 512] for y, x in corners[:10]]
        out[f"{key}_tasks"] = float(
            np.mean([len(dict(s.__dask_optimize__(s.__dask_graph__(), s.__dask_keys__()))) for s in sliced])
        )
        if native is not None:
            # dask's default settings, then napari's while it slices (task fusion off: a chunk task reads its
            # whole chunk unless the viewport is one task of its own)
            for suffix, fuse in (("", True), ("_napari", False)):
                decoded = []
                with dask.config.set({"optimization.fuse.active": fuse}):
                    for y, x in corners[:10]:
                        native._cache.clear()
                        native._cache_bytes = 0
                        arr[y : y + 512, x : x + 512].compute(scheduler="sync")
                        decoded.append(len(native._cache))
                out[f"{key}_tiles_decoded{suffix}"] = float(np.mean(decoded))
            arr[:512, :512].compute()
            if key == "lowest":  # warm the whole level into the tile cache
                arr.compute()
        out[f"{key}_direct_ms"] = _timed(
            lambda c, i=index: slide.read_level_region(c[::-1], i, (512, 512)), corners
        )
        for name, kwargs in (
            ("sync", {"scheduler": "sync"}),
            ("threads2", {"scheduler": "threads", "num_workers": 2}),
        ):
            with dask.config.set(**kwargs):
                out[f"{key}_dask_{name}_ms"] = _timed(viewport, corners)
    if native is not None:
        page = native.pages[0]
        offset, count = int(page.dataoffsets[1000]), int(page.databytecounts[1000])
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(count)
        out["tile_decode_ms"] = _timed(
            lambda _: page.decode(data, 1000, jpegtables=page.jpegtables), range(100)
        )
        out["tile_px"] = int(page.tilewidth)
    slide.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--slide", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "he2rna-bench-16384.tiff"
    )
    parser.add_argument("--reads", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.slide.exists():
        sys.path.insert(0, str(HERE))
        from bench_slide import make_slide

        make_slide(args.slide)
    result = profile(args.slide, args.reads)
    print(json.dumps(result))
    for key, value in result.items():
        if isinstance(value, tuple) and len(value) == 2 and key.endswith("_ms"):
            print(f"{key:>24}: wall {value[0]:7.2f} ms   CPU {value[1]:7.2f} ms")
        elif key != "module":
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
