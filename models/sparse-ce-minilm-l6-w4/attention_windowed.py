"""Memory-linear attention for the sparse pattern in pure PyTorch (CPU and GPU, differentiable).

Schlatt et al., ECIR 2024, Section 3.4: each segment attends to a tuple of key segments with its own window (Eq. 1-3).
[CLS] and query rows attend to whole segments (few rows, linear cost). Document rows are processed in blocks: a block
of rows attends to its prefix keys ([CLS], the row's query) and to the block's own keys plus a halo of ``w`` on each
side, in one joint softmax, so no document x document score matrix is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pattern import AttentionPattern, Segment
from .segments import SegmentLayout


def document_block_size(window: int) -> int:
    """Rows per document block for a one-sided window (halo overhead vs. batched-matmul overhead)."""
    return max(16, 2 * window)


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SegmentLayout,
    pattern: AttentionPattern,
    *,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, None]:
    """Sparse-pattern attention on packed tokens; same signature as ``dense_attention``."""
    if output_attentions:
        raise ValueError("output_attentions: only attention_backend='dense' returns attention weights")
    _check_supported(pattern, layout)
    window = pattern.document_window("windowed backend")
    q_cls, q_query, q_doc = layout.split(query)
    k_cls, k_query, k_doc = layout.split(key)
    v_cls, v_query, v_doc = layout.split(value)
    row_query = layout.row_to_query
    plan = layout.cached(("band", window), lambda: _band_plan(layout, window))
    kd, vd = plan.padded(k_doc, layout.batch_size), plan.padded(v_doc, layout.batch_size)

    kq, vq = (layout.pad_query(x).transpose(1, 2) for x in (k_query, v_query))
    query_mask = layout.cached("query-mask", layout.query_mask)
    cls_mask = layout.cached("cls-mask", lambda: query_mask.new_ones((layout.batch_size, 1)))

    def keys_for(src: Segment, rows: str, include_self: bool = True):
        """Keys, values ``[rows, heads, keys, dim]`` and mask ``[rows, keys]`` of the segments ``src`` attends to.

        ``rows="batch"``: one per input row ([CLS] and document rows), reading each row's (possibly shared) query;
        ``rows="queries"``: one per unique query, which sees [CLS] or the document only when no query is shared.
        """
        share = rows == "batch" and layout.shares_queries
        segments = {
            Segment.CLS: lambda: (k_cls[:, :, None], v_cls[:, :, None], cls_mask),
            Segment.QUERY: lambda: (kq[row_query], vq[row_query], query_mask[row_query]) if share else (kq, vq, query_mask),
            Segment.DOC: lambda: (kd, vd, plan.key_mask),
        }
        parts = [part() for dst, part in segments.items() if pattern.allows(src, dst) and (include_self or dst is not src)]
        if not parts:  # only document rows can have no prefix
            empty = query.new_zeros((layout.batch_size, query.shape[1], 0, query.shape[2]))
            return empty, empty, cls_mask[:, :0]
        return tuple(torch.cat(xs, dim=-2 if i < 2 else -1) if len(xs) > 1 else xs[0] for i, xs in enumerate(zip(*parts)))

    # [CLS] rows: [batch, heads, 1, dim]
    out_cls = _sdpa(q_cls[:, :, None], *keys_for(Segment.CLS, "batch"), scaling, dropout)[:, :, 0]
    # query rows: [queries, heads, max_query_len, dim]
    qq = layout.pad_query(q_query).transpose(1, 2)
    out_query = layout.unpad_query(_sdpa(qq, *keys_for(Segment.QUERY, "queries"), scaling, dropout).transpose(1, 2))
    # document rows: prefix segments whole, own segment banded
    prefix = keys_for(Segment.DOC, "batch", include_self=False)
    out_doc = _document_attention(q_doc, kd, vd, plan, layout, pattern, prefix, scaling, dropout)
    return torch.cat([out_cls, out_query, out_doc]), None


def _check_supported(pattern: AttentionPattern, layout: SegmentLayout) -> None:
    if layout.shares_queries and not pattern.query_is_independent:
        raise ValueError("windowed backend: rows share a query although the query attends to [CLS] or the document")


def _sdpa(q, k, v, key_mask, scaling, dropout):
    # key_mask: [rows, keys] -> [rows, 1, 1, keys]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None], dropout_p=dropout, scale=scaling)


@dataclass(frozen=True)
class _BandPlan:
    """Where document tokens go in blocked, halo-padded rows, and which band keys each row may see.

    Attributes:
        block: Rows per block.
        halo: Keys left and right of a block (``w``; 0 when the window covers the whole document).
        num_blocks: Blocks per document.
        rows: ``[doc tokens]`` batch row of each packed document token.
        cols: ``[doc tokens]`` column of each token in a padded row of ``halo + num_blocks * block + halo``.
        blocked: ``[batch, 1, blocks, block, block + 2 * halo]`` True where a band key is NOT attended.
        key_mask: ``[batch, width]`` True on the columns that hold document tokens.
    """

    block: int
    halo: int
    num_blocks: int
    rows: torch.Tensor
    cols: torch.Tensor
    blocked: torch.Tensor
    key_mask: torch.Tensor

    def padded(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Packed document tokens ``[doc tokens, heads, dim]`` to halo-padded rows ``[batch, heads, width, dim]``."""
        out = x.new_zeros((batch, x.shape[1], self.width, x.shape[2]))
        out[self.rows, :, self.cols] = x
        return out

    @property
    def width(self) -> int:
        return self.num_blocks * self.block + 2 * self.halo


