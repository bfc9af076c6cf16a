"""FlexAttention backend: any per-layer five-segment pattern as a block-sparse mask over the packed tokens.

Schlatt et al., ECIR 2024 (Eqs. 1-3) and the five-segment patterns of "Understanding Matching Mechanisms in
Cross-Encoders" (arXiv 2507.14604), run by PyTorch's FlexAttention (``torch.nn.attention.flex_attention``; Dong et al.,
"Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024): compiled to Triton on CUDA,
to C++ on CPU, or eager (the unfused reference, quadratic memory).

The packed tokens (``cls | query | doc``, :class:`SegmentLayout`) are one sequence of a batch of one. Every token may
see, in each of the five segments, at most one contiguous range of packed tokens: its row's [CLS], its query's tokens
or [SEP]1, its document's tokens or [SEP]2 (cut to ``|i - j| <= w`` between {document, [SEP]2} tokens, which are
consecutive in packed order). Those ``[tokens, 5]`` ranges are the whole mask: ``mask_mod`` reads the range of the
key's segment, and the block mask is counted from the same ranges (keys of each row in each 128-token block: none,
some or all) without evaluating ``mask_mod`` on the ``tokens^2`` grid. Built once per distinct pattern per forward
(cached on the layout) and shared by the layers. The sequence is padded to a multiple of the block size with tokens
that see nothing and are seen by nothing; a row without keys gets a zero output, as in the dense backend.

FlexAttention has no attention dropout and, in torch <= 2.13, no backward on CPU: a backward through ``flex`` on CPU
raises one clear error (:class:`FlexBackwardOnCPU`).
"""

from __future__ import annotations

import functools
import logging

import torch

from .pattern import AttentionPattern
from .segments import SEGMENTS, Segment, SegmentLayout

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None

logger = logging.getLogger(__name__)

BLOCK_SIZE = 128
"""Rows and keys per block of the block mask on CUDA (FlexAttention's default Triton tile)."""
CPU_BLOCK_SIZE = 16
"""Rows and keys per block on CPU: compiled CPU flex computes every score of a visited block, and a w=4 band visits
far fewer scores in small blocks (1 x 4,096 tokens, attention alone, one thread: 198 ms at 128, 110 at 64, 77 at 32,
47 at 16; docs/benchmarks.md)."""


def block_size(device: torch.device) -> int:
    """Block size of the block mask on ``device``."""
    return CPU_BLOCK_SIZE if device.type == "cpu" else BLOCK_SIZE

CLASSIFY_CHUNK = 1 << 22
"""Row x block counts held at once while classifying blocks (16 MB of int32)."""
CPU_TRAINING_BACKENDS = "'windowed', 'kernel' or 'dense'"


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    return flex_attention is not None


def flex_attention_eager(query, key, value, layout, pattern, *, scaling, dropout=0.0, output_attentions=False):
    """Sparse-pattern attention through uncompiled FlexAttention (the reference path); same signature as the others."""
    return _flex(query, key, value, layout, pattern, scaling, dropout, output_attentions, compiled=False)


def flex_attention_compiled(query, key, value, layout, pattern, *, scaling, dropout=0.0, output_attentions=False):
    """Sparse-pattern attention through ``torch.compile(flex_attention, dynamic=True)``; same signature."""
    return _flex(query, key, value, layout, pattern, scaling, dropout, output_attentions, compiled=True)


