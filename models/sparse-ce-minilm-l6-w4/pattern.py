"""Attention pattern of the sparse cross-encoder as a segment-by-segment table.

Schlatt et al., ECIR 2024, Section 3.4 (Eqs. 1-3): each segment ([CLS], query, document) attends to a chosen set of
segments, with an optional window ``w`` inside a segment. The pattern is a table over segment pairs, not a set of
flags, so that more segments (own [SEP] segments) or per-layer patterns need no change in the attention code.
This module owns the pattern and the dense boolean mask built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class Segment(IntEnum):
    """Segment ids; a row is ``[CLS] | query + [SEP] | document + [SEP] | padding``."""

    PAD = -1
    CLS = 0
    QUERY = 1
    DOC = 2


SEGMENTS = (Segment.CLS, Segment.QUERY, Segment.DOC)
FLAG_DIRECTIONS = {
    "cls_query_attention": (Segment.CLS, Segment.QUERY),
    "cls_doc_attention": (Segment.CLS, Segment.DOC),
    "query_cls_attention": (Segment.QUERY, Segment.CLS),
    "query_doc_attention": (Segment.QUERY, Segment.DOC),
    "doc_cls_attention": (Segment.DOC, Segment.CLS),
    "doc_query_attention": (Segment.DOC, Segment.QUERY),
}
"""The six switchable directions as (from, to) segments, in the order of the config's ``DIRECTION_FLAGS``."""


@dataclass(frozen=True)
class AttentionPattern:
    """Which segment attends to which, and with what window.

    Attributes:
        allowed: ``allowed[s][t]``: tokens of segment ``s`` attend to tokens of segment ``t``.
        window: ``window[s][t]``: one-sided window in positions for that direction, ``None`` = unlimited.
    """

    allowed: tuple[tuple[bool, ...], ...]
    window: tuple[tuple[int | None, ...], ...]

    @classmethod
    def from_config(cls, config) -> "AttentionPattern":
        """The paper's pattern from a config's six flags and ``attention_window_size`` (documents only)."""
        n = len(SEGMENTS)
        allowed = [[s == t for t in range(n)] for s in range(n)]
        for flag, (src, dst) in FLAG_DIRECTIONS.items():
            allowed[src][dst] = bool(getattr(config, flag))
        window = [[None] * n for _ in range(n)]
        window[Segment.DOC][Segment.DOC] = config.attention_window_size
        return cls(tuple(map(tuple, allowed)), tuple(map(tuple, window)))

    def allows(self, src: Segment, dst: Segment) -> bool:
        """Whether ``src`` tokens attend to ``dst`` tokens."""
        return self.allowed[src][dst]

    def document_window(self, backend: str) -> int | None:
        """The document->document window; raises for windows elsewhere, which ``backend`` cannot express."""
        for src in SEGMENTS:
            for dst in SEGMENTS:
                if self.window[src][dst] is not None and (src, dst) != (Segment.DOC, Segment.DOC):
                    raise ValueError(f"{backend}: a window on {src.name}->{dst.name} is not supported (documents only)")
        return self.window[Segment.DOC][Segment.DOC]

    @property
    def query_is_independent(self) -> bool:
        """The query sees only itself, so its hidden states do not depend on the document."""
        return not self.allows(Segment.QUERY, Segment.CLS) and not self.allows(Segment.QUERY, Segment.DOC)

    @property
    def is_full(self) -> bool:
        """Every direction on and no window: plain BERT attention."""
        return all(all(row) for row in self.allowed) and all(w is None for row in self.window for w in row)

    def dense_mask(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[batch, seq, seq]`` (True = attend) for padded rows of segment ids.

        Padding (``Segment.PAD``) attends to nothing and is attended by nothing; padding rows get their own
        diagonal so that a softmax over them stays finite (their outputs are discarded).

        Args:
            segment_ids: ``[batch, seq]`` integer ids from :class:`Segment`.
        """
        n = len(SEGMENTS)
        device = segment_ids.device
        allowed = torch.tensor(self.allowed, dtype=torch.bool, device=device)
        valid = segment_ids >= 0
        seg = segment_ids.clamp(min=0)
        # mask: [batch, seq_q, seq_k]
        mask = allowed[seg[:, :, None], seg[:, None, :]] & valid[:, :, None] & valid[:, None, :]
        positions = torch.arange(segment_ids.shape[1], device=device)
        distance = (positions[:, None] - positions[None, :]).abs()
        for s in range(n):
            for t in range(n):
                w = self.window[s][t]
                if w is None or not self.allowed[s][t]:
                    continue
                pair = (seg[:, :, None] == s) & (seg[:, None, :] == t)
                mask &= ~pair | (distance <= w)
        eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=device)
        return mask | (eye & ~valid[:, :, None])
