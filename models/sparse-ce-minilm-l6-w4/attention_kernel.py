"""The fused sparse-attention kernel: where it comes from, and the adapter from :class:`SegmentLayout` to its op.

Schlatt et al., ECIR 2024 left fused kernels for the asymmetric pattern as future work; ``kernel_src/`` holds one (CUDA
and CPU builds of one op). Native code is loaded only from a source the user pinned or built, in this order:

1. ``SPARSE_CE_KERNEL=DIR``: a local build (``off`` disables every kernel);
2. the config's ``kernel_repo_id`` from the Hub through ``kernels``, only when pinned: ``kernel_revision`` (a commit
   sha), an entry in a ``kernels.lock`` (``$SPARSE_CE_KERNELS_LOCK`` or beside a local model's config), or a
   ``LOCAL_KERNELS`` mapping; an unpinned repo id logs one line and is never fetched;
3. on CPU, the op the installed sparse-ce package compiles once for this machine (:mod:`sparse_ce.native`).

The first that loads and has an implementation for the model's device is used; otherwise the model falls back to the
PyTorch ``windowed`` backend with one logged line. Each source is tried once per process. ``kernels`` and sparse-ce
are optional: this file imports without them.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

try:  # Hub folder: the config module is a flat sibling
    from .configuration_sparse_ce import DIRECTION_FLAGS
except ImportError:  # installed package: one top-level module
    from configuration_sparse_ce import DIRECTION_FLAGS

from .pattern import AttentionPattern
from .segments import SegmentLayout

try:  # optional dependency; remote code stays importable without it
    import kernels
except ImportError:
    kernels = None

try:  # the installed package builds the CPU op; a Hub folder alone does not have it
    from sparse_ce.native import load_cpu_kernel
except ImportError:
    load_cpu_kernel = None

logger = logging.getLogger(__name__)

KERNEL_OVERRIDE_ENV = "SPARSE_CE_KERNEL"
"""A build folder (``.../build/<variant>`` parent or the kernel folder) to load instead of anything else, or ``off``."""
KERNELS_LOCK_ENV = "SPARSE_CE_KERNELS_LOCK"
"""A ``kernels.lock`` file that pins ``kernel_repo_id`` (the ``kernels lock`` workflow)."""


def kernel_sources(config) -> list[tuple[str, str | None, str | None]]:
    """The pinned or local kernel sources for ``config``, in the order they are tried: ``(kind, what, pin)``."""
    override = os.environ.get(KERNEL_OVERRIDE_ENV, "")
    if override.lower() == "off":
        return []
    if override:
        return [("local", override, None)]
    sources = []
    repo_id = getattr(config, "kernel_repo_id", None)
    if repo_id:
        lockfile = _lockfile(config)
        if getattr(config, "kernel_revision", None):
            sources.append(("hub", repo_id, config.kernel_revision))
        elif lockfile is not None:
            sources.append(("hub-lock", repo_id, str(lockfile)))
        elif repo_id in _local_kernels():
            sources.append(("hub-local", repo_id, None))
        else:
            _log_unpinned(repo_id)
    sources.append(("builtin", None, None))
    return sources


def find_kernel(config, device: torch.device):
    """The first kernel of :func:`kernel_sources` that loads and supports ``device``, else ``None`` (logged once)."""
    tried = []
    for kind, what, pin in kernel_sources(config):
        if kind == "builtin" and device.type != "cpu":
            continue
        module = load_kernel(kind, what, pin, getattr(config, "kernel_version", 1))
        if module is not None and kernel_supports(module, device):
            return module
        tried.append(kind if what is None else f"{kind} {what}")
    _log_fallback(device.type, ", ".join(tried) or "none")
    return None


@functools.lru_cache(maxsize=None)
def load_kernel(kind: str, what: str | None, pin: str | None, version: int = 1):
    """The kernel module of one source, or ``None`` with one logged line; tried once per process."""
    try:
        if kind == "builtin":
            if load_cpu_kernel is None:
                raise ImportError("the sparse-ce package is not installed (pip install sparse-ce)")
            return load_cpu_kernel()  # logs its own fallback
        if kernels is None:
            raise ImportError("the `kernels` package is not installed (pip install kernels)")
        if kind == "local":
            module = kernels.get_local_kernel(Path(what), trust_remote_code=True)
        elif kind == "hub":
            module = kernels.get_kernel(what, revision=pin, trust_remote_code=True)
        elif kind == "hub-lock":
            module = kernels.get_locked_kernel(what, lockfile=Path(pin), trust_remote_code=True)
        else:  # hub-local: LOCAL_KERNELS maps the repo to a folder, kernels reads it from there
            module = kernels.get_kernel(what, version=version, trust_remote_code=True)
    except Exception as error:  # offline, no variant for this torch, not locked, import error: all mean "not here"
        logger.warning("sparse-ce: attention kernel %s %s unavailable (%s)", kind, what or "", error)
        return None
    logger.info("sparse-ce: loaded attention kernel %s %s%s", kind, what, f" @ {pin}" if pin else "")
    return module


def _lockfile(config) -> Path | None:
    candidates = [os.environ.get(KERNELS_LOCK_ENV, "")]
    folder = getattr(config, "_name_or_path", "") or ""
    if folder and Path(folder).is_dir():
        candidates.append(str(Path(folder) / "kernels.lock"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _local_kernels() -> set[str]:
    """Repo ids mapped to folders by ``LOCAL_KERNELS`` (``org/repo=/path[:org2/repo2=/path2]``)."""
    mapping = os.environ.get("LOCAL_KERNELS", "")
    return {item.split("=", 1)[0] for item in mapping.split(":") if "=" in item}


@functools.lru_cache(maxsize=None)
def _log_unpinned(repo_id: str) -> None:
    logger.warning(
        "sparse-ce: kernel_repo_id %s is not pinned (no kernel_revision, no kernels.lock entry, no LOCAL_KERNELS); "
        "it is not downloaded", repo_id,
    )


@functools.lru_cache(maxsize=None)
def _log_fallback(device: str, tried: str) -> None:
    logger.warning("sparse-ce: no attention kernel for %s (tried: %s); using the PyTorch windowed backend", device, tried)


def kernel_supports(module, device: torch.device) -> bool:
    """Whether the loaded kernel registered an implementation for ``device``'s dispatch key."""
    op = module.ops.sparse_attention_fwd.default
    key = "CUDA" if device.type == "cuda" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)