def _flex(query, key, value, layout, pattern, scaling, dropout, output_attentions, compiled):
    name = "flex" if compiled else "flex-eager"
    if output_attentions:
        raise ValueError("output_attentions: only attention_backend='dense' returns attention weights")
    if dropout:
        raise ValueError(f"attention_backend={name!r}: FlexAttention has no attention dropout; train with "
                         "attention_probs_dropout_prob=0 or attention_backend='windowed' / 'dense'")
    if not flex_available():
        raise RuntimeError(f"attention_backend={name!r}: FlexAttention needs torch >= 2.5, this is {torch.__version__}")
    if pattern.has_zeroed:
        raise ValueError(f"{name} backend: the pattern zeroes weights after the softmax; only 'dense' does that")
    if layout.shares_queries and not pattern.query_is_independent:
        raise ValueError(f"{name} backend: rows share a query although the query attends to [CLS] or the document")
    block_mask = layout.cached(("flex-mask", pattern), lambda: flex_block_mask(layout, pattern, query.device))
    tokens = query.shape[0]
    padded = block_mask.seq_lengths[0]

    def to_flex(x: torch.Tensor) -> torch.Tensor:  # [tokens, heads, dim] -> [1, heads, padded, dim]
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - tokens)).transpose(0, 1)[None]

    run = _compiled_flex() if compiled else flex_attention
    q, k, v = to_flex(query), to_flex(key), to_flex(value)
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out = _NoCPUBackward.apply(run, q, k, v, block_mask, scaling, name)
    else:
        out = run(q, k, v, block_mask=block_mask, scale=scaling)
    return out[0].transpose(0, 1)[:tokens], None  # [tokens, heads, dim]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """One compiled FlexAttention per process, with dynamic shapes: batches of new lengths do not recompile."""
    logger.info("sparse-ce: compiling FlexAttention (torch.compile, dynamic shapes) on first use")
    return torch.compile(flex_attention, dynamic=True)


class FlexBackwardOnCPU(NotImplementedError):
    """A backward through the ``flex`` backends on CPU (FlexAttention has none there)."""


class _NoCPUBackward(torch.autograd.Function):
    """FlexAttention's forward on CPU whose backward raises :class:`FlexBackwardOnCPU` instead of an internal error."""

    @staticmethod
    def forward(ctx, run, q, k, v, block_mask, scaling, name):
        ctx.name = name
        return run(q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scaling)

    @staticmethod
    def backward(ctx, grad):
        raise FlexBackwardOnCPU(
            f"attention_backend={ctx.name!r}: FlexAttention has no backward on CPU in torch {torch.__version__}; "
            f"train on CPU with attention_backend={CPU_TRAINING_BACKENDS} ('auto' picks one), or on CUDA"
        )


# --- the mask: per-token key ranges ------------------------------------------------------------------------------


