"""Load torch's compiler stack (and Triton's LLVM) before an OpenGL context exists in the process.

Why this exists: torch's CUDA wheels ship Triton, whose ``libtriton`` links its own LLVM. Mesa's software
OpenGL (llvmpipe, what napari draws with under Xvfb or on a machine without a GPU driver) links the system
LLVM. When Mesa is loaded first and Triton second, the process dies with a segmentation fault in Triton's
static initialisers; the other order is fine (measured here: a napari viewer, then ``torch.optim.Adam(...)``
segfaults; ``import triton`` first, then the same, works). ``torch.optim`` imports ``torch._dynamo``, which
imports Triton, on the first optimiser built, so any training after a viewer opened hits it.

:func:`preload` is called by ``he2rna view`` and by the test suite before napari starts. It is a no-op when
torch is not installed; without Triton it only costs the import of ``torch._dynamo``.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)


def preload() -> bool:
    """Import ``torch._dynamo`` (and with it Triton, when installed) now. Returns whether it succeeded."""
    try:
        importlib.import_module("torch._dynamo")
    except Exception as exc:  # noqa: BLE001 - optional: a broken or absent torch must not stop the viewer
        log.debug("torch._dynamo preload skipped: %s", exc)
        return False
    return True
