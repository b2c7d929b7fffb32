"""The bridge between the Model dock and its worker thread: the Run job, its progress signals, its result.

The job runs in a napari ``thread_worker``; it never raises (napari would show the traceback): it returns
the tile grid or a :class:`Failed` holding the exception, which the dock turns into one sentence.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from qtpy.QtCore import QObject, Signal

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle
    from ._state import SlideState


class Failed:
    """What a job returns instead of raising (napari would relay a raised exception with its traceback)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class ProgressBridge(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal connections)."""

    progressed = Signal(int, int, str)
    grid_ready = Signal(object)
    batch_done = Signal(int, int)


def compute_job(
    state: SlideState, bundle: ModelBundle, device: str, cancel: threading.Event, bridge: ProgressBridge
):
    """Runs in the worker thread: tile grid first (for the outline), then features (cache reused).

    Returns the tile grid, or the exception that stopped the job wrapped in :class:`Failed`: napari workers
    relay a raised (or returned) exception as a traceback notification, and users get one sentence instead
    (see ``RunSection._on_errored`` in :mod:`._run_section`).
    """
    from .. import jobs
    from ..features.devices import resolve_device
    from ..maps import map_display

    session = state.session
    try:
        session.slide.require_mpp()
        jobs.check_cancel(cancel)
        # Small batches on a CPU: the first tiles are painted within seconds (a CPU is no faster per tile
        # with bigger batches); a GPU keeps the usual 32.
        batch = 8 if resolve_device(device).type == "cpu" else 32
        grid = session.compute_features(
            device=device,
            progress=lambda d, t, m="": bridge.progressed.emit(int(d), int(t), str(m)),
            cancel=cancel,
            # The outline appears as soon as the grid is known, before the long extraction.
            grid_ready=bridge.grid_ready.emit,
            batch_ready=lambda d, t: bridge.batch_done.emit(int(d), int(t)),
            progressive=True,
            batch_size=batch,
        )
        jobs.check_cancel(cancel)
        session.hidden()  # the hidden layers once, here: then every gene pick is one dot product
        # The training-data check (tile distances, every gene's slide prediction vs the training range)
        # runs here too, off the GUI thread; the widget reads the cached assessment.
        session.assessment()
        # The tissue the maps are clipped to (a thumbnail's tissue mask), off the GUI thread as well.
        try:
            state.extra["tissue_cover"] = (grid, map_display.tissue_cover(session.slide, grid))
        except Exception:  # noqa: BLE001 - the maps are then clipped to the slide's bounds only
            log.debug("tissue cover of the maps failed", exc_info=True)
        return grid
    except Exception as exc:  # noqa: BLE001 - handed to the GUI thread, which reports it
        return Failed(exc)