def key_ranges(layout: SegmentLayout, pattern: AttentionPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo, hi [tokens, 5]``: packed token ``i`` sees the keys ``lo[i, s] <= j < hi[i, s]`` of segment ``s``.

    Empty ranges (``lo == hi``) where the pattern forbids the direction. Ranges of one row are disjoint and lie in
    their segment, so the keys of row ``i`` are exactly their union.
    """
    device = layout.positions.device
    batch, queries = layout.batch_size, layout.num_queries
    tokens = layout.positions.shape[0]
    # segment starts/ends in packed order; query u: [q0, q1) = query tokens + [SEP]1; document b: [d0, d1)
    q1 = batch + torch.cumsum(layout.query_lengths, 0)
    q0 = q1 - layout.query_lengths
    d1 = batch + layout.num_query_tokens + torch.cumsum(layout.doc_lengths, 0)
    d0 = d1 - layout.doc_lengths
    rows = torch.arange(batch, device=device)
    # owner of every packed token: the row (cls, document) or the query's row (its first; the only one unshared)
    token_row = torch.cat([rows, torch.repeat_interleave(layout.query_rows, layout.query_lengths),
                           torch.repeat_interleave(rows, layout.doc_lengths)])
    token_query = torch.cat([layout.row_to_query, torch.repeat_interleave(
        torch.arange(queries, device=device), layout.query_lengths), torch.repeat_interleave(layout.row_to_query,
                                                                                            layout.doc_lengths)])
    seg = token_segments(layout)
    u, b = token_query, token_row
    # [tokens, 5] range of each segment for the token's row and query
    lo = torch.stack([b, q0[u], q1[u] - 1, d0[b], d1[b] - 1], 1)
    hi = torch.stack([b + 1, q1[u] - 1, q1[u], d1[b] - 1, d1[b]], 1)
    allowed = torch.tensor(pattern.allowed, dtype=torch.bool, device=device)[seg]  # [tokens, 5]
    hi = torch.where(allowed, hi, lo)
    if pattern.window is not None:
        windowed = (seg == Segment.DOC) | (seg == Segment.SEP2)
        i = torch.arange(tokens, device=device)
        for s in (Segment.DOC, Segment.SEP2):
            band_lo = torch.maximum(lo[:, s], i - pattern.window)
            band_hi = torch.minimum(hi[:, s], i + pattern.window + 1)
            lo[:, s] = torch.where(windowed, band_lo, lo[:, s])
            hi[:, s] = torch.where(windowed, torch.maximum(band_hi, band_lo), hi[:, s])
    return lo, hi


def token_segments(layout: SegmentLayout) -> torch.Tensor:
    """``[tokens]`` :class:`Segment` of every packed token."""
    return layout.segment_ids.flatten()[layout.positions]


def flex_block_mask(layout: SegmentLayout, pattern: AttentionPattern, device: torch.device, block: int | None = None):
    """The :class:`BlockMask` of ``pattern`` over ``layout``'s packed tokens, padded to a multiple of ``block``
    (default :func:`block_size` of the device)."""
    block = block or block_size(device)
    lo, hi = key_ranges(layout, pattern)
    seg = token_segments(layout)
    tokens = lo.shape[0]
    padded = -(-tokens // block) * block
    # padding tokens: segment [CLS] (any valid index), no keys; no real range reaches past ``tokens``
    lo = torch.nn.functional.pad(lo, (0, 0, 0, padded - tokens))
    hi = torch.nn.functional.pad(hi, (0, 0, 0, padded - tokens))
    seg = torch.nn.functional.pad(seg, (0, padded - tokens))
    full, partial = _classify_blocks(lo.int(), hi.int(), block)
    # one flat int32 table [padded * 11]: lo (5), hi (5), segment (1) of each token; constant offsets only, as
    # inductor's CPU flex template mis-sizes loads whose index depends on another load or on a buffer of length L
    fields = 2 * len(SEGMENTS) + 1
    table = torch.cat([lo, hi, seg[:, None]], 1).flatten().to(device, torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        key_seg = table[kv_idx * fields + fields - 1]
        inside = [(key_seg == s) & (kv_idx >= table[q_idx * fields + s]) & (kv_idx < table[q_idx * fields + 5 + s])
                  for s in range(len(SEGMENTS))]
        return functools.reduce(torch.logical_or, inside)

    def blocks(mask: torch.Tensor):  # [q blocks, kv blocks] -> counts [1, 1, qb], indices [1, 1, qb, kvb]
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
        return mask.sum(-1).int()[None, None].to(device), order.int()[None, None].to(device)

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(padded, padded))


def _classify_blocks(lo: torch.Tensor, hi: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``full, partial [q blocks, kv blocks]``: every row of the q block sees every key of the kv block / some do.

    Keys of each row in each kv block, summed over the row's disjoint ranges; q blocks in chunks of at most
    :data:`CLASSIFY_CHUNK` counts, so memory stays bounded for long inputs and small blocks.
    """
    n = lo.shape[0] // block  # lo is padded to a multiple of block
    start = torch.arange(n, device=lo.device, dtype=lo.dtype) * block  # [kv blocks]
    step = max(1, CLASSIFY_CHUNK // (block * n))  # q blocks per chunk
    full, partial = [], []
    for first in range(0, n, step):
        rows = slice(first * block, min(n, first + step) * block)
        seen = torch.zeros(rows.stop - rows.start, n, dtype=lo.dtype, device=lo.device)  # [rows, kv blocks]
        for s in range(lo.shape[1]):
            overlap = torch.minimum(hi[rows, s, None], start + block) - torch.maximum(lo[rows, s, None], start)
            seen += overlap.clamp(min=0)
        seen = seen.view(-1, block, n)
        full.append((seen == block).all(1))
        partial.append((seen > 0).any(1) & ~full[-1])
    return torch.cat(full), torch.cat(partial)
