"""Features of many slides: one task per slide, here or on a dask.distributed cluster.

:func:`extract_cohort` runs :func:`extract_slide_task` for each slide, one after the other or one task per
slide on a cluster (workers re-open the slides by path and build the backbone once); a slide that fails is
reported and the others go on. The stores are those of :mod:`.feature_cache`.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import Cancelled, He2rnaError
from ..jobs import CancelToken, ProgressCallback, check_cancel, report
from .backbones import Backbone, get_backbone
from .cache import cache_path, load_or_extract
from .extraction import ExtractOptions

__all__ = ["extract_cohort", "extract_slide_task"]

_BACKBONE_CACHE: dict[tuple[str, str | None, str], Backbone] = {}


def _cached_backbone(name: str, weights: str | Path | None, device: str) -> Backbone:
    """One backbone per (name, weights, device) per process: dask workers reuse it across slides."""
    key = (name, None if weights is None else str(weights), str(device))
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE[key] = get_backbone(name, weights=weights, device=device)
    return _BACKBONE_CACHE[key]


def _failed(path: str, reason: str) -> dict[str, Any]:
    return {"slide": str(path), "status": "failed", "reason": reason, "n_tiles": 0, "store": ""}


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which directory ``path`` is now (inode, modification and change times), or None when absent."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def extract_slide_task(
    path: str | Path,
    options: ExtractOptions,
    out_dir: str | Path | None = None,
    mpp: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    backbone: Backbone | None = None,
) -> dict[str, Any]:
    """Extract (or find cached) features of one slide, opened by path; never raises for a bad slide.

    Parameters
    ----------
    path : path of the slide
    options : ExtractOptions
        Backbone (built once per process), tiling, how the extraction runs and the store's dtype (a
        float16 or float32 one asked re-extracts a store kept in the other).
    out_dir : path, optional
        Where the stores go (default :func:`settings.cache_dir`).
    mpp : float, optional
        Pixel size in µm/px for a slide that does not say it.
    backbone : Backbone, optional
        Already built (in this process); otherwise built from ``options`` once per process.

    Returns
    -------
    dict with ``slide`` (path), ``status`` (``"ok"``, ``"cached"``, ``"failed"``), ``reason`` (why it
    failed, else ``""``), ``n_tiles`` and ``store`` (the zarr store's path, ``""`` when failed).
    """
    from ..slides.slide import open_slide

    result = _failed(str(path), "")
    try:
        if backbone is None:
            backbone = _cached_backbone(options.backbone, options.weights, options.device)
        with open_slide(path, mpp=mpp) as slide:
            store = cache_path(slide, backbone, options.tile_um, out_dir, options=options)
            # "cached": the store that was there before is the one read (a stale or corrupt one is replaced
            # by a new directory). Not is_cached(): it would read and checksum the whole store once more.
            before = _identity(store)
            # The backbone is already on its device: device "auto" leaves it there.
            grid, _ = load_or_extract(
                slide,
                backbone,
                options.replace(device="auto"),
                cache_dir=out_dir,
                progress=progress,
                cancel=cancel,
            )
        cached = before is not None and _identity(store) == before
        result.update(status="cached" if cached else "ok", n_tiles=len(grid.table), store=str(store))
    except Cancelled:
        raise
    except He2rnaError as exc:
        result["reason"] = str(exc)
    except Exception as exc:  # one bad slide must not stop a cohort; the reason is reported
        result["reason"] = f"{type(exc).__name__}: {exc}"
    return result


def extract_cohort(
    slides: Sequence[str | Path],
    backbone: str | Backbone | None = None,
    out_dir: str | Path | None = None,
    scheduler: Any = None,
    options: ExtractOptions | None = None,
    *,
    mpp: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    **changes: Any,
) -> list[dict[str, Any]]:
    """Features of many slides, one task per slide; a failing slide is reported and the others go on.

    Parameters
    ----------
    slides : sequence of paths
    backbone : str or Backbone, optional
        Registry name, hub id or snapshot folder (default ``options.backbone``); each worker builds it once
        (workers need the weights at the same path). A backbone built here is used as it is for a run
        without a scheduler (a cluster's workers build ``options.backbone`` themselves).
    out_dir : path, optional
        Where the stores go (default :func:`settings.cache_dir`).
    scheduler : None, str or distributed.Client
        None runs the slides one after the other here; a scheduler address (``"tcp://host:8786"``) or a
        ``distributed.Client`` submits one task per slide (workers re-open the slides by path).
    options : ExtractOptions, optional
        Tiling and how the extraction runs; ``changes`` (its field names, e.g. ``max_tiles=6``) are
        applied to it.
    mpp : float, optional
        Pixel size in µm/px for slides that do not say it.
    progress : callable, optional
        ``progress(slides_done, n_slides, last_slide_status)``.
    on_result : callable, optional
        Called with each slide's result as soon as that slide is done (in completion order), so a log
        shows every finished slide even when the run is killed later.

    Returns
    -------
    list of dict, one per slide in input order (see :func:`extract_slide_task`).
    """
    built = backbone if isinstance(backbone, Backbone) else None
    if isinstance(backbone, str):
        changes["backbone"] = backbone
    options = ExtractOptions.of(options, **changes)
    if options.weights is not None:
        options = options.replace(weights=str(options.weights))  # a plain string travels to any worker
    out = None if out_dir is None else str(out_dir)
    paths = [str(p) for p in slides]
    results: list[dict[str, Any] | None] = [None] * len(paths)
    if scheduler is None:
        for i, path in enumerate(paths):
            check_cancel(cancel)
            results[i] = extract_slide_task(path, options, out, mpp, cancel=cancel, backbone=built)
            if on_result is not None:
                on_result(results[i])
            report(progress, i + 1, len(paths), f"{Path(path).name}: {results[i]['status']}")
        return results  # type: ignore[return-value]

    from distributed import Client, as_completed

    own_client = isinstance(scheduler, str)
    client = Client(scheduler) if own_client else scheduler
    try:
        futures = [client.submit(extract_slide_task, path, options, out, mpp, pure=False) for path in paths]
        index = {f.key: i for i, f in enumerate(futures)}
        for n, future in enumerate(as_completed(futures), start=1):
            if cancel is not None and cancel.is_set():
                client.cancel(futures)
                check_cancel(cancel)
            i = index[future.key]
            try:
                results[i] = future.result()
            except Exception as exc:  # a worker that died, a task lost: report it for that slide
                results[i] = _failed(paths[i], f"{type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(results[i])
            report(progress, n, len(paths), f"{Path(paths[i]).name}: {results[i]['status']}")
    finally:
        if own_client:
            client.close()
    return results  # type: ignore[return-value]
