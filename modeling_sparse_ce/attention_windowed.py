"""Memory-linear attention for the sparse pattern in pure PyTorch (CPU and GPU, differentiable).

Schlatt et al., ECIR 2024, Section 3.4: each segment attends to a tuple of key segments with its own window (Eq. 1-3).
[CLS] and query rows attend to whole segments (few rows, linear cost). Document rows are processed in blocks: a block
of rows attends to its prefix keys ([CLS], the row's query) and to the block's own keys plus a halo of ``w`` on each
side, in one joint softmax, so no document x document score matrix is ever formed.
"""

from __future__ import annotations

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
    q_cls, q_query, q_doc = layout.split(query)
    k_cls, k_query, k_doc = layout.split(key)
    v_cls, v_query, v_doc = layout.split(value)
    # per-segment padded views: [rows, heads, len, dim]
    kq, vq = (layout.pad_query(x).transpose(1, 2) for x in (k_query, v_query))
    kd, vd = (layout.pad_doc(x).transpose(1, 2) for x in (k_doc, v_doc))
    kc, vc = k_cls[:, :, None], v_cls[:, :, None]
    query_mask, doc_mask = layout.query_mask(), layout.doc_mask()
    cls_mask = query_mask.new_ones((layout.batch_size, 1))
    row_query = layout.row_to_query

    segments = {
        Segment.CLS: (kc, vc, cls_mask),
        Segment.QUERY: (kq, vq, query_mask),
        Segment.DOC: (kd, vd, doc_mask),
    }

    def keys_for(src: Segment, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated keys/values/mask of the segments ``src`` attends to, for each batch row."""
        parts = []
        for dst, (k, v, m) in segments.items():
            if not pattern.allows(src, dst):
                continue
            if dst is Segment.QUERY:
                k, v, m = k[rows], v[rows], m[rows]
            parts.append((k, v, m))
        return tuple(torch.cat(xs, dim=-2 if i < 2 else -1) for i, xs in enumerate(zip(*parts)))

    # [CLS] rows: [batch, heads, 1, dim]
    k, v, m = keys_for(Segment.CLS, row_query)
    out_cls = _sdpa(q_cls[:, :, None], k, v, m, scaling, dropout)[:, :, 0]
    # query rows: [queries, heads, max_query_len, dim]; rows equal queries unless the query is shared
    k, v, m = keys_for(Segment.QUERY, torch.arange(layout.num_queries, device=query.device))
    qq = layout.pad_query(q_query).transpose(1, 2)
    out_query = layout.unpad_query(_sdpa(qq, k, v, m, scaling, dropout).transpose(1, 2))
    # document rows
    qd = layout.pad_doc(q_doc).transpose(1, 2)
    out_doc = _document_attention(qd, kd, vd, doc_mask, layout, pattern, row_query, kc, vc, kq, vq, query_mask, scaling, dropout)
    out_doc = layout.unpad_doc(out_doc.transpose(1, 2))
    return torch.cat([out_cls, out_query, out_doc]), None


def _check_supported(pattern: AttentionPattern, layout: SegmentLayout) -> None:
    for src in Segment:
        for dst in Segment:
            if src is Segment.PAD or dst is Segment.PAD:
                continue
            if pattern.window[src][dst] is not None and (src, dst) != (Segment.DOC, Segment.DOC):
                raise ValueError(
                    f"windowed backend: a window on {src.name}->{dst.name} is not supported (documents only)"
                )
    if layout.shares_queries and not pattern.query_is_independent:
        raise ValueError("windowed backend: rows share a query although the query attends to [CLS] or the document")


def _sdpa(q, k, v, key_mask, scaling, dropout):
    # key_mask: [rows, keys] -> [rows, 1, 1, keys]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None], dropout_p=dropout, scale=scaling)


def _document_attention(qd, kd, vd, doc_mask, layout, pattern, row_query, kc, vc, kq, vq, query_mask, scaling, dropout):
    """Document rows: joint softmax over prefix keys and a blocked band of document keys.

    Shapes: qd, kd, vd ``[batch, heads, max_doc_len, dim]``; returns ``[batch, heads, max_doc_len, dim]``.
    """
    batch, heads, doc_len, dim = qd.shape
    prefix = []
    if pattern.allows(Segment.DOC, Segment.CLS):
        prefix.append((kc, vc, doc_mask.new_ones((batch, 1))))
    if pattern.allows(Segment.DOC, Segment.QUERY):
        prefix.append((kq[row_query], vq[row_query], query_mask[row_query]))
    if prefix:
        kp, vp, mp = (torch.cat(xs, dim=-2 if i < 2 else -1) for i, xs in enumerate(zip(*prefix)))
    else:
        kp = vp = qd.new_zeros((batch, heads, 0, dim))
        mp = doc_mask.new_zeros((batch, 0))
    num_prefix = kp.shape[2]

    window = pattern.window[Segment.DOC][Segment.DOC]
    banded = window is not None and window < doc_len - 1  # else the window covers the whole document
    block, halo = (min(document_block_size(window), doc_len), window) if banded else (doc_len, 0)
    num_blocks = -(-doc_len // block)
    padded_len = num_blocks * block
    tail = padded_len - doc_len
    # q: [batch, heads, blocks, block, dim]; k/v band: [batch, heads, blocks, dim, block + 2 * halo]
    qb = F.pad(qd, (0, 0, 0, tail)).unflatten(2, (num_blocks, block))
    kb = F.pad(kd, (0, 0, halo, tail + halo)).unfold(2, block + 2 * halo, block)
    vb = F.pad(vd, (0, 0, halo, tail + halo)).unfold(2, block + 2 * halo, block)
    band_scores = torch.matmul(qb, kb)
    prefix_scores = torch.matmul(qb, kp[:, :, None].transpose(-1, -2))  # [batch, heads, blocks, block, prefix]
    scores = torch.cat([prefix_scores, band_scores], dim=-1) * scaling

    # mask: [batch, 1, blocks, block, prefix + band]
    key_pos = torch.arange(num_blocks, device=qd.device)[:, None] * block - halo + torch.arange(block + 2 * halo, device=qd.device)
    key_valid = (key_pos[None] >= 0) & (key_pos[None] < layout.doc_lengths[:, None, None])  # [batch, blocks, band]
    band_mask = key_valid[:, :, None, :]
    if banded:  # |row - key| <= w  <=>  0 <= key slot - row slot <= 2w
        offset = torch.arange(block + 2 * halo, device=qd.device)[None, :] - torch.arange(block, device=qd.device)[:, None]
        band_mask = band_mask & ((offset >= 0) & (offset <= 2 * halo))
    prefix_mask = mp[:, None, None, :].expand(batch, num_blocks, block, num_prefix)
    mask = torch.cat([prefix_mask, band_mask.expand(batch, num_blocks, block, -1)], dim=-1)[:, None]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(qd.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs[..., :num_prefix], vp[:, :, None]) + torch.matmul(probs[..., num_prefix:], vb.transpose(-1, -2))
    return out.flatten(2, 3)[:, :, :doc_len]
