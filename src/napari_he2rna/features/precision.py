"""Which autocast precision the backbones run in: :func:`resolve_precision`, and on a CPU the fastest one.

bf16 autocast is several times faster than fp32 on CPUs with bf16 matrix hardware (Intel AMX, AVX512-BF16)
and several times slower on CPUs without it, where it is emulated. :func:`cpu_prefers_bf16` reads the CPU's
flags where the system lists them (Linux); elsewhere it times a ResNet bottleneck in both precisions once
and keeps the answer per machine (CPU model, torch version, threads) in ``<cache>/cpu-precision.json``
so later runs do not measure again.

:func:`resolve_precision` turns ``--precision`` (auto, fp32, bf16, fp16) into the autocast dtype on a device.

Nothing here imports Qt or napari.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import settings
from ..safe_output import OutputError, atomic_write_text

__all__ = [
    "BF16_FLAGS",
    "BF16_MIN_SPEEDUP",
    "cpu_flags",
    "cpu_model",
    "measure_bf16_speedup",
    "cpu_prefers_bf16",
    "DEFAULT_CPU_PRECISION",
    "resolve_precision",
    "precision_name",
]

# /proc/cpuinfo flags of bf16 matrix hardware; without one of them bf16 is emulated and slower than fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 is picked only when the micro-benchmark runs it at least this much faster than fp32: features move
# slightly in bf16 (cosine >= 0.999 to fp32), which is worth it for a clear gain only.
BF16_MIN_SPEEDUP = 1.15
# The CPU precision of "auto" where bf16 hardware is absent (benchmarks/bench_extract.py: ResNet50 in bf16
# on an AMD EPYC without AVX512-BF16 was 6x slower than fp32; on a Xeon with AMX 4.5x faster). Whether the
# hardware is there is decided per machine by cpu_prefers_bf16.
DEFAULT_CPU_PRECISION = "fp32"
CACHE_NAME = "cpu-precision.json"
_lock = threading.Lock()
_memo: dict[str, bool] = {}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` says)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``, or None where the system does not list them."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _block() -> nn.Module:
    """A ResNet50 bottleneck at its 56 px stage: where the backbone spends its time."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(256, 64, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(64, 256, 1, bias=False),
    ).eval()


def measure_bf16_speedup(repeats: int = 7) -> dict[str, float]:
    """Time the block in fp32 and in bf16 autocast on the CPU, interleaved; best of ``repeats`` each.

    Returns
    -------
    dict
        ``fp32_s``, ``bf16_s`` (seconds per batch) and ``speedup`` (fp32 time / bf16 time).
    """
    net = _block()
    x = torch.randn(8, 256, 56, 56)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round warms up (oneDNN picks and caches its kernels)
            for name in ("fp32", "bf16"):
                ctx = (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if name == "bf16"
                    else contextlib.nullcontext()
                )
                t = time.perf_counter()
                with ctx:
                    net(x)
                if i:
                    best[name] = min(best[name], time.perf_counter() - t)
    return {"fp32_s": best["fp32"], "bf16_s": best["bf16"], "speedup": best["fp32"] / best["bf16"]}


def _machine_key() -> str:
    return f"{cpu_model()}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def cpu_prefers_bf16(
    cache_file: str | os.PathLike | None = None,
    measure: Callable[[], dict[str, float]] = measure_bf16_speedup,
    flags: Callable[[], set[str] | None] = cpu_flags,
) -> bool:
    """Whether bf16 autocast runs faster than fp32 on this CPU (then ``--precision auto`` picks it).

    Where the system lists the CPU's flags (Linux), they decide: bf16 with AMX-BF16 or AVX512-BF16, fp32
    without. Timings on a shared machine swing by 2-4x with other jobs' load, so the flags are the sturdier
    signal where they exist. Elsewhere a ResNet bottleneck is timed once per machine and the answer cached.

    Parameters
    ----------
    cache_file : path, optional
        Default ``<cache dir>/cpu-precision.json``.
    measure : callable
        The timing (see :func:`measure_bf16_speedup`); tests pass their own.
    flags : callable
        Returns the CPU flags, None where unknown (default :func:`cpu_flags`).
    """
    listed = flags()
    if listed is not None:
        return bool(listed.intersection(BF16_FLAGS))
    path = Path(cache_file) if cache_file is not None else settings.cache_dir() / CACHE_NAME
    key = _machine_key()
    with _lock:
        memo_key = f"{path}|{key}"
        if memo_key in _memo:
            return _memo[memo_key]
        table: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            table = json.loads(path.read_text())
        entry = table.get(key) if isinstance(table, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("speedup"), int | float):
            entry = {**measure(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            table = table if isinstance(table, dict) else {}
            table[key] = entry
            # A read-only cache only costs a measurement next time.
            with contextlib.suppress(OSError, OutputError):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(table, indent=2) + "\n")
        answer = float(entry["speedup"]) >= BF16_MIN_SPEEDUP
        _memo[memo_key] = answer
        return answer


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32).

    ``"auto"``: bf16 on CUDA when supported else fp16; on CPU bf16 where it runs faster than fp32 (AMX or
    AVX512-BF16, :func:`cpu_prefers_bf16`), else fp32 (:data:`DEFAULT_CPU_PRECISION`).
    """
    precision = (precision or "auto").lower()
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            precision = "bf16" if cpu_prefers_bf16() else DEFAULT_CPU_PRECISION
        else:
            precision = "fp32"
    table = {
        "fp32": None,
        "float32": None,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if precision not in table:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if table[precision] is torch.float16 and device.type == "cpu":
        return torch.bfloat16  # fp16 matmuls on CPU are slow or missing; bf16 is CPU's half precision
    return table[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for an autocast dtype from :func:`resolve_precision`."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
