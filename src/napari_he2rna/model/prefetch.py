"""Training batches read ahead in the background, so the device computes while the next slides are read.

:func:`iter_batches` hands out the ``(x, mask)`` tensors of a list of index batches in order, exactly as
:meth:`napari_he2rna.model.cohort_prediction.SlideBatches.batch` makes them, while one reader thread reads and
pads the next :data:`PREFETCH_DEPTH` batches (reading a feature store, decompressing and copying release the
GIL). On CUDA the padded arrays are put in pinned memory and copied to the device without blocking. The
batches and their order are the same as without read-ahead, so training with a fixed seed gives the same
weights.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

#: Batches read ahead of the one being computed; 0 reads each batch when it is asked for (no thread).
PREFETCH_DEPTH = 2


class BatchSource(Protocol):
    def arrays(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]: ...


def _host_tensors(source: BatchSource, idx: Sequence[int], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = source.arrays(idx)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    if pin:
        xt, mt = xt.pin_memory(), mt.pin_memory()
    return xt, mt


def iter_batches(
    source: BatchSource,
    batches: Sequence[Sequence[int]],
    device: torch.device,
    depth: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, mask)`` on ``device`` for each index batch of ``batches``, in order, read ``depth`` ahead.

    ``stats`` (optional) gets ``wait_s``: the seconds the caller waited for a batch that was not read yet
    (the device's idle time). Close the generator (``contextlib.closing``) when leaving it early: the reads
    still queued are then dropped.
    """
    depth = PREFETCH_DEPTH if depth is None else int(depth)
    device = torch.device(device)
    cuda = device.type == "cuda"
    wait = 0.0
    try:
        if depth <= 0:
            for idx in batches:
                t0 = time.perf_counter()
                xt, mt = _host_tensors(source, idx, False)
                wait += time.perf_counter() - t0
                yield xt.to(device), mt.to(device)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="he2rna-prefetch")
        pending: deque[Future] = deque()
        todo = iter(batches)
        try:
            for idx in todo:
                pending.append(pool.submit(_host_tensors, source, idx, cuda))
                if len(pending) >= depth:
                    break
            while pending:
                t0 = time.perf_counter()
                xt, mt = pending.popleft().result()
                wait += time.perf_counter() - t0
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_host_tensors, source, nxt, cuda))
                yield xt.to(device, non_blocking=cuda), mt.to(device, non_blocking=cuda)
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
    finally:
        if stats is not None:
            stats["wait_s"] = stats.get("wait_s", 0.0) + wait
