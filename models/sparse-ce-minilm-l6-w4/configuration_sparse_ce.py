"""Configuration of the sparse cross-encoder.

Schlatt, Fröbe, Hagen: "Investigating the Effects of Sparse Attention on Cross-Encoders", ECIR 2024.
A BERT configuration plus the attention pattern of Section 3.4: a one-sided window ``w`` for document tokens and
six direction flags between the [CLS], query and document segments (names as in the original code), or an explicit
per-layer pattern over the five segments [CLS] / query / [SEP]1 / document / [SEP]2 of "Understanding Matching
Mechanisms in Cross-Encoders" (arXiv 2507.14604), with the helpers that build such patterns.

This file is the single source of the configuration class: the installed package imports it as the top-level
module ``configuration_sparse_ce`` and Hub folders carry a copy beside the modeling files.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import BertConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

DIRECTION_FLAGS = (
    "cls_query_attention",
    "cls_doc_attention",
    "query_cls_attention",
    "query_doc_attention",
    "doc_cls_attention",
    "doc_query_attention",
)
"""The paper's six switchable directions, ``<from>_<to>_attention``; attention inside a segment is always on."""

PRESETS: dict[str, dict[str, Any]] = {
    # plain BERT: every token sees every token
    "full": {"attention_window_size": None, **{flag: True for flag in DIRECTION_FLAGS}},
    # Longformer-style cross-encoder: query and [CLS] global, documents windowed
    "longformer": {"attention_window_size": 64, **{flag: True for flag in DIRECTION_FLAGS}},
    # the paper's sparse cross-encoder: the query sees only the query, documents windowed (Fig. 1 d)
    "sparse": {
        "attention_window_size": 4,
        **{flag: True for flag in DIRECTION_FLAGS},
        "query_cls_attention": False,
        "query_doc_attention": False,
    },
}
"""Named attention patterns; ``attention_window_size`` is the default window of each preset."""

SEGMENT_NAMES = ("cls", "query", "sep1", "doc", "sep2")
"""The five segments of a row ``[CLS] query [SEP]1 document [SEP]2``, in the order of ``attention_pattern`` matrices."""

FLAG_SEGMENTS = {"cls": ("cls",), "query": ("query", "sep1"), "doc": ("doc", "sep2")}
"""What the six flags' three segments cover: [SEP]1 behaves as a query token, [SEP]2 as a document token."""

WINDOWED_SEGMENTS = ("doc", "sep2")
"""The window ``w`` limits every pair of tokens that both lie in these segments (positions at most ``w`` apart)."""

ATTENTION_BACKENDS = ("auto", "dense", "windowed", "kernel", "flex", "flex-eager")

SCORE_HEADS = ("cls", "cosine", "cls-cosine")
"""How a row becomes one logit: BERT's pooler + linear classifier on [CLS], or a scaled cosine of the mean query
state and the mean document state or the [CLS] state (see :class:`SparseCrossEncoderConfig`)."""

SCORE_ACTIVATION = "torch.nn.modules.linear.Identity"
"""What sentence-transformers' ``CrossEncoder`` applies to the logit by default (``config.sentence_transformers``):
the identity, so ``predict`` and ``rank`` order documents exactly as the logits do. Its own default, a sigmoid,
saturates on ranking-trained heads (logits of 8-16 made DL19's top 10 tie at 0.999999881 in float32)."""

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A pinned kernel revision: a full commit sha (branches, tags and versions can be moved to other code)."""

Matrix = list[list[int]]


def flag_direction(flag: str) -> tuple[str, str]:
    """``"query_doc_attention"`` -> ``("query", "doc")``: the flag's (attending, attended) segments of the six."""
    src, dst, _ = flag.split("_")
    return src, dst


def flags_matrix(flags: dict[str, bool]) -> Matrix:
    """The 5x5 matrix of the six flags: attention inside [CLS], query+[SEP]1 and document+[SEP]2 always on.

    ``M[a][b] = 1``: tokens of segment ``a`` attend to tokens of segment ``b`` (order :data:`SEGMENT_NAMES`).
    """
    group = {seg: name for name, members in FLAG_SEGMENTS.items() for seg in members}
    on = {(name, name) for name in FLAG_SEGMENTS}
    on |= {flag_direction(flag) for flag in DIRECTION_FLAGS if flags[flag]}
    return [[int((group[a], group[b]) in on) for b in SEGMENT_NAMES] for a in SEGMENT_NAMES]


