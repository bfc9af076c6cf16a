"""The 25 directions between the five segments, the paper's groups of them, and layer ranges.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Section 3 / Table 1. A direction is a pair
(a, b) and always reads "tokens of a attend to tokens of b" (a's rows of the attention matrix, b's keys); removing it
takes b's keys out of a's softmax (``renormalise``) or zeroes those weights after it (``zero``). No arrows: the
paper's arrows are information flow ("X→Y": Y attends to X, so its "D→Q" is our "query attends to document"), the
opposite of the row → column reading of an attention matrix; docs/analysis.md states the mapping once."""

from __future__ import annotations

from dataclasses import dataclass

from configuration_sparse_ce import SEGMENT_NAMES, ablate_pattern

LABELS = {"cls": "[CLS]", "query": "query", "sep1": "[SEP]1", "doc": "document", "sep2": "[SEP]2"}
"""Readable names of the segments."""

QUERY_SIDE, DOC_SIDE = ("query", "sep1"), ("doc", "sep2")
QUERY_TO_DOC = [(a, b) for a in QUERY_SIDE for b in DOC_SIDE]
DOC_TO_QUERY = [(a, b) for a in DOC_SIDE for b in QUERY_SIDE]
CONTENT_SIDES = QUERY_SIDE + DOC_SIDE  # every segment but [CLS]

GROUPS: dict[str, list[tuple[str, str]]] = {
    "query side attends to document side": QUERY_TO_DOC,
    "document side attends to query side": DOC_TO_QUERY,
    "every cross-segment direction": [(a, b) for a in SEGMENT_NAMES for b in SEGMENT_NAMES if a != b],
    "every direction into a [SEP]": [(a, b) for a in SEGMENT_NAMES for b in ("sep1", "sep2")],
    "query side and document side attend to each other": QUERY_TO_DOC + DOC_TO_QUERY,
    "query/document cut with the [CLS] bridge closed": QUERY_TO_DOC + DOC_TO_QUERY + [("cls", b) for b in CONTENT_SIDES],
    "query/document cut, [CLS] reads both but is read by neither": QUERY_TO_DOC + DOC_TO_QUERY + [
        (a, "cls") for a in CONTENT_SIDES],
}
"""Groups of directions as (attending, attended) pairs; the query side is query + [SEP]1, the document side
document + [SEP]2. The first four are the paper's. "Attend to each other" removes both one-way groups at once; the
sides still meet through [CLS], a bridge: [CLS] sees the query and the document sees [CLS] (and the other way round),
so query information reaches the document one layer later. The "[CLS] bridge closed" cut also removes "[CLS] attends
to" query, [SEP]1, document and [SEP]2 ([CLS] attends to itself only): no route query -> [CLS] -> document or back is
left, while every segment may still attend to [CLS] and to its own side's [SEP] as sinks. Cut in every layer, the
``cosine`` score head (mean query vs mean document state) compares a query and a document encoded apart, as a
bi-encoder would; a head that reads [CLS] (``cls``, ``cls-cosine``) gets the same [CLS] state for every pair, so all
candidates of a query score the same. The third cut closes the bridge the other way: [CLS] still reads both sides,
but no content token reads [CLS], so the sides stay apart and only a head that reads [CLS] can compare them there."""

LAYER_RANGES = ("all", "lower", "upper")

ABLATION_SETS = ("directions", "groups", "directions-all")
"""What ``analyze ablate --sets`` can run: the 25 directions in all / lower / upper layers, the groups in all three,
or the 25 directions in all layers only."""


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


def all_ablations(sets: tuple[str, ...] | list[str] = ("directions", "groups")) -> list[Ablation]:
    """The ablations of ``sets`` (see :data:`ABLATION_SETS`; default the 25 directions and the groups, each in all,
    the lower and the upper layers), layer range by layer range, each once."""
    unknown = [name for name in sets if name not in ABLATION_SETS]
    if unknown:
        raise ValueError(f"sets: expected some of {ABLATION_SETS}, got {unknown}")
    out = []
    for layers in LAYER_RANGES:
        if "directions" in sets or ("directions-all" in sets and layers == "all"):
            out += [Ablation(describe(a, b), ((a, b),), layers) for a in SEGMENT_NAMES for b in SEGMENT_NAMES]
        if "groups" in sets:
            out += [Ablation(name, tuple(pairs), layers, group=name) for name, pairs in GROUPS.items()]
    return out
