"""The fused sparse-attention kernel, loaded from the Hub through the ``kernels`` library.

Schlatt et al., ECIR 2024 left fused kernels for the asymmetric pattern as future work; ``kernel_src/`` holds one (CUDA
and CPU builds of one op). This module finds it and adapts :class:`SegmentLayout` to the op's ragged arguments. Loading
is tried once per process; when it fails (no ``kernels`` package, offline, no build for this torch or device), the
model falls back to the PyTorch ``windowed`` backend with one logged line. ``kernels`` is optional: this file must
import without it.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .pattern import FLAG_DIRECTIONS, AttentionPattern
from .segments import SegmentLayout

try:  # optional dependency; remote code stays importable without it
    import kernels
except ImportError:
    kernels = None

logger = logging.getLogger(__name__)

KERNEL_OVERRIDE_ENV = "SPARSE_CE_KERNEL"
"""A build folder (``.../build/<variant>`` parent or the kernel folder) to load instead of the Hub repo, or ``off``."""



@functools.lru_cache(maxsize=None)
def load_kernel(repo_id: str | None, version: int):
    """The kernel module for ``repo_id`` (or the :data:`KERNEL_OVERRIDE_ENV` folder), or ``None``; tried once per process."""
    override = os.environ.get(KERNEL_OVERRIDE_ENV, "")
    source = override or repo_id
    try:
        if override.lower() == "off" or not source:
            raise RuntimeError(f"disabled ({KERNEL_OVERRIDE_ENV}=off or no kernel_repo_id)")
        if kernels is None:
            raise ImportError("the `kernels` package is not installed (pip install kernels)")
        if override:
            module = kernels.get_local_kernel(Path(override), trust_remote_code=True)
        else:
            module = kernels.get_kernel(repo_id, version=version, trust_remote_code=True)
    except Exception as error:  # offline, no variant for this torch, import error: all mean "not here"
        logger.warning("sparse-ce: attention kernel %s unavailable (%s); using the PyTorch windowed backend", source, error)
        return None
    logger.info("sparse-ce: loaded attention kernel %s", source)
    return module


def kernel_supports(module, device: torch.device) -> bool:
    """Whether the loaded kernel registered an implementation for ``device``'s dispatch key."""
    op = module.ops.sparse_attention_fwd.default
    key = "CUDA" if device.type == "cuda" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)


def pattern_flags(pattern: AttentionPattern) -> int:
    """The op's direction bitmask: bit ``i`` is direction ``i`` of :data:`FLAG_DIRECTIONS` (``DIRECTION_FLAGS`` order)."""
    return sum(1 << bit for bit, (src, dst) in enumerate(FLAG_DIRECTIONS.values()) if pattern.allows(src, dst))


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
    cu_queries, cu_docs = layout.cached("kernel-offsets", lambda: layout_offsets(layout))
    window = pattern.document_window("kernel backend")
    out = kernel.sparse_attention(
        query.contiguous(), key.contiguous(), value.contiguous(), cu_queries, cu_docs, layout.row_to_query,
        pattern_flags(pattern), -1 if window is None else window, scaling,
    )
    return out, None
