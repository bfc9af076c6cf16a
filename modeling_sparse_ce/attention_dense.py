"""Dense oracle: the pattern as a boolean mask over the padded sequence, then scaled dot-product attention.

Schlatt et al., ECIR 2024, Eqs. 1-3 written as one masked softmax over the whole ``[CLS] q [SEP] d [SEP]`` row.
Quadratic in length; the reference every other backend is tested against, the only one that returns weights and the
only one that honours every five-segment pattern and the only one that zeroes weights after the softmax (an ablation's
"zero" mode, :attr:`AttentionPattern.zeroed`). A row that may see no key gets a zero output (and zero weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pattern import AttentionPattern
from .segments import SegmentLayout


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: SegmentLayout,
    pattern: AttentionPattern,
    *,
    scaling: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked attention over padded rows.

    Args:
        query, key, value: ``[tokens, heads, head_dim]`` in the packed order of ``layout``.
        layout: Segments of the batch.
        pattern: Attention pattern.
        scaling: Score scale, ``1 / sqrt(head_dim)``.
        dropout: Attention-probability dropout.
        output_attentions: Also return the weights ``[batch, heads, seq, seq]``.

    Returns:
        Output ``[tokens, heads, head_dim]`` (packed) and the weights or ``None``.
    """
    batch, seq = layout.batch_size, layout.seq_len
    flat, packed = layout.expanded_positions()

    def to_padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((batch * seq, *x.shape[1:]))
        out[flat] = x[packed]
        return out.unflatten(0, (batch, seq)).transpose(1, 2)  # [batch, heads, seq, dim]

    q, k, v = to_padded(query), to_padded(key), to_padded(value)
    # mask: [batch, 1, seq, seq] (rows without keys see themselves), empty: [batch, 1, seq, 1]; once per forward
    mask, empty = layout.cached(("dense-mask", pattern), lambda: _mask_of(pattern, layout))
    weights = None
    if pattern.has_zeroed or output_attentions:  # materialised weights (zeroed ones: the paper's ablation)
        dropped = empty
        if pattern.has_zeroed:  # softmax over the pattern, then these weights set to 0, no renormalising
            dropped = empty | layout.cached(("dense-zeroed", pattern), lambda: pattern.zeroed_mask(layout.segment_ids)[:, None])
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # half precision in float32, float64 stays
        probabilities = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype).masked_fill(dropped, 0)
        out = torch.matmul(F.dropout(probabilities, p=dropout, training=dropout > 0), v)
        weights = probabilities if output_attentions else None
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.masked_fill(empty, 0)
    out = out.transpose(1, 2).flatten(0, 1)  # [batch * seq, heads, dim]
    return out[layout.positions], weights


def _mask_of(pattern: AttentionPattern, layout: SegmentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    mask, empty = pattern.dense_mask(layout.segment_ids)
    return mask[:, None], empty[:, None, :, None]
