"""Sparse cross-encoder attention (Schlatt et al., ECIR 2024) on packed, ragged inputs: a Hugging Face Hub kernel.

Packed token order: ``[CLS]`` of every row | tokens of each unique query | tokens of each document. See
``torch-ext/torch_binding.h`` for the op contract. :func:`sparse_attention` is differentiable in ``q``, ``k``, ``v``.

Importing this package registers, through ``torch.library``, fake (meta) implementations of both ops and the
forward op's backward formula, so that ``torch.compile`` (``fullgraph=True`` included) and CUDA-graph capture can
trace a model that calls the op; the gradients come from the same backward op as in eager mode.
"""

from __future__ import annotations

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["sparse_attention", "sparse_attention_fwd", "sparse_attention_bwd", "ops", "add_op_namespace_prefix"]

HAS_VALIDATE_ARGUMENT = True
"""The ops take ``validate`` (older builds do not): callers that built the layout themselves pass ``False``."""


def sparse_attention_fwd(q, k, v, cu_queries, cu_docs, row_to_query, flags: int, window: int, scale: float,
                         validate: bool = True):
    """Raw forward op: ``(out [T, H, D], lse [T, H] float32)``; differentiable in ``q``, ``k``, ``v`` (not lse)."""
    return ops.sparse_attention_fwd(q, k, v, cu_queries, cu_docs, row_to_query, int(flags), int(window), float(scale),
                                    bool(validate))


def sparse_attention_bwd(grad_out, q, k, v, out, lse, cu_queries, cu_docs, row_to_query, flags, window, scale,
                         validate: bool = True):
    """Raw backward op: ``(dq, dk, dv)``."""
    return ops.sparse_attention_bwd(
        grad_out, q, k, v, out, lse, cu_queries, cu_docs, row_to_query, int(flags), int(window), float(scale),
        bool(validate),
    )


# --- torch.library registrations ---------------------------------------------------------------------------------------


def _fwd_fake(q, k, v, cu_queries, cu_docs, row_to_query, flags, window, scale, validate=True):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, cu_queries, cu_docs, row_to_query, flags, window, scale,
              validate=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_queries, cu_docs, row_to_query, flags, window, scale, *rest = inputs  # rest: (validate,) or ()
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_queries, cu_docs, row_to_query)
    ctx.args = (flags, window, scale, bool(rest[0]) if rest else True)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_queries, cu_docs, row_to_query = ctx.saved_tensors
    dq, dk, dv = ops.sparse_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, cu_queries, cu_docs, row_to_query, *ctx.args
    )
    # one gradient per input the op received: the dispatcher drops trailing arguments equal to their default
    return (dq, dk, dv) + (None,) * (len(ctx.needs_input_grad) - 3)


def _register() -> None:
    """Once per op namespace: one build may be imported under two module names (``kernels`` and
    ``sparse_ce.native``), while its library and registrations are process-wide."""
    fwd, bwd = add_op_namespace_prefix("sparse_attention_fwd"), add_op_namespace_prefix("sparse_attention_bwd")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if not has(fwd, "Meta"):
        torch.library.register_fake(fwd)(_fwd_fake)
    if not has(bwd, "Meta"):
        torch.library.register_fake(bwd)(_bwd_fake)
    if not has(fwd, "Autograd"):
        torch.library.register_autograd(fwd, _backward, setup_context=_setup_context)


_register()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_queries: torch.Tensor,
    cu_docs: torch.Tensor,
    row_to_query: torch.Tensor,
    flags: int,
    window: int | None = -1,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention output ``[T, H, D]`` of the packed tokens.

    Args:
        q, k, v: ``[T, H, D]`` contiguous, float32 / float16 / bfloat16, ``1 <= D <= 256``.
        cu_queries: int64 ``[U + 1]``, ``cu_queries[0] = B``; query ``u`` owns ``[cu_queries[u], cu_queries[u+1])``.
        cu_docs: int64 ``[B + 1]``, ``cu_docs[0] = cu_queries[U]``; document ``b`` owns ``[cu_docs[b], cu_docs[b+1])``.
        row_to_query: int64 ``[B]``, the query of each row.
        flags: bitmask, bit i = direction i of (cls_query, cls_doc, query_cls, query_doc, doc_cls, doc_query).
        window: one-sided document window ``w >= 0``; ``-1`` or ``None`` for unlimited.
        scale: score scale, ``1 / sqrt(D)`` when ``None``.
        validate: check the index tensors' values (the default). ``False`` skips only the CUDA op's device-side
            check of GPU-resident index tensors (one small launch per call), for callers that built the layout
            themselves; the kernels still clamp every key range, and host-resident values are always checked.
    """
    window = -1 if window is None else int(window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ops.sparse_attention_fwd(q, k, v, cu_queries, cu_docs, row_to_query, int(flags), window, scale,
                                    bool(validate))[0]