def pattern_from_flags(num_layers: int, **flags: bool) -> dict[str, Any]:
    """An ``attention_pattern`` with the six flags' matrix in every layer (a flag left out is on)."""
    unknown = set(flags) - set(DIRECTION_FLAGS)
    if unknown:
        raise ValueError(f"flags: unknown {sorted(unknown)}; expected some of {DIRECTION_FLAGS}")
    matrix = flags_matrix({flag: flags.get(flag, True) for flag in DIRECTION_FLAGS})
    return {"segments": list(SEGMENT_NAMES), "layers": [[row[:] for row in matrix] for _ in range(num_layers)]}


def named_pattern(name: str, num_layers: int) -> dict[str, Any]:
    """An ``attention_pattern`` from a preset's flags (``full``, ``longformer``, ``sparse``); windows stay separate."""
    if name not in PRESETS:
        raise ValueError(f"pattern: unknown name {name!r}; choose one of {sorted(PRESETS)}")
    return pattern_from_flags(num_layers, **{flag: PRESETS[name][flag] for flag in DIRECTION_FLAGS})


def ablate_pattern(
    pattern: dict[str, Any], src: str | list[str], dst: str | list[str], layers: list[int] | range | None = None
) -> dict[str, Any]:
    """A copy of ``pattern`` with direction(s) ``src`` -> ``dst`` switched off in ``layers`` (default: all).

    ``src`` / ``dst``: segment names of :data:`SEGMENT_NAMES` or lists of them (every pair is switched off).
    """
    sources, targets = ([x] if isinstance(x, str) else list(x) for x in (src, dst))
    for name in (*sources, *targets):
        if name not in SEGMENT_NAMES:
            raise ValueError(f"segment: unknown {name!r}; expected one of {SEGMENT_NAMES}")
    matrices = [[row[:] for row in matrix] for matrix in pattern["layers"]]
    chosen = range(len(matrices)) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < len(matrices):
            raise ValueError(f"layers: {layer} is outside 0..{len(matrices) - 1}")
        for a in sources:
            for b in targets:
                matrices[layer][SEGMENT_NAMES.index(a)][SEGMENT_NAMES.index(b)] = 0
    return {"segments": list(SEGMENT_NAMES), "layers": matrices}


def check_attention_pattern(pattern: Any, num_layers: int) -> dict[str, Any]:
    """The validated ``attention_pattern`` with 0/1 ints; a ValueError names the layer and cell of the first problem.

    An optional ``zeroed`` (one 5x5 0/1 matrix per layer, an ablation's "zero" mode): ``Zi[a][b] = 1`` multiplies the
    attention weights of segment ``a`` on segment ``b`` by 0 *after* the softmax over ``layers`` (no renormalisation,
    the paper's ablation); only the dense backend runs such a pattern.
    """
    if not isinstance(pattern, dict) or not {"segments", "layers"} <= set(pattern) <= {"segments", "layers", "zeroed"}:
        raise ValueError(f"attention_pattern: expected {{'segments': [...], 'layers': [...]}}, got {pattern!r}")
    if list(pattern["segments"]) != list(SEGMENT_NAMES):
        raise ValueError(f"attention_pattern: segments must be {list(SEGMENT_NAMES)}, got {pattern['segments']!r}")
    checked = {"segments": list(SEGMENT_NAMES), "layers": _check_matrices(pattern["layers"], num_layers, "layer")}
    if pattern.get("zeroed") is not None:
        checked["zeroed"] = _check_matrices(pattern["zeroed"], num_layers, "zeroed layer")
    return checked


