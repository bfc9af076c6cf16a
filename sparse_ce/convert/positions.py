"""Longer inputs by position interpolation of a learned BERT position table.

Schlatt, Fröbe, Hagen: "Investigating the Effects of Sparse Attention on Cross-Encoders", ECIR 2024, extended their
512-position passage models to 4,096-token documents with positional interpolation (Chen et al., 2023,
arXiv:2306.15595): the trained table is stretched linearly over the new length, optionally using only a well-trained
prefix of it. This is an explicit conversion step; nothing here ever re-initialises positions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def interpolate_positions(table: torch.Tensor, size: int, trained_positions: int | None = None) -> torch.Tensor:
    """Stretch a position table to ``size`` rows by linear interpolation.

    Row ``i`` of the result is the table at fractional position ``i * (k - 1) / (size - 1)``, where ``k`` is the
    number of rows used (the whole table, or its first ``trained_positions`` rows); the first and last used rows are
    kept exactly and every other row mixes its two neighbours linearly.

    Args:
        table: Trained position embeddings ``[n, hidden]``.
        size: Rows of the new table; at least ``n``.
        trained_positions: Interpolate over the first ``k`` rows only (2 <= k <= n); ``None`` uses all ``n``.

    Returns:
        The new table ``[size, hidden]`` in the dtype of ``table`` (computed in float32 or better).

    Raises:
        ValueError: ``size`` is smaller than the table or ``trained_positions`` is out of range.
    """
    rows = table.shape[0]
    used = rows if trained_positions is None else trained_positions
    if size < rows:
        raise ValueError(f"max_positions: {size} is below the current {rows} positions; shrinking is not supported")
    if not 2 <= used <= rows:
        raise ValueError(f"trained_positions: expected 2 <= k <= {rows}, got {used}")
    # exact integer arithmetic for the source coordinates: i * (used - 1) = lower * (size - 1) + remainder
    scaled = torch.arange(size, device=table.device) * (used - 1)
    lower = torch.div(scaled, size - 1, rounding_mode="floor")
    upper = (lower + 1).clamp(max=used - 1)
    frac = ((scaled - lower * (size - 1)).double() / (size - 1))[:, None]
    source = table.double() if table.dtype == torch.float64 else table.float()
    mixed = (1 - frac).to(source.dtype) * source[lower] + frac.to(source.dtype) * source[upper]
    return mixed.to(table.dtype)


def extend_position_embeddings(model: PreTrainedModel, size: int, trained_positions: int | None = None) -> None:
    """Give a BERT-style model a position table of ``size`` rows by :func:`interpolate_positions`, in place.

    Replaces ``embeddings.position_embeddings`` with a new :class:`~torch.nn.Embedding`, resizes the
    ``position_ids`` / ``token_type_ids`` buffers and sets ``config.max_position_embeddings``.

    Args:
        model: A model whose base model has BERT's ``embeddings`` module (any head on top is fine).
        size: New number of positions; at least the current one.
        trained_positions: See :func:`interpolate_positions`.
    """
    embeddings = model.base_model.embeddings
    old = embeddings.position_embeddings.weight
    new = nn.Embedding(size, old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        new.weight.copy_(interpolate_positions(old.detach(), size, trained_positions))
    new.weight.requires_grad_(old.requires_grad)
    embeddings.position_embeddings = new
    position_ids = torch.arange(size, device=old.device).expand((1, -1))
    embeddings.register_buffer("position_ids", position_ids, persistent=False)
    embeddings.register_buffer("token_type_ids", torch.zeros_like(position_ids), persistent=False)
    model.config.max_position_embeddings = size
