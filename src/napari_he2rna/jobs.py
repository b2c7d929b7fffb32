"""Progress and cancellation for long jobs, without knowing about any UI.

Compute functions take ``progress`` (a callable ``progress(done, total, message)``) and ``cancel``
(anything with ``is_set()``, e.g. :class:`threading.Event`). The napari widgets pass callbacks that feed a
``thread_worker``; the CLI passes a text progress bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol

from .errors import Cancelled

ProgressCallback = Callable[[int, int, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


def check_cancel(cancel: CancelToken | None) -> None:
    """Raise :class:`Cancelled` when the user asked to stop."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")


def report(progress: ProgressCallback | None, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(done, total, message)


class TextProgress:
    """A one-line progress bar on stderr for the CLI, with a rate (items/s)."""

    def __init__(self, label: str = "", stream=None, min_interval_s: float = 0.2) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0
        self.min_interval_s = min_interval_s

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.min_interval_s:
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        text = f"\r{self.label} [{bar:<30}] {done}/{total} {rate:6.1f}/s {message}"
        self.stream.write(text[:160])
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
