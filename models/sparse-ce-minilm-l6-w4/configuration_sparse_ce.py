"""Configuration of the sparse cross-encoder.

Schlatt, Fröbe, Hagen: "Investigating the Effects of Sparse Attention on Cross-Encoders", ECIR 2024.
A BERT configuration plus the attention pattern of Section 3.4: a one-sided window ``w`` for document tokens and
six direction flags between the [CLS], query and document segments (names as in the original code).

This file is the single source of the configuration class: the installed package imports it as the top-level
module ``configuration_sparse_ce`` and Hub folders carry a copy beside the modeling files.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import BertConfig

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

ATTENTION_BACKENDS = ("auto", "dense", "windowed", "kernel")

SCORE_HEADS = ("cls", "cosine", "cls-cosine")
"""How a row becomes one logit: BERT's pooler + linear classifier on [CLS], or a scaled cosine of the mean query
state and the mean document state or the [CLS] state (see :class:`SparseCrossEncoderConfig`)."""

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A pinned kernel revision: a full commit sha (branches, tags and versions can be moved to other code)."""


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
        attention_backend: ``"auto"``, ``"dense"`` (masked SDPA oracle), ``"windowed"`` (memory-linear PyTorch) or
            ``"kernel"`` (the fused op). ``auto`` prefers the kernel when one loads for the device: a local build
            (``SPARSE_CE_KERNEL=DIR``), a pinned Hub kernel, or on CPU the op sparse-ce builds on first use.
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
        cls_query_attention: bool = True,
        cls_doc_attention: bool = True,
        query_cls_attention: bool = True,
        query_doc_attention: bool = True,
        doc_cls_attention: bool = True,
        doc_query_attention: bool = True,
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
        self.cls_query_attention = cls_query_attention
        self.cls_doc_attention = cls_doc_attention
        self.query_cls_attention = query_cls_attention
        self.query_doc_attention = query_doc_attention
        self.doc_cls_attention = doc_cls_attention
        self.doc_query_attention = doc_query_attention
        self.attention_backend = attention_backend
        self.share_query = share_query
        self.sep_token_id = sep_token_id
        self.cls_token_id = cls_token_id
        self.kernel_repo_id = kernel_repo_id
        self.kernel_revision = kernel_revision
        self.kernel_version = kernel_version
        self.score_head = score_head
        self.cosine_scale = cosine_scale
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

    @property
    def pattern_flags(self) -> dict[str, bool]:
        """The six direction flags by name."""
        return {flag: getattr(self, flag) for flag in DIRECTION_FLAGS}

    @property
    def preset_name(self) -> str | None:
        """The preset whose flags this config has (windows may differ), else ``None``."""
        for name, fields in PRESETS.items():
            if all(fields[flag] == getattr(self, flag) for flag in DIRECTION_FLAGS):
                if name == "full" and self.attention_window_size is not None:
                    continue
                return name
        return None
