"""Attention pattern of one layer: which of the five segments attends to which, and the document window.

Schlatt et al., ECIR 2024, Section 3.4 (Eqs. 1-3) switch six directions between [CLS], query and document and window
the document; "Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604) splits a row into five
segments and ablates any of their 25 directions. A pattern here is a 5x5 table over [CLS] / query / [SEP]1 / document
/ [SEP]2 plus the window ``w``, which limits every pair of tokens that both lie in {document, [SEP]2} to positions at
most ``w`` apart. The six-flag patterns are the *flag family*: [SEP]1 behaves as a query token, [SEP]2 as a document
token, attention inside [CLS], query and document is on. The fast backends handle that family; the dense one any
table. This module owns patterns and the dense boolean mask built from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

try:  # Hub folder: the config module is a flat sibling
    from .configuration_sparse_ce import DIRECTION_FLAGS, SEGMENT_NAMES, WINDOWED_SEGMENTS, flag_direction, flags_matrix
except ImportError:  # installed package: one top-level module
    from configuration_sparse_ce import DIRECTION_FLAGS, SEGMENT_NAMES, WINDOWED_SEGMENTS, flag_direction, flags_matrix

from .segments import SEGMENTS, Segment

assert [s.name.lower() for s in SEGMENTS] == list(SEGMENT_NAMES), "Segment and SEGMENT_NAMES disagree"

FLAG_REPRESENTATIVE = {"cls": Segment.CLS, "query": Segment.QUERY, "doc": Segment.DOC}
"""The segment that stands for each of the six flags' three segments ([SEP]s follow their segment in the family)."""

LONG_ROW_WINDOW = 32
"""A document window from which document rows count as long (see :attr:`AttentionPattern.has_long_rows`)."""


