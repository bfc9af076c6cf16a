"""The 25 directions between the five segments, the paper's groups of them, and layer ranges.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Section 3 / Table 1: a direction a→b means
"tokens of a attend to tokens of b"; removing it takes b's keys out of a's softmax (the row renormalises over what is
left). Names are spelled out everywhere ("query attends to document") because "Q→D" is read both ways in the
literature.
"""

from __future__ import annotations

from dataclasses import dataclass

from configuration_sparse_ce import SEGMENT_NAMES, ablate_pattern

LABELS = {"cls": "[CLS]", "query": "query", "sep1": "[SEP]1", "doc": "document", "sep2": "[SEP]2"}
"""Readable names of the segments."""

PAPER_LABELS = {"cls": "CLS", "query": "Q", "sep1": "SEP1", "doc": "D", "sep2": "SEP2"}
"""The paper's short names (its tables write a direction as row → column: attending → attended)."""

QUERY_SIDE, DOC_SIDE = ("query", "sep1"), ("doc", "sep2")

GROUPS: dict[str, list[tuple[str, str]]] = {
    "query side attends to document side": [(a, b) for a in QUERY_SIDE for b in DOC_SIDE],
    "document side attends to query side": [(a, b) for a in DOC_SIDE for b in QUERY_SIDE],
    "every cross-segment direction": [(a, b) for a in SEGMENT_NAMES for b in SEGMENT_NAMES if a != b],
    "every direction into a [SEP]": [(a, b) for a in SEGMENT_NAMES for b in ("sep1", "sep2")],
}
"""The paper's groups of directions as (attending, attended) pairs; the query side is query + [SEP]1, the document
side document + [SEP]2."""

LAYER_RANGES = ("all", "lower", "upper")


def describe(src: str, dst: str) -> str:
    """``"query attends to document"``."""
    return f"{LABELS[src]} attends to {LABELS[dst]}"


def layers_of(name: str, num_layers: int) -> list[int]:
    """Layer indices of a range: ``all``, ``lower`` (first half) or ``upper`` (second half)."""
    half = num_layers // 2
    return {"all": list(range(num_layers)), "lower": list(range(half)), "upper": list(range(half, num_layers))}[name]


ABLATION_MODES = ("renormalise", "zero")
"""How a direction is removed: out of the softmax (the row renormalises), or its weights zeroed after it (the paper)."""


@dataclass(frozen=True)
class Ablation:
    """Directions switched off in a layer range.

    Attributes:
        name: A direction's description or a group's name.
        pairs: (attending, attended) segment pairs.
        layers: ``all``, ``lower`` or ``upper``.
        group: The group's name, ``None`` for one direction.
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    layers: str
    group: str | None = None

    def apply(self, matrices: list[list[list[int]]], mode: str = "renormalise") -> dict:
        """The ``attention_pattern`` of ``matrices`` (one 5x5 per layer) with :attr:`pairs` removed in :attr:`layers`.

        ``renormalise``: the cells are switched off, so the attended keys leave the softmax and the row renormalises
        over the rest. ``zero`` (the paper's ablation): the softmax stays over ``matrices`` and the removed cells'
        weights are set to 0 afterwards (``zeroed``; a [CLS]/[SEP] sink's mass is then lost, not moved).
        """
        if mode not in ABLATION_MODES:
            raise ValueError(f"mode: expected one of {ABLATION_MODES}, got {mode!r}")
        pattern = {"segments": list(SEGMENT_NAMES), "layers": matrices}
        for a, b in self.pairs:  # pairs, not a product of sources and targets: one ablate_pattern call each
            pattern = ablate_pattern(pattern, a, b, layers_of(self.layers, len(matrices)))
        if mode == "renormalise":
            return pattern
        zeroed = [[[int(base and not kept) for base, kept in zip(b_row, k_row)] for b_row, k_row in zip(b, k)]
                  for b, k in zip(matrices, pattern["layers"])]
        return {"segments": list(SEGMENT_NAMES), "layers": matrices, "zeroed": zeroed}

    def record(self) -> dict:
        """``from`` / ``to`` (names, or parallel lists for a group), ``layers`` and ``group`` of a result record."""
        if self.group is None:
            (a, b), = self.pairs
            return {"from": a, "to": b, "direction": describe(a, b), "layers": self.layers}
        return {"from": [a for a, _ in self.pairs], "to": [b for _, b in self.pairs], "group": self.group,
                "layers": self.layers}


def all_ablations() -> list[Ablation]:
    """The 25 directions and the groups, each in all, the lower and the upper layers."""
    out = []
    for layers in LAYER_RANGES:
        out += [Ablation(describe(a, b), ((a, b),), layers) for a in SEGMENT_NAMES for b in SEGMENT_NAMES]
        out += [Ablation(name, tuple(pairs), layers, group=name) for name, pairs in GROUPS.items()]
    return out
