"""How a cross-encoder row splits into five segments, and the packed layout built on them.

Schlatt et al., ECIR 2024, Section 3.3 splits a row into three sub-sequences, each [SEP] belonging to "its"
sub-sequence; "Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604) names five segments:
[CLS] | query | [SEP]1 | document | [SEP]2. This module is the only place that knows where segments start and end.
Everything after the embeddings runs on a packed token list ``cls (batch) | query + [SEP]1 (unique queries) |
doc + [SEP]2 (all documents)``: no padding, and rows that share a query share its tokens (the query is computed once
when the pattern allows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable

import torch


class Segment(IntEnum):
    """Segment ids in the order of ``attention_pattern`` matrices (``SEGMENT_NAMES``); ``PAD`` marks padding."""

    PAD = -1
    CLS = 0
    QUERY = 1
    SEP1 = 2
    DOC = 3
    SEP2 = 4


SEGMENTS = (Segment.CLS, Segment.QUERY, Segment.SEP1, Segment.DOC, Segment.SEP2)


def token_types(segment_ids: torch.Tensor) -> torch.Tensor:
    """BERT token types: 0 for [CLS] query [SEP]1, 1 for document [SEP]2 (and padding's -1 gives 0)."""
    return (segment_ids >= Segment.DOC).long()


class SegmentationError(ValueError):
    """The input cannot be split into [CLS] / query / document segments."""


@dataclass
class SegmentLayout:
    """Segments of a padded batch and the packed token order used by the encoder.

    Attributes:
        segment_ids: ``[batch, seq]`` :class:`Segment` id per input position (``PAD`` for padding).
        query_lengths: ``[queries]`` tokens of each unique query, its [SEP]1 included.
        doc_lengths: ``[batch]`` tokens of each document, its [SEP]2 included.
        row_to_query: ``[batch]`` index of each row's query among the unique queries.
        query_rows: ``[queries]`` the input row each unique query is read from.
        positions: ``[tokens]`` flat index ``row * seq + position`` of each packed token in the padded input.
        query_slots: ``[query tokens]`` index of each query token in a ``[queries * max_query_len]`` padded view.
        max_query_len: Longest query (python int, for padded shapes).
        max_doc_len: Longest document (python int).
    """

    segment_ids: torch.Tensor
    query_lengths: torch.Tensor
    doc_lengths: torch.Tensor
    row_to_query: torch.Tensor
    query_rows: torch.Tensor
    positions: torch.Tensor
    query_slots: torch.Tensor
    max_query_len: int
    max_doc_len: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per layout: masks and index plans shared by all layers of one forward."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def batch_size(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def num_queries(self) -> int:
        return self.query_rows.shape[0]

    @property
    def num_query_tokens(self) -> int:
        return self.query_slots.shape[0]

    @property
    def shares_queries(self) -> bool:
        """Whether some rows reuse another row's query tokens."""
        return self.num_queries < self.batch_size

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed ``[tokens, ...]`` into cls ``[batch, ...]``, query ``[query tokens, ...]``, doc ``[doc tokens, ...]``."""
        b, q = self.batch_size, self.num_query_tokens
        return packed[:b], packed[b : b + q], packed[b + q :]

    def segment_means(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over each row's query segment and over its document segment ([SEP]s included).

        Args:
            packed: ``[tokens, hidden]`` in packed order.

        Returns:
            Query means ``[batch, hidden]`` (a shared query's mean is computed once) and document means ``[batch, hidden]``.
        """
        _, query, doc = self.split(packed)
        query_index = torch.repeat_interleave(torch.arange(self.num_queries, device=packed.device), self.query_lengths)
        doc_index = torch.repeat_interleave(torch.arange(self.batch_size, device=packed.device), self.doc_lengths)
        query_mean = query.new_zeros((self.num_queries, query.shape[-1])).index_add_(0, query_index, query)
        doc_mean = doc.new_zeros((self.batch_size, doc.shape[-1])).index_add_(0, doc_index, doc)
        query_mean = query_mean / self.query_lengths[:, None].to(query.dtype)
        doc_mean = doc_mean / self.doc_lengths[:, None].to(doc.dtype)
        return query_mean[self.row_to_query], doc_mean

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed ``[tokens, ...]`` back to padded ``[batch, seq, ...]``; shared query tokens go to every row."""
        flat_index = self.expanded_positions()
        out = packed.new_zeros((self.batch_size * self.seq_len, *packed.shape[1:]))
        out[flat_index[0]] = packed[flat_index[1]]
        return out.unflatten(0, (self.batch_size, self.seq_len))

    def expanded_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (flat padded position, packed index) covering every real token of every row."""
        b, s = self.batch_size, self.seq_len
        rows = torch.arange(b, device=self.positions.device)
        cls = (rows * s, rows)
        doc_start = b + self.num_query_tokens
        doc = (self.positions[doc_start:], torch.arange(doc_start, self.positions.shape[0], device=rows.device))
        # query tokens of every row: row b reads the tokens of its unique query
        qlen = self.query_lengths[self.row_to_query]
        j = torch.arange(self.max_query_len, device=rows.device)
        valid = j[None, :] < qlen[:, None]
        query_start = torch.cumsum(self.query_lengths, 0) - self.query_lengths
        packed_q = b + query_start[self.row_to_query][:, None] + j[None, :]
        flat_q = rows[:, None] * s + 1 + j[None, :]
        return (
            torch.cat([cls[0], flat_q[valid], doc[0]]),
            torch.cat([cls[1], packed_q[valid], doc[1]]),
        )


def build_segment_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    sep_token_id: int | None = None,
    share_query: bool = True,
    pad_token_id: int | None = None,
    cls_token_id: int | None = None,
) -> SegmentLayout:
    """Find the segments of each row of a right-padded ``[CLS] query [SEP] document [SEP]`` batch.

    Segments come from ``token_type_ids`` when given (0: [CLS], query and first [SEP]; 1: document and last [SEP]),
    otherwise from the [SEP] tokens of each row, of which there must be exactly two (a third makes the split
    ambiguous). Without ``attention_mask``, trailing ``pad_token_id`` tokens are padding.

    Args:
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: ``[batch, seq]``, 1 on tokens and 0 on right padding; ``None``: padding is found by
            ``pad_token_id`` (no padding when that is ``None`` too).
        token_type_ids: ``[batch, seq]`` or ``None``.
        sep_token_id: Id of [SEP]; needed when ``token_type_ids`` is ``None``.
        share_query: Let rows with identical query tokens share one copy of them.
        pad_token_id: Id of [PAD], for inputs without ``attention_mask``.
        cls_token_id: Id of [CLS]; when given, every row must start with it.

    Raises:
        SegmentationError: for left padding, holes in the mask, a row not starting with [CLS], missing or extra [SEP]
            or an empty segment.
    """
    if input_ids.dim() != 2:
        raise SegmentationError(f"input_ids: expected [batch, seq], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None and pad_token_id is not None:
        attention_mask = _mask_from_padding(input_ids, pad_token_id)
    mask = _valid_token_mask(input_ids, attention_mask)
    if cls_token_id is not None and (input_ids[:, 0] != cls_token_id).any():
        row = int((input_ids[:, 0] != cls_token_id).nonzero()[0])
        raise SegmentationError(
            f"input_ids: row {row} starts with id {int(input_ids[row, 0])}, not [CLS] (id {cls_token_id})"
        )
    lengths = mask.sum(1)
    pos = torch.arange(seq, device=device)[None, :]
    if token_type_ids is not None:
        if token_type_ids.shape != input_ids.shape:
            raise SegmentationError(
                f"token_type_ids: shape {tuple(token_type_ids.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        prefix = ((token_type_ids == 0) & mask).sum(1)  # [CLS] + query + [SEP]
        expected = (pos >= prefix[:, None]).to(token_type_ids.dtype)
        if ((token_type_ids != expected) & mask).any():
            row = int(((token_type_ids != expected) & mask).any(1).nonzero()[0])
            if attention_mask is None and _looks_padded(token_type_ids[row]):
                raise SegmentationError(
                    f"attention_mask: row {row} looks right-padded (token types fall back to 0 at its end), but no "
                    "attention_mask was given and the config has no pad_token_id; pass the tokenizer's attention_mask"
                )
            raise SegmentationError(
                f"token_type_ids: row {row} is not 0...0 1...1 ([CLS] query [SEP] = 0, document [SEP] = 1)"
            )
    else:
        if sep_token_id is None:
            raise SegmentationError(
                "token_type_ids: none given and config.sep_token_id is unset, so the query/document split is unknown"
            )
        is_sep = (input_ids == sep_token_id) & mask
        if not is_sep.any(1).all():
            row = int((~is_sep.any(1)).nonzero()[0])
            raise SegmentationError(f"input_ids: row {row} has no [SEP] (id {sep_token_id}) to end the query")
        seps = is_sep.sum(1)
        if (seps > 2).any():
            row = int((seps > 2).nonzero()[0])
            raise SegmentationError(
                f"input_ids: row {row} has {int(seps[row])} [SEP] tokens, so where the query ends is ambiguous (a "
                "literal [SEP] in the text?); pass token_type_ids, or tokenize with split_special_tokens=True"
            )
        prefix = is_sep.to(torch.int8).argmax(1) + 1
    query_lengths_per_row = prefix - 1
    doc_lengths = lengths - prefix
    if (query_lengths_per_row < 1).any():
        row = int((query_lengths_per_row < 1).nonzero()[0])
        raise SegmentationError(f"row {row}: no query segment after [CLS] (expected [CLS] query [SEP] ...)")
    if (doc_lengths < 1).any():
        row = int((doc_lengths < 1).nonzero()[0])
        raise SegmentationError(f"row {row}: no document segment (expected [CLS] query [SEP] document [SEP])")

    rows = torch.arange(batch, device=device)
    segment_ids = torch.full((batch, seq), int(Segment.PAD), dtype=torch.long, device=device)
    segment_ids[mask] = int(Segment.DOC)
    segment_ids[(pos < prefix[:, None]) & mask] = int(Segment.QUERY)
    segment_ids[rows, prefix - 1] = int(Segment.SEP1)
    segment_ids[rows, lengths - 1] = int(Segment.SEP2)
    segment_ids[:, 0] = int(Segment.CLS)

    max_query_len = int(query_lengths_per_row.max())
    row_to_query, query_rows = _group_queries(input_ids, query_lengths_per_row, max_query_len, share_query)
    query_lengths = query_lengths_per_row[query_rows]
    max_doc_len = int(doc_lengths.max())

    j = torch.arange(max_query_len, device=device)[None, :]
    q_valid = j < query_lengths[:, None]
    q_flat = query_rows[:, None] * seq + 1 + j
    q_slots = torch.arange(query_rows.shape[0], device=device)[:, None] * max_query_len + j
    k = torch.arange(max_doc_len, device=device)[None, :]
    d_valid = k < doc_lengths[:, None]
    d_flat = rows[:, None] * seq + prefix[:, None] + k
    positions = torch.cat([rows * seq, q_flat[q_valid], d_flat[d_valid]])
    return SegmentLayout(
        segment_ids=segment_ids,
        query_lengths=query_lengths,
        doc_lengths=doc_lengths,
        row_to_query=row_to_query,
        query_rows=query_rows,
        positions=positions,
        query_slots=q_slots[q_valid],
        max_query_len=max_query_len,
        max_doc_len=max_doc_len,
    )


def _mask_from_padding(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """1 up to the last non-[PAD] token of each row, 0 on the trailing [PAD] run (right padding)."""
    is_token = input_ids != pad_token_id
    positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    last = (is_token * positions).amax(1)  # 1-based position of the last real token, 0 for an all-[PAD] row
    return (positions[None, :] <= last[:, None]).long()


def _looks_padded(types: torch.Tensor) -> bool:
    """Token types ``0..0 1..1 0..0``: a document followed by padding that was typed 0."""
    ones = (types == 1).nonzero()
    return bool(len(ones)) and bool((types[int(ones[-1]) + 1 :] == 0).all()) and int(ones[-1]) + 1 < len(types)


def _valid_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise SegmentationError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.bool()
    if not mask[:, 0].all():
        raise SegmentationError(
            "attention_mask: left padding is not supported; tokenize with padding_side='right'"
        )
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise SegmentationError("attention_mask: a row has a hole (0 between 1s); only right padding is supported")
    return mask


def _group_queries(
    input_ids: torch.Tensor, query_lengths: torch.Tensor, max_query_len: int, share: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map rows to unique queries; returns ``row_to_query [batch]`` and ``query_rows [queries]``."""
    batch = input_ids.shape[0]
    rows = torch.arange(batch, device=input_ids.device)
    if not share or batch == 1:
        return rows, rows
    j = torch.arange(max_query_len, device=input_ids.device)[None, :]
    keys = input_ids[:, 1 : 1 + max_query_len]
    keys = torch.where(j < query_lengths[:, None], keys, torch.full_like(keys, -1))
    _, row_to_query = torch.unique(keys, dim=0, return_inverse=True)
    num_queries = int(row_to_query.max()) + 1
    if num_queries == batch:  # nothing shared: keep rows in order (unique() sorts them)
        return rows, rows
    query_rows = torch.full((num_queries,), batch, dtype=torch.long, device=input_ids.device)
    query_rows = query_rows.scatter_reduce(0, row_to_query, rows, reduce="amin")
    return row_to_query, query_rows
