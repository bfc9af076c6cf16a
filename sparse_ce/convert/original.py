"""Checkpoints saved by the original code of Schlatt et al., ECIR 2024 (webis-de/ecir24-sparse-cross-encoder): how
``sparse-ce convert`` recognises them and reads their pattern, and how log lines describe a pattern."""

from __future__ import annotations

from configuration_sparse_ce import DIRECTION_FLAGS


def is_original_checkpoint(source: dict) -> bool:
    """Whether a ``config.json`` was saved by the authors' code (webis-de/ecir24-sparse-cross-encoder).

    Its ``SparseCrossEncoderModelForSequenceClassification`` writes ``model_type: "bert"`` plus
    ``attention_window_size`` and the six direction flags (the names this package uses); its parameters have BERT's
    names (``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``bert.pooler.dense``, ``classifier``) and its
    ``bert.embeddings.position_ids`` buffer is saved too (dropped on load), so the weights load unchanged.
    """
    return source.get("model_type") == "bert" and any(key in source for key in ("attention_window_size", *DIRECTION_FLAGS))


def original_window(source: dict) -> int | None:
    """The document window the original code applies for a source's ``attention_window_size``.

    The original tests ``if not any(attention_window_sizes)``, so ``0`` counts as no window there (the document attends
    to the whole document, as ``None``); in sparse-ce ``0`` means a token sees only itself.
    """
    window = source.get("attention_window_size")
    return None if window == 0 else window


def describe(window, flags: dict, attention_pattern=None) -> str:
    """``window=4, off: query_cls_attention, query_doc_attention`` (for log lines)."""
    text = f"window={'none' if window is None else window}"
    if attention_pattern is not None:
        return f"{text}, an explicit per-layer pattern"
    off = [flag for flag, on in flags.items() if on is False]
    return f"{text}, {'off: ' + ', '.join(off) if off else 'all directions on'}"


def describe_source(source: dict) -> str:
    """The pattern a source config was trained with, as :func:`_describe` words it."""
    original = is_original_checkpoint(source)
    window = original_window(source) if original else source.get("attention_window_size")
    flags = {flag: source.get(flag) is not False for flag in DIRECTION_FLAGS}  # absent or null: on
    text = describe(window, flags, source.get("attention_pattern"))
    if original and source.get("attention_window_size") == 0:
        text += "; its attention_window_size=0 means no window in the original code"
    return text
