"""Memory-linear attention for the sparse pattern in pure PyTorch (CPU and GPU, differentiable).

Schlatt et al., ECIR 2024, Section 3.4: each segment attends to a tuple of key segments, documents within a window
(Eq. 1-3). Patterns of the six-flag family only ([SEP]1 as a query token, [SEP]2 as a document token), which is what
lets a query's tokens and a document's tokens be handled as two contiguous spans.
Rows are processed in blocks that share one key list: each [CLS] row alone, each unique query's tokens together,
and each run of ``block`` consecutive tokens of a document. A block's rows and keys are gathered straight from the
packed query/key/value tensors (whole ``heads x dim`` rows; no padded copies of documents, no concatenated score
matrices) and each group of blocks is one ``scaled_dot_product_attention`` call with a boolean mask. A document block
sees its prefix ([CLS], its query) and a band of ``block + 2w`` document keys, so no document x document score matrix
is formed for a finite window. The gather plan depends only on the layout and the pattern: built once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pattern import AttentionPattern
from .segments import Segment, SegmentLayout


def document_block_size(window: int) -> int:
    """Rows per document block for a one-sided window: the band's halo (``2w``) against per-block overhead."""
    return max(32, 2 * window)


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
    plan = layout.cached(("blocks", pattern), lambda: _block_plan(layout, pattern))
    out = query.new_empty(query.shape)  # [tokens, heads, dim]; every token is a real row of exactly one block
    for group in plan:
        block_out = _block_attention(query, key, value, group, scaling, dropout)  # [blocks * rows, heads, dim]
        out.index_copy_(0, group.tokens, block_out.index_select(0, group.slots))
    return out, None


def _check_supported(pattern: AttentionPattern, layout: SegmentLayout) -> None:
    pattern.require_flag_family("windowed backend: ")
    if layout.shares_queries and not pattern.query_is_independent:
        raise ValueError("windowed backend: rows share a query although the query attends to [CLS] or the document")


@dataclass(frozen=True)
class _BlockGroup:
    """Blocks of rows that share a key list.

    Attributes:
        rows: ``[blocks, rows]`` packed token of each row slot (0 in padding slots, whose output is never read).
        keys: ``[blocks, keys]`` packed token of each key slot (0 in padding slots, which are blocked).
        allowed: ``[blocks, 1, rows, keys]`` True where the row may see the key (every row sees one key at least).
        slots: ``[real rows]`` flat slots ``block * rows + row`` of the real rows, in packed-token order of ``tokens``.
        tokens: ``[real rows]`` the packed token of each of those slots.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor
    slots: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> "_BlockGroup":
        """From row indices, key indices, ``allowed [blocks, rows, keys]`` and the validity of the row slots."""
        slots = valid.flatten().nonzero().squeeze(1)
        allowed = allowed | ~valid[:, :, None]  # padding rows see everything: a finite softmax, never read back
        return cls(rows, keys, allowed[:, None], slots, rows.flatten()[slots])


def _block_attention(query, key, value, group: _BlockGroup, scaling: float, dropout: float) -> torch.Tensor:
    """Softmax attention of each block's rows over its keys: ``[blocks * rows, heads, dim]``."""
    blocks, rows = group.rows.shape
    keys = group.keys.shape[1]
    heads, dim = query.shape[1:]
    # rows of [heads * dim] gathered whole; q: [blocks, heads, rows, dim], k/v: [blocks, heads, keys, dim] (views)
    q = query.index_select(0, group.rows.flatten()).view(blocks, rows, heads, dim).transpose(1, 2)
    k = key.index_select(0, group.keys.flatten()).view(blocks, keys, heads, dim).transpose(1, 2)
    v = value.index_select(0, group.keys.flatten()).view(blocks, keys, heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.allowed, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).reshape(blocks * rows, heads, dim)