@dataclass(frozen=True)
class AttentionPattern:
    """One layer's pattern.

    Attributes:
        allowed: ``allowed[a][b]``: tokens of segment ``a`` attend to tokens of segment ``b`` (order :data:`SEGMENTS`).
        window: One-sided window over {document, [SEP]2} positions, ``None`` = unlimited.
        zeroed: ``zeroed[a][b]``: the weights of ``a`` on ``b`` are set to 0 after the softmax over ``allowed`` (no
            renormalisation: an ablation's "zero" mode); ``None``: nothing zeroed. Only the dense backend runs it.
    """

    allowed: tuple[tuple[bool, ...], ...]
    window: int | None
    zeroed: tuple[tuple[bool, ...], ...] | None = None

    @classmethod
    def from_matrix(cls, matrix, window: int | None, zeroed=None) -> "AttentionPattern":
        """From a 5x5 0/1 matrix (rows attend, columns are attended), the window and an optional zeroed matrix."""
        cells = lambda m: tuple(tuple(bool(cell) for cell in row) for row in m)  # noqa: E731
        zeroed = cells(zeroed) if zeroed is not None and any(any(row) for row in zeroed) else None
        return cls(cells(matrix), window, zeroed)

    @classmethod
    def from_flags(cls, flags: dict[str, bool], window: int | None) -> "AttentionPattern":
        """The paper's pattern from the six flags and the document window."""
        return cls.from_matrix(flags_matrix(flags), window)

    @classmethod
    def for_layers(cls, config) -> list["AttentionPattern"]:
        """Every layer's pattern of a :class:`SparseCrossEncoderConfig` (explicit ``attention_pattern`` or flags)."""
        zeroed = config.layer_zeroed() if hasattr(config, "layer_zeroed") else [None] * config.num_hidden_layers
        return [cls.from_matrix(matrix, config.attention_window_size, z) for matrix, z in zip(config.layer_matrices(), zeroed)]

    def allows(self, src: Segment, dst: Segment) -> bool:
        """Whether ``src`` tokens attend to ``dst`` tokens."""
        return self.allowed[src][dst]

    @property
    def matrix(self) -> list[list[int]]:
        return [[int(cell) for cell in row] for row in self.allowed]

    @property
    def has_zeroed(self) -> bool:
        """Whether some weights are zeroed after the softmax (only the dense backend does that)."""
        return self.zeroed is not None

    @cached_property
    def six_flags(self) -> dict[str, bool] | None:
        """The six flags when this pattern is in the flag family, else ``None`` (computed once per pattern)."""
        if self.has_zeroed:
            return None
        flags = {}
        for flag in DIRECTION_FLAGS:
            src, dst = flag_direction(flag)
            flags[flag] = self.allows(FLAG_REPRESENTATIVE[src], FLAG_REPRESENTATIVE[dst])
        return flags if flags_matrix(flags) == self.matrix else None

    @property
    def in_flag_family(self) -> bool:
        """Whether the windowed backend and the kernel can run this pattern."""
        return self.six_flags is not None

    def require_flag_family(self, where: str) -> dict[str, bool]:
        """The six flags, or a ValueError starting with ``where`` for a pattern only the dense backend runs."""
        if self.six_flags is None:
            raise ValueError(
                f"{where}the pattern {self.matrix} is not one of the six-flag family ([SEP]1 as query, [SEP]2 as "
                "document); use attention_backend='dense' or 'auto'"
            )
        return self.six_flags

    @property
    def query_is_independent(self) -> bool:
        """Query and [SEP]1 rows see only query and [SEP]1 tokens, so their states do not depend on the document."""
        inside = (Segment.QUERY, Segment.SEP1)
        return not any(self.allows(src, dst) for src in inside for dst in SEGMENTS if dst not in inside)

    @property
    def is_full(self) -> bool:
        """Every direction on and no window: plain BERT attention."""
        return all(all(row) for row in self.allowed) and self.window is None and not self.has_zeroed

    @property
    def has_long_rows(self) -> bool:
        """Some rows scan a whole document: [CLS] or query rows that see it, or a window unlimited or >= 32."""
        return (
            self.allows(Segment.CLS, Segment.DOC)
            or self.allows(Segment.QUERY, Segment.DOC)
            or self.window is None
            or self.window >= LONG_ROW_WINDOW
        )

    def zeroed_mask(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, seq]``: True where a weight is zeroed after the softmax (:attr:`zeroed`; padding never)."""
        zeroed = torch.tensor(self.zeroed or [[False] * len(SEGMENTS)] * len(SEGMENTS), dtype=torch.bool,
                              device=segment_ids.device)
        valid = segment_ids >= 0
        seg = segment_ids.clamp(min=0)
        return zeroed[seg[:, :, None], seg[:, None, :]] & valid[:, :, None] & valid[:, None, :]

    def dense_mask(self, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean mask ``[batch, seq, seq]`` (True = attend) for padded rows of segment ids, and the empty rows.

        Padding (``Segment.PAD``) attends to nothing and is attended by nothing. A row that may see no key (padding,
        or a real token whose segment's row of the table is all off) gets its own diagonal so that a softmax over it
        stays finite; the second result ``[batch, seq]`` marks those rows, whose output must be zero.

        Args:
            segment_ids: ``[batch, seq]`` integer ids from :class:`Segment`.
        """
        device = segment_ids.device
        allowed = torch.tensor(self.allowed, dtype=torch.bool, device=device)
        valid = segment_ids >= 0
        seg = segment_ids.clamp(min=0)
        # mask: [batch, seq_q, seq_k]
        mask = allowed[seg[:, :, None], seg[:, None, :]] & valid[:, :, None] & valid[:, None, :]
        if self.window is not None:
            windowed = torch.zeros_like(valid)
            for name in WINDOWED_SEGMENTS:
                windowed |= segment_ids == SEGMENT_NAMES.index(name)
            positions = torch.arange(segment_ids.shape[1], device=device)
            near = (positions[:, None] - positions[None, :]).abs() <= self.window
            mask &= ~(windowed[:, :, None] & windowed[:, None, :]) | near
        empty = ~mask.any(-1)
        eye = torch.eye(segment_ids.shape[1], dtype=torch.bool, device=device)
        return mask | (eye & empty[:, :, None]), empty