def _check_matrices(layers: Any, num_layers: int, what: str) -> Matrix:
    if not isinstance(layers, (list, tuple)) or len(layers) != num_layers:
        found = len(layers) if isinstance(layers, (list, tuple)) else repr(layers)
        raise ValueError(f"attention_pattern: expected one 5x5 matrix per layer ({num_layers} layers), got {found}")
    checked = []
    for i, matrix in enumerate(layers):
        if not isinstance(matrix, (list, tuple)) or len(matrix) != len(SEGMENT_NAMES):
            raise ValueError(f"attention_pattern: {what} {i} is not a list of {len(SEGMENT_NAMES)} rows")
        rows = []
        for a, row in enumerate(matrix):
            if not isinstance(row, (list, tuple)) or len(row) != len(SEGMENT_NAMES):
                raise ValueError(f"attention_pattern: {what} {i}, row {a} ({SEGMENT_NAMES[a]}) is not a list of 5 cells")
            for b, cell in enumerate(row):
                if cell not in (0, 1) or not isinstance(cell, (int, bool)):
                    raise ValueError(
                        f"attention_pattern: {what} {i}, cell [{a}][{b}] ({SEGMENT_NAMES[a]} attends to "
                        f"{SEGMENT_NAMES[b]}) must be 0 or 1, got {cell!r}"
                    )
            rows.append([int(cell) for cell in row])
        checked.append(rows)
    return checked