def _band_plan(layout: SegmentLayout, window: int | None) -> _BandPlan:
    doc_len, device = layout.max_doc_len, layout.doc_lengths.device
    banded = window is not None and window < doc_len - 1  # else the window covers the whole document
    block, halo = (min(document_block_size(window), doc_len), window) if banded else (doc_len, 0)
    num_blocks = -(-doc_len // block)
    slots = layout.doc_slots  # row * max_doc_len + position
    rows, cols = slots // doc_len, slots % doc_len + halo
    key_pos = torch.arange(num_blocks, device=device)[:, None] * block - halo + torch.arange(block + 2 * halo, device=device)
    key_valid = (key_pos[None] >= 0) & (key_pos[None] < layout.doc_lengths[:, None, None])  # [batch, blocks, band]
    allowed = key_valid[:, :, None, :]
    if banded:  # |row - key| <= w  <=>  0 <= key slot - row slot <= 2w
        offset = torch.arange(block + 2 * halo, device=device)[None, :] - torch.arange(block, device=device)[:, None]
        allowed = allowed & ((offset >= 0) & (offset <= 2 * halo))
    blocked = ~allowed.expand(layout.batch_size, num_blocks, block, block + 2 * halo)[:, None]
    width = torch.arange(num_blocks * block + 2 * halo, device=device)[None, :] - halo
    key_mask = (width >= 0) & (width < layout.doc_lengths[:, None])
    return _BandPlan(block, halo, num_blocks, rows, cols, blocked, key_mask)


def _document_attention(q_doc, kd, vd, plan, layout, pattern, prefix_keys, scaling, dropout):
    """Document rows: one softmax over the prefix keys and a blocked band of document keys.

    Args:
        q_doc: Packed document queries ``[doc tokens, heads, dim]``.
        kd, vd: Halo-padded document keys and values ``[batch, heads, width, dim]`` (:meth:`_BandPlan.padded`).
        plan: The layout's :class:`_BandPlan`.
        prefix_keys: Keys, values ``[batch, heads, prefix, dim]`` and mask ``[batch, prefix]`` of [CLS] and query.

    Returns:
        Packed output ``[doc tokens, heads, dim]``.
    """
    kp, vp, prefix_mask = prefix_keys
    num_prefix = kp.shape[2]
    span = plan.num_blocks * plan.block
    # q: [batch, heads, blocks, block, dim]; k/v band: [batch, heads, blocks, dim, block + 2 * halo]
    qb = plan.padded(q_doc, layout.batch_size)[:, :, plan.halo : plan.halo + span].unflatten(2, (plan.num_blocks, plan.block))
    kb = kd.unfold(2, plan.block + 2 * plan.halo, plan.block)
    vb = vd.unfold(2, plan.block + 2 * plan.halo, plan.block)
    prefix_scores = torch.matmul(qb, kp[:, :, None].transpose(-1, -2))  # [batch, heads, blocks, block, prefix]
    scores = torch.cat([prefix_scores, torch.matmul(qb, kb)], dim=-1).mul_(scaling)
    blocked = layout.cached(("doc-blocked", pattern), lambda: torch.cat(
        [(~prefix_mask)[:, None, None, None, :].expand(*plan.blocked.shape[:-1], num_prefix), plan.blocked], dim=-1))
    scores.masked_fill_(blocked, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q_doc.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs[..., num_prefix:], vb.transpose(-1, -2))
    if num_prefix:
        out += torch.matmul(probs[..., :num_prefix], vp[:, :, None])
    return out.flatten(2, 3)[plan.rows, :, plan.cols - plan.halo]
