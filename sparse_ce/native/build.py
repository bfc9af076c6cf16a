"""Compile-once cache of the CPU kernel: ``<cache>/<key>/build/<variant>/`` (the ``kernels`` layout), then import.

The build runs ``kernel_src/build_local.py`` in a child process (a build imports the extension, and one process may
register an op namespace only once), under a file lock so that concurrent processes (``torchrun``) build once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from ..runtime import cpu_flags

logger = logging.getLogger(__name__)

CACHE_ENV = "SPARSE_CE_KERNEL_CACHE"
SOURCES_ENV = "SPARSE_CE_KERNEL_SRC"


def kernel_sources() -> Path:
    """The ``kernel_src`` folder: ``$SPARSE_CE_KERNEL_SRC``, the source checkout beside this package, or the copy an
    installed wheel carries (package ``sparse_ce_kernel_src``).

    Raises:
        FileNotFoundError: when none holds ``build_local.py``.
    """
    candidates = [Path(os.environ[SOURCES_ENV])] if os.environ.get(SOURCES_ENV) else []
    candidates.append(Path(__file__).resolve().parents[2] / "kernel_src")
    spec = importlib.util.find_spec("sparse_ce_kernel_src")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / "build_local.py").is_file():
            return folder
    raise FileNotFoundError(f"kernel sources: no build_local.py in {', '.join(map(str, candidates))}")


def cache_root() -> Path:
    """``$SPARSE_CE_KERNEL_CACHE`` or ``~/.cache/sparse-ce/kernels``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse-ce" / "kernels")


def cpu_isa() -> str:
    """The machine and the vector extensions the op's run-time dispatch cares about, e.g. ``x86_64-avx2-fma``."""
    return "-".join([platform.machine(), *sorted(cpu_flags() & {"avx2", "fma", "avx512f", "asimd", "sve"})])


@functools.lru_cache(maxsize=None)
def _builder(sources: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("sparse_ce_build_local", sources / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_key(sources: Path) -> str:
    """What the build depends on: source hash, torch version, Python version and CPU instruction set."""
    parts = [_builder(sources).source_hash(), torch.__version__, platform.python_version(), cpu_isa()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_cpu_kernel(timeout: float = 1800) -> Path:
    """The kernel repository folder (``build/<variant>/`` inside) for this machine, compiled if not cached.

    Raises:
        RuntimeError: when no C++ compiler is found or the build fails (the message carries the compiler's output).
    """
    sources = kernel_sources()
    builder = _builder(sources)
    repo = cache_root() / build_key(sources)
    variant = repo / "build" / builder.variant_name()
    if (variant / "metadata.json").is_file():
        return repo
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH; set CXX or install g++)")
    repo.parent.mkdir(parents=True, exist_ok=True)
    with (repo.parent / f"{repo.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        if (variant / "metadata.json").is_file():
            return repo
        logger.warning("sparse-ce: compiling the CPU attention kernel once for this machine (about a minute) into %s",
                       repo)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=repo.parent))
        try:
            result = subprocess.run([sys.executable, str(sources / "build_local.py"), "--out", str(staging)],
                                    capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                raise RuntimeError(f"kernel build failed:\n{(result.stdout + result.stderr)[-3000:]}")
            shutil.rmtree(repo, ignore_errors=True)
            staging.rename(repo)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return repo


def import_variant(variant: Path) -> ModuleType:
    """Import a built kernel folder (``__init__.py``, ``_ops.py``, the extension) as a package of its own name."""
    name = f"sparse_ce_native_{variant.parent.parent.name}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, variant / "__init__.py", submodule_search_locations=[str(variant)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@functools.lru_cache(maxsize=None)
def load_cpu_kernel() -> ModuleType | None:
    """The CPU kernel module (built on first use), or ``None`` with one logged line saying why; tried once."""
    try:
        repo = build_cpu_kernel()
        (variant,) = (repo / "build").iterdir()
        module = import_variant(variant)
    except Exception as error:  # no compiler, failed build, unsupported platform: fall back
        logger.warning("sparse-ce: built-in CPU attention kernel unavailable (%s); using the PyTorch windowed backend",
                       str(error).splitlines()[0])
        return None
    logger.info("sparse-ce: using the built-in CPU attention kernel from %s", repo)
    return module
