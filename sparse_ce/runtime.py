"""Process settings shared by the commands: CPU threads and the compute dtype.

Two OpenMP teams on a 2-core machine thrash each other; a command sets its thread count once, from ``--threads`` or
from what the process may use, and never more than that. ``--dtype auto`` computes in bfloat16 where the hardware has
bfloat16 arithmetic (x86 AVX512-BF16 / AMX, Arm BF16, bf16-capable GPUs) and in float32 elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at most ``OMP_NUM_THREADS`` when that is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        cores = min(cores, int(omp))
    return max(cores, 1)


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` (capped by :func:`available_cores`) or to all available.

    Raises:
        ValueError: for a requested count below 1.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"threads: expected at least 1, got {requested}")
    cores = available_cores()
    threads = min(requested or cores, cores)
    if requested and requested > cores:
        logger.warning("threads: %d requested but this process may use %d cores; using %d", requested, cores, threads)
    torch.set_num_threads(threads)
    return threads


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
"""/proc/cpuinfo flags of native bfloat16 arithmetic (x86 AVX512-BF16 and AMX, Arm BF16)."""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(name: str | None) -> torch.device:
    """``--device``: the named torch device, by default ``cuda`` when available, else ``cpu``."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(name: str | None, device: torch.device) -> str | None:
    """``auto``: ``bfloat16`` where ``device`` computes it natively, else ``float32``; other names unchanged."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_flags() & BF16_CPU_FLAGS else "float32"