def _block_plan(layout: SegmentLayout, pattern: AttentionPattern) -> tuple[_BlockGroup, ...]:
    """Gather indices and masks of the [CLS], query and document blocks of ``layout`` under ``pattern``."""
    device = layout.positions.device
    batch, tokens = layout.batch_size, layout.positions.shape[0]
    padding = 0  # the token that padding slots point at
    rows_b = torch.arange(batch, device=device)
    query_start = batch + torch.cumsum(layout.query_lengths, 0) - layout.query_lengths  # [queries]
    doc_start = batch + layout.num_query_tokens + torch.cumsum(layout.doc_lengths, 0) - layout.doc_lengths  # [batch]

    def span(starts, lengths, width):
        """``[n, width]`` packed indices ``start + j`` and their validity ``j < length``."""
        j = torch.arange(width, device=device)[None, :]
        valid = j < lengths[:, None]
        return torch.where(valid, starts[:, None] + j, padding), valid

    def keys_of(src: Segment, owner_rows: torch.Tensor, include_self: bool):
        """Whole-segment keys that ``src`` rows of input rows ``owner_rows`` attend to: indices and validity."""
        parts = []
        if pattern.allows(src, Segment.CLS) and (include_self or src is not Segment.CLS):
            parts.append((owner_rows[:, None], torch.ones_like(owner_rows[:, None], dtype=torch.bool)))
        if pattern.allows(src, Segment.QUERY) and (include_self or src is not Segment.QUERY):
            u = layout.row_to_query[owner_rows]
            parts.append(span(query_start[u], layout.query_lengths[u], layout.max_query_len))
        if pattern.allows(src, Segment.DOC) and (include_self or src is not Segment.DOC):
            parts.append(span(doc_start[owner_rows], layout.doc_lengths[owner_rows], layout.max_doc_len))
        if not parts:
            empty = owner_rows.new_zeros((owner_rows.shape[0], 0))
            return empty, empty.bool()
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    groups = []
    # [CLS] rows: one per input row, its allowed segments whole
    cls_keys, cls_valid = keys_of(Segment.CLS, rows_b, include_self=True)
    groups.append(_BlockGroup.of(rows_b[:, None], cls_keys, cls_valid[:, None, :], torch.ones_like(rows_b[:, None]).bool()))
    # query rows: one block per unique query, read from its first input row (unshared when it sees [CLS] or documents)
    q_rows, q_rows_valid = span(query_start, layout.query_lengths, layout.max_query_len)
    q_keys, q_valid = keys_of(Segment.QUERY, layout.query_rows, include_self=True)
    groups.append(_BlockGroup.of(q_rows, q_keys, q_valid[:, None, :].expand(-1, q_rows.shape[1], -1), q_rows_valid))
    groups.append(_document_blocks(layout, pattern, doc_start, span, keys_of, padding))

    return tuple(groups)


def _document_blocks(layout, pattern, doc_start, span, keys_of, padding) -> _BlockGroup:
    """Runs of ``block`` consecutive tokens of each document; keys: the prefix segments and a band of the document."""
    device = doc_start.device
    window = pattern.window
    lengths = layout.doc_lengths
    banded = window is not None and window < layout.max_doc_len - 1
    block = min(document_block_size(window), layout.max_doc_len) if banded else layout.max_doc_len
    halo = window if banded else 0
    per_doc = (lengths + block - 1) // block  # [batch]
    doc_of_block = torch.repeat_interleave(torch.arange(layout.batch_size, device=device), per_doc)
    first_block = torch.cumsum(per_doc, 0) - per_doc
    block_start = (torch.arange(doc_of_block.shape[0], device=device) - first_block[doc_of_block]) * block  # in doc
    length = lengths[doc_of_block]
    # rows: [blocks, block] positions block_start + i in the document
    row_pos = block_start[:, None] + torch.arange(block, device=device)[None, :]
    row_valid = row_pos < length[:, None]
    rows = torch.where(row_valid, doc_start[doc_of_block][:, None] + row_pos, padding)
    # band keys: [blocks, block + 2 * halo] positions block_start - halo + j
    key_pos = block_start[:, None] - halo + torch.arange(block + 2 * halo, device=device)[None, :]
    key_valid = (key_pos >= 0) & (key_pos < length[:, None])
    band = torch.where(key_valid, doc_start[doc_of_block][:, None] + key_pos, padding)
    allowed = key_valid[:, None, :].expand(-1, block, -1)
    if banded:  # |row - key| <= w
        allowed = allowed & ((row_pos[:, :, None] - key_pos[:, None, :]).abs() <= window)
    prefix, prefix_valid = keys_of(Segment.DOC, doc_of_block, include_self=False)
    keys = torch.cat([prefix, band], 1)
    allowed = torch.cat([prefix_valid[:, None, :].expand(-1, block, -1), allowed], 2)
    return _BlockGroup.of(rows, keys, allowed, row_valid)
