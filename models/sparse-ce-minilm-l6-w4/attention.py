"""One dispatch table of attention functions sharing one signature.

Schlatt et al., ECIR 2024, Section 3.4. Every backend takes packed ``query, key, value`` of shape
``[tokens, heads, head_dim]`` (order ``cls | query | doc`` from :class:`SegmentLayout`), the layout and the
:class:`AttentionPattern`, and returns the packed output plus optional weights ``[batch, heads, seq, seq]``.
"""

from __future__ import annotations

from typing import Callable

from .attention_dense import dense_attention
from .attention_flex import flex_attention_compiled, flex_attention_eager
from .attention_kernel import kernel_attention
from .attention_windowed import windowed_attention
from .pattern import AttentionPattern

ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "dense": dense_attention,
    "windowed": windowed_attention,
    "kernel": kernel_attention,  # needs ``kernel=<module>`` bound, see the model's backend resolution
    "flex": flex_attention_compiled,  # torch.compile(flex_attention): Triton on CUDA, C++ on CPU (forward only)
    "flex-eager": flex_attention_eager,  # uncompiled FlexAttention: the reference path, quadratic memory
}

FLAG_FAMILY_BACKENDS = ("windowed", "kernel")
"""Backends that run only the six-flag family; the others honour any five-segment pattern."""


def register_attention_backend(name: str, function: Callable) -> None:
    """Add a backend (e.g. a compiled kernel) under ``name``; it must follow the shared signature."""
    ATTENTION_FUNCTIONS[name] = function


def resolve_backend(
    name: str,
    pattern: AttentionPattern,
    output_attentions: bool,
    kernel_ready: bool = False,
    device_type: str = "cpu",
    layer: int | None = None,
    flex_ready: bool = False,
    dropout: bool = False,
) -> str:
    """Pick the backend of one layer for ``name`` (``auto`` or a key of :data:`ATTENTION_FUNCTIONS`).

    ``auto``: dense when weights are requested or the pattern is plain full attention (one SDPA call is fastest
    there). On CUDA, ``flex`` for every other pattern when FlexAttention is available (``flex_ready``) and no attention
    dropout is asked for (``dropout``: training with dropout > 0; FlexAttention has none); the never-measured CUDA op
    runs only when configured (``attention_backend='kernel'``). Else dense for patterns outside the six-flag family;
    the kernel when it is ready for this device and mode, except on CUDA for patterns with long rows
    (:attr:`AttentionPattern.has_long_rows`: its one-warp-per-row design scans those serially, see
    ``kernel_src/cuda/NOTES.md``); else windowed. On CPU ``auto`` never picks ``flex`` (no backward there; the CPU
    kernel is faster, docs/benchmarks.md). An explicit backend that cannot honour the pattern raises.
    """
    if pattern.has_zeroed and name not in ("auto", "dense"):
        raise ValueError(f"attention_backend={name!r}: " + (f"layer {layer}: " if layer is not None else "") +
                         "the pattern zeroes weights after the softmax (ablation mode 'zero'); only 'dense' does that")
    if name == "auto":
        if output_attentions or pattern.is_full or pattern.has_zeroed:
            return "dense"
        if device_type == "cuda" and flex_ready and not dropout:
            return "flex"
        if not pattern.in_flag_family:
            return "dense"
        if kernel_ready and not (device_type == "cuda" and pattern.has_long_rows):
            return "kernel"
        return "windowed"
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose 'auto' or one of {sorted(ATTENTION_FUNCTIONS)}")
    if name in FLAG_FAMILY_BACKENDS:
        pattern.require_flag_family(f"attention_backend={name!r}: " + (f"layer {layer}: " if layer is not None else ""))
    return name