def pattern_flags(pattern: AttentionPattern) -> int:
    """The op's direction bitmask: bit ``i`` is flag ``i`` of ``DIRECTION_FLAGS``; six-flag patterns only."""
    flags = pattern.require_flag_family("kernel backend: ")
    return sum(1 << bit for bit, flag in enumerate(DIRECTION_FLAGS) if flags[flag])


def layout_offsets(layout: SegmentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_queries [queries + 1]`` and ``cu_docs [batch + 1]``: packed-token offsets of each query and document."""
    start = layout.query_lengths.new_tensor([layout.batch_size])
    cu_queries = torch.cat([start, layout.batch_size + torch.cumsum(layout.query_lengths, 0)])
    cu_docs = torch.cat([cu_queries[-1:], cu_queries[-1] + torch.cumsum(layout.doc_lengths, 0)])
    return cu_queries, cu_docs


def kernel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SegmentLayout,
    pattern: AttentionPattern,
    *,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
    kernel=None,
) -> tuple[torch.Tensor, None]:
    """Sparse-pattern attention through the fused op; same signature as the other backends plus the ``kernel`` module."""
    if output_attentions:
        raise ValueError("output_attentions: only attention_backend='dense' returns attention weights")
    if dropout:
        raise ValueError("kernel backend: attention dropout is not fused; train with attention_probs_dropout_prob=0 "
                         "or attention_backend='windowed'")
    if kernel is None:
        raise RuntimeError("kernel backend: no kernel loaded")
    flags = pattern_flags(pattern)
    cu_queries, cu_docs = layout.cached("kernel-offsets", lambda: layout_offsets(layout))
    window = pattern.window
    # the layout was built (with host syncs) and checked here: skip the CUDA op's device-side check (older builds
    # have no such argument)
    trusted = {"validate": False} if getattr(kernel, "HAS_VALIDATE_ARGUMENT", False) else {}
    out = kernel.sparse_attention(
        query.contiguous(), key.contiguous(), value.contiguous(), cu_queries, cu_docs, layout.row_to_query,
        flags, -1 if window is None else window, scaling, **trusted,
    )
    return out, None