class SparseCrossEncoderConfig(BertConfig):
    """BERT configuration with the sparse cross-encoder's attention pattern.

    Args:
        attention_window_size: One-sided window ``w`` of document tokens over the document segment
            (a token sees ``2w + 1`` document tokens). ``None`` means unlimited, ``0`` only the token itself.
        cls_query_attention: [CLS] attends to the query.
        cls_doc_attention: [CLS] attends to the document.
        query_cls_attention: Query tokens attend to [CLS].
        query_doc_attention: Query tokens attend to the document.
        doc_cls_attention: Document tokens attend to [CLS].
        doc_query_attention: Document tokens attend to the query.
            Each flag: ``None`` (the default) means on. [SEP]1 counts as a query token, [SEP]2 as a document token.
        attention_pattern: ``None`` (default: the pattern of the six flags, the same in every layer), or
            ``{"segments": ["cls", "query", "sep1", "doc", "sep2"], "layers": [M0, ..., M(L-1)]}`` with one 5x5 0/1
            matrix per layer, ``Mi[a][b] = 1``: tokens of segment ``a`` attend to tokens of segment ``b`` in layer ``i``.
            Then it alone defines the pattern: the six flags are set to ``None`` (saved as null) and never read, and
            flags given alongside that contradict it log one warning. The window ``w`` still applies to every pair of
            tokens that both lie in {doc, sep2}. A token whose row allows no key gets a zero attention output. Build
            one with :func:`pattern_from_flags`, :func:`named_pattern` and :func:`ablate_pattern`.
        attention_backend: ``"auto"``, ``"dense"`` (masked SDPA oracle), ``"windowed"`` (memory-linear PyTorch),
            ``"kernel"`` (the fused op), ``"flex"`` (compiled FlexAttention, any pattern; backward on CUDA only) or
            ``"flex-eager"`` (uncompiled FlexAttention). ``auto`` picks ``flex`` on CUDA; on CPU it prefers the
            kernel when one loads: a local build (``SPARSE_CE_KERNEL=DIR``), a pinned Hub kernel, or the op
            sparse-ce builds on first use.
        share_query: Compute the query once for all rows of a batch that share it, when the pattern allows.
        sep_token_id: Id of [SEP], used to find segments when no ``token_type_ids`` are given.
        cls_token_id: Id of [CLS]; when set, the model checks that every row starts with it.
        kernel_repo_id: Hub repo (type ``kernel``) of an attention kernel built from ``kernel_src/`` (``None``, the
            default: no Hub kernel). It is downloaded only when pinned: by ``kernel_revision``, by an entry in a
            ``kernels.lock`` (``$SPARSE_CE_KERNELS_LOCK`` or beside a local model's ``config.json``), or by
            ``LOCAL_KERNELS``; an unpinned repo id logs one line and is not fetched.
        kernel_revision: The commit sha (40 hex digits) of ``kernel_repo_id`` to load.
        kernel_version: Kept for configs written before pinning; a version alone is not a pin and loads nothing.
        score_head: ``"cls"`` (default): BERT's pooler and linear classifier on [CLS], as every BERT cross-encoder.
            ``"cosine"``: ``scale * cos(mean query state, mean document state) + bias`` (query and document segments
            with their [SEP], final layer), with a learned scale and bias (``classifier.scale`` / ``classifier.bias``).
            Made for starting from a mean-pooling bi-encoder such as all-MiniLM-L6-v2, whose [CLS] was never trained:
            the score ranks like the bi-encoder's before fine-tuning instead of at random.
            ``"cls-cosine"``: the same with the final [CLS] state in place of the mean document state: [CLS] attends to
            the whole document in every layer, whatever the document window.
        cosine_scale: Initial scale of the ``cosine`` head.
        **kwargs: Any :class:`~transformers.BertConfig` field.
    """

    model_type = "sparse_ce"

    def __init__(
        self,
        attention_window_size: int | None = None,
        cls_query_attention: bool | None = None,
        cls_doc_attention: bool | None = None,
        query_cls_attention: bool | None = None,
        query_doc_attention: bool | None = None,
        doc_cls_attention: bool | None = None,
        doc_query_attention: bool | None = None,
        attention_pattern: dict[str, Any] | None = None,
        attention_backend: str = "auto",
        share_query: bool = True,
        sep_token_id: int | None = None,
        cls_token_id: int | None = None,
        kernel_repo_id: str | None = None,
        kernel_revision: str | None = None,
        kernel_version: int = 1,
        score_head: str = "cls",
        cosine_scale: float = 20.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_labels", 1)
        super().__init__(**kwargs)
        self.attention_window_size = attention_window_size
        given = dict(zip(DIRECTION_FLAGS, (cls_query_attention, cls_doc_attention, query_cls_attention,
                                           query_doc_attention, doc_cls_attention, doc_query_attention)))
        self.attention_pattern = None
        if attention_pattern is not None:
            self.attention_pattern = check_attention_pattern(attention_pattern, self.num_hidden_layers)
            _warn_contradicting_flags(self.attention_pattern, given)
        for flag, value in given.items():  # with an explicit pattern the flags are null and never read
            setattr(self, flag, None if attention_pattern is not None else (True if value is None else value))
        self.attention_backend = attention_backend
        self.share_query = share_query
        self.sep_token_id = sep_token_id
        self.cls_token_id = cls_token_id
        self.kernel_repo_id = kernel_repo_id
        self.kernel_revision = kernel_revision
        self.kernel_version = kernel_version
        self.score_head = score_head
        self.cosine_scale = cosine_scale
        settings = getattr(self, "sentence_transformers", None)  # a converted model's own setting is kept
        if not isinstance(settings, dict) or "activation_fn" not in settings:
            self.sentence_transformers = {**(settings if isinstance(settings, dict) else {}),
                                          "activation_fn": SCORE_ACTIVATION}
        self.validate_pattern()

    @classmethod
    def from_preset(cls, preset: str, window: int | None | str = "default", **kwargs: Any) -> "SparseCrossEncoderConfig":
        """Build a config from a named pattern (``full``, ``longformer`` or ``sparse``).

        Args:
            preset: Name in :data:`PRESETS`.
            window: One-sided document window; ``"default"`` keeps the preset's own.
            **kwargs: BERT fields and any pattern field to override.
        """
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown pattern {preset!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[preset])
        if window != "default":
            if preset == "full" and window is not None:
                raise ValueError("attention_window_size: the 'full' preset has no window; use 'longformer'")
            fields["attention_window_size"] = window
        fields.update(kwargs)
        return cls(**fields)

    @classmethod
    def from_legacy_dict(cls, config: dict[str, Any]) -> "SparseCrossEncoderConfig":
        """Read a config of the original published checkpoints (``model_type: "bert"`` plus the sparse keys).

        Fields this class knows are kept, ``model_type`` / ``architectures`` / ``auto_map`` are replaced, and the
        rest (legacy extras) stays on the config as plain attributes, as transformers does for unknown keys.
        """
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
        if config.get("model_type") not in ("bert", cls.model_type):
            raise ValueError(
                f"model_type: {config.get('model_type')!r} is not a BERT checkpoint; "
                "sparse-ce converts BERT encoders and BERT cross-encoders only"
            )
        if fields.get("token_type_embedding") is False:
            raise ValueError("token_type_embedding: false is not supported; BERT cross-encoders add token-type embeddings")
        return cls(**fields)

    def validate_pattern(self) -> None:
        """Raise a ValueError naming the first invalid pattern field."""
        window = self.attention_window_size
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"attention_window_size: expected None or an int >= 0, got {window!r}")
        if self.attention_pattern is not None:
            self.attention_pattern = check_attention_pattern(self.attention_pattern, self.num_hidden_layers)
        else:
            for flag in DIRECTION_FLAGS:
                if not isinstance(getattr(self, flag), bool):
                    raise ValueError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: expected one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not isinstance(self.share_query, bool):
            raise ValueError(f"share_query: expected a bool, got {self.share_query!r}")
        if self.kernel_repo_id is not None and (not isinstance(self.kernel_repo_id, str) or self.kernel_repo_id.count("/") != 1):
            raise ValueError(f"kernel_repo_id: expected None or 'org/name', got {self.kernel_repo_id!r}")
        if self.kernel_revision is not None and not (
            isinstance(self.kernel_revision, str) and COMMIT_SHA.fullmatch(self.kernel_revision)
        ):
            raise ValueError(
                f"kernel_revision: expected a 40-hex commit sha (a branch or tag is not a pin), got {self.kernel_revision!r}"
            )
        if isinstance(self.kernel_version, bool) or not isinstance(self.kernel_version, int) or self.kernel_version < 1:
            raise ValueError(f"kernel_version: expected an int >= 1, got {self.kernel_version!r}")
        if self.score_head not in SCORE_HEADS:
            raise ValueError(f"score_head: expected one of {SCORE_HEADS}, got {self.score_head!r}")
        if self.score_head != "cls" and self.num_labels != 1:
            raise ValueError(f"score_head: {self.score_head!r} gives one logit, but num_labels is {self.num_labels}")
        if isinstance(self.cosine_scale, bool) or not isinstance(self.cosine_scale, (int, float)) or self.cosine_scale <= 0:
            raise ValueError(f"cosine_scale: expected a number > 0, got {self.cosine_scale!r}")

    def layer_zeroed(self) -> list[Matrix | None]:
        """Per layer, the ``zeroed`` matrix of an explicit pattern (an ablation's "zero" mode), else ``None``."""
        zeroed = (self.attention_pattern or {}).get("zeroed")
        return [None] * self.num_hidden_layers if zeroed is None else [[row[:] for row in m] for m in zeroed]

    def layer_matrices(self) -> list[Matrix]:
        """The 5x5 pattern matrix of every layer: the explicit ``attention_pattern`` or the six flags' matrix."""
        if self.attention_pattern is not None:
            return [[row[:] for row in matrix] for matrix in self.attention_pattern["layers"]]
        return [flags_matrix(self.pattern_flags) for _ in range(self.num_hidden_layers)]

    @property
    def pattern_flags(self) -> dict[str, bool]:
        """The six direction flags by name (all ``None`` when ``attention_pattern`` is set)."""
        return {flag: getattr(self, flag) for flag in DIRECTION_FLAGS}

    @property
    def preset_name(self) -> str | None:
        """The preset whose flags this config has (windows may differ), else ``None`` (also for explicit patterns)."""
        if self.attention_pattern is not None:
            return None
        for name, fields in PRESETS.items():
            if all(fields[flag] == getattr(self, flag) for flag in DIRECTION_FLAGS):
                if name == "full" and self.attention_window_size is not None:
                    continue
                return name
        return None


def _warn_contradicting_flags(pattern: dict[str, Any], flags: dict[str, bool | None]) -> None:
    """One warning when flags given next to an explicit pattern disagree with it in some layer."""
    index = {name: SEGMENT_NAMES.index(name) for name in SEGMENT_NAMES}
    wrong = []
    for flag, value in flags.items():
        if value is None:
            continue
        src, dst = flag_direction(flag)
        cells = [m[index[a]][index[b]] for m in pattern["layers"] for a in FLAG_SEGMENTS[src] for b in FLAG_SEGMENTS[dst]]
        if any(cell != int(bool(value)) for cell in cells):
            wrong.append(flag)
    if wrong:
        logger.warning(
            "attention_pattern is given, so the flags %s are ignored (they contradict it in some layer)", ", ".join(wrong)
        )
