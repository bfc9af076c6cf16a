"""``sparse-ce convert``: turn a BERT checkpoint into a self-contained sparse cross-encoder Hub folder.

Schlatt, Fröbe, Hagen: "Investigating the Effects of Sparse Attention on Cross-Encoders", ECIR 2024, start from a
trained BERT cross-encoder (cross-encoder/ms-marco-MiniLM-L-6-v2) and only change its attention pattern; their
document models also stretch the position table by interpolation. This module does both offline, as one explicit
step: it reads a BERT cross-encoder, a plain BERT encoder, a sparse-ce folder or an original published sparse
checkpoint, applies the chosen pattern, checks that every weight loaded, and writes config, weights, tokenizer,
remote code and a model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from importlib import resources
from pathlib import Path
from string import Template

from configuration_sparse_ce import DIRECTION_FLAGS, PRESETS, SCORE_HEADS, SEGMENT_NAMES, SparseCrossEncoderConfig
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from ..cli import UsageError
from ..precompute.convert import add_mixencoder_arguments
from ..errors import check_output
from ..sources import HUB_FILES, load_tokenizer, resolve_source  # noqa: F401 (HUB_FILES: kept importable here)
from .original import describe, describe_source, is_original_checkpoint, original_window
from .positions import extend_position_embeddings

logger = logging.getLogger(__name__)

IGNORED_UNEXPECTED = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$|^cls\.")
"""Checkpoint keys that may be dropped: BERT's index buffers and its pre-training heads (``cls.predictions`` ...)."""

ENCODER_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
"""Architectures besides ``*Model`` and ``*ForSequenceClassification`` whose encoder is reused (heads dropped)."""


def parse_window(text: str) -> int | None | str:
    """Parse ``--window``: an int >= 0, ``none`` (unlimited) or ``default`` (the pattern's own)."""
    if text.lower() in ("none", "default"):
        return None if text.lower() == "none" else "default"
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an int >= 0, 'none' or 'default', got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` arguments to ``parser``."""
    parser.add_argument("src", help="local folder or Hub id of a BERT (cross-)encoder or sparse cross-encoder")
    parser.add_argument("dst", type=Path, help="output folder (Hub layout)")
    parser.add_argument(
        "--pattern", choices=sorted(PRESETS), default=None,
        help="attention pattern; default: the source's own if it has one, else 'sparse'",
    )
    parser.add_argument(
        "--pattern-json", type=Path, default=None, metavar="FILE",
        help="an explicit per-layer five-segment pattern, {\"segments\": [\"cls\", \"query\", \"sep1\", \"doc\", "
        "\"sep2\"], \"layers\": [5x5 0/1 matrix per layer]}, written as the config's attention_pattern",
    )
    parser.add_argument(
        "--window", type=parse_window, default="default",
        help="one-sided document window: an int >= 0, 'none' (unlimited) or 'default' (the pattern's)",
    )
    parser.add_argument(
        "--score-head", choices=sorted(SCORE_HEADS), default=None,
        help="'cls' (BERT pooler + classifier), 'cosine' (scaled cosine of the mean query and document states, for "
        "bi-encoder sources) or 'cls-cosine' (the mean query state against [CLS]); default: the source's own, else 'cls'",
    )
    parser.add_argument("--max-positions", type=int, help="extend the position table to N rows by linear interpolation")
    parser.add_argument("--trained-positions", type=int, help="interpolate over the first K rows only")
    parser.add_argument("--model-id", help="Hub id for the model card's usage snippets (default: the DST folder name)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    mix = parser.add_argument_group("--arch mixencoder (pre-computed candidates, docs/precompute.md)")
    mix.add_argument("--arch", choices=["sparse-ce", "mixencoder"], default="sparse-ce",
                     help="sparse cross-encoder (default) or MixEncoder (Wang et al., 'Once is Enough')")
    add_mixencoder_arguments(mix)


def run(args: argparse.Namespace) -> int:
    """Run ``sparse-ce convert`` from parsed arguments."""
    if args.arch == "mixencoder":
        sparse_only = [f"--{n.replace('_', '-')}" for n in ("pattern", "pattern_json", "score_head", "max_positions")
                       if getattr(args, n) is not None] + (["--window"] if args.window != "default" else [])
        if sparse_only:
            raise UsageError(f"{', '.join(sparse_only)}: options of sparse cross-encoders, not of --arch mixencoder")
        from ..precompute.convert import convert_mixencoder, mixencoder_options

        try:
            convert_mixencoder(args.src, args.dst, overwrite=args.overwrite, model_id=args.model_id,
                               **mixencoder_options(args))
        except ValueError as error:
            raise UsageError(str(error)) from error
        return 0
    check_output(args.dst, "dst", folder=True)
    try:
        convert(
            args.src, args.dst, pattern=args.pattern, window=args.window, max_positions=args.max_positions,
            trained_positions=args.trained_positions, model_id=args.model_id, overwrite=args.overwrite,
            score_head=args.score_head, pattern_json=args.pattern_json,
        )
    except (FileNotFoundError, FileExistsError) as error:  # src/dst problems, named in their first word
        if not str(error).startswith(("src:", "dst:")):
            raise
        raise UsageError(str(error)) from None
    return 0


def convert(
    src: str | Path,
    dst: str | Path,
    pattern: str | None = None,
    window: int | None | str = "default",
    max_positions: int | None = None,
    trained_positions: int | None = None,
    model_id: str | None = None,
    overwrite: bool = False,
    score_head: str | None = None,
    pattern_json: str | Path | None = None,
) -> Path:
    """Convert a BERT checkpoint into a sparse cross-encoder folder.

    Args:
        src: Local folder or Hub id: a ``BertForSequenceClassification`` with one label, a plain BERT encoder, a
            sparse-ce folder or an original sparse checkpoint (``model_type: "bert"`` plus the sparse keys).
        dst: Output folder.
        pattern: ``full``, ``longformer`` or ``sparse``; ``None`` keeps the source's pattern (sparse-ce or original
            sparse checkpoints) and gives any other source the paper's ``sparse`` pattern. A checkpoint saved by the
            original code (:func:`is_original_checkpoint`) keeps its window and flags, except that its
            ``attention_window_size: 0`` (no window there) becomes ``None``; ``pattern`` or ``window`` given for a
            source with a pattern override it, with one logged line naming both.
        window: One-sided document window; ``"default"`` keeps the pattern's (or, without ``pattern``, the source's).
        max_positions: Extend the position table to this many rows by linear interpolation.
        trained_positions: Interpolate over only this many leading rows of the table.
        model_id: Name used in the model card's usage snippets; default: the name of ``dst``.
        overwrite: Allow writing into a non-empty ``dst``.
        score_head: ``cls`` or ``cosine`` (see :class:`SparseCrossEncoderConfig`); ``None`` keeps the source's
            (``cls`` for BERT sources).
        pattern_json: A JSON file with an explicit per-layer ``attention_pattern`` (instead of ``pattern``).

    Returns:
        The output folder.

    Raises:
        ValueError: Unsupported source (model type, architecture, labels), bad pattern or positions, or weights that
            did not load cleanly.
        FileNotFoundError: ``src`` is neither a folder nor a reachable Hub repository.
        FileExistsError: ``dst`` is not empty and ``overwrite`` is false.
    """
    if trained_positions is not None and max_positions is None:
        raise ValueError("trained_positions: only used together with max_positions")
    folder, hub_id = resolve_source(src)
    dst = Path(dst)
    if dst.resolve() == folder.resolve():
        raise ValueError(f"dst: {dst} is the source folder; write the conversion elsewhere")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"dst: {dst} is not empty; pass overwrite=True (--overwrite) to write into it")

    source = json.loads((folder / "config.json").read_text())
    explicit = read_pattern_json(pattern_json) if pattern_json is not None else None
    if explicit is not None and pattern is not None:
        raise ValueError("pattern: give either a preset (--pattern) or an explicit pattern (--pattern-json), not both")
    config = build_config(source, pattern, window, score_head, explicit)
    tokenizer = load_tokenizer(folder)
    config.sep_token_id, config.pad_token_id = tokenizer.sep_token_id, tokenizer.pad_token_id
    config.cls_token_id = tokenizer.cls_token_id
    model, missing = load_weights(folder, config)
    source_positions = config.max_position_embeddings
    if max_positions is not None:
        extend_position_embeddings(model, max_positions, trained_positions)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # read by `sparse-ce rerank`; training clears it. A new cosine head scores like the bi-encoder, not at random
    model.config.sparse_ce_untrained_head = bool(missing) and model.config.score_head == "cls"

    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    notes = _card_notes(source, model.config, hub_id or str(src), missing, source_positions, trained_positions)
    command = _command(src, model_id or dst.name, pattern, window, max_positions, trained_positions, score_head, pattern_json)
    card = render_model_card(model.config, hub_id or str(src), hub_id, model_id or dst.name, notes, command)
    (dst / "README.md").write_text(card, encoding="utf-8")
    logger.info(
        "converted %s -> %s: pattern=%s window=%s max_positions=%d missing=%s",
        src, dst, model.config.preset_name or "custom", model.config.attention_window_size,
        model.config.max_position_embeddings, sorted(missing) or "none",
    )
    return dst


def read_pattern_json(path: str | Path) -> dict:
    """The ``attention_pattern`` dict of a JSON file (checked against the model when the config is built)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"pattern_json: cannot read {path} as JSON ({exc})") from exc


def build_config(
    source: dict,
    pattern: str | None = None,
    window: int | None | str = "default",
    score_head: str | None = None,
    attention_pattern: dict | None = None,
) -> SparseCrossEncoderConfig:
    """Build the sparse config from a source ``config.json`` and the requested pattern (one label, no auto_map).

    Args:
        source: The source config as a dict (``model_type`` ``"bert"`` or ``"sparse_ce"``).
        pattern: See :func:`convert`.
        window: See :func:`convert`.
        score_head: See :func:`convert`.
        attention_pattern: An explicit per-layer pattern; replaces the source's pattern and flags.
    """
    has_pattern = source.get("model_type") == SparseCrossEncoderConfig.model_type or any(
        key in source for key in ("attention_window_size", "attention_pattern", *DIRECTION_FLAGS)
    )
    fields = {k: v for k, v in source.items() if k not in ("id2label", "label2id", "num_labels", "auto_map")}
    if is_original_checkpoint(source):
        fields["attention_window_size"] = original_window(source)
        logger.info(
            "src: saved by the original sparse cross-encoder code (model_type 'bert' with attention_window_size and "
            "the direction flags; BERT weight names, loaded unchanged): its pattern is %s", describe_source(source)
        )
        if source.get("attention_window_size") == 0 and window == "default" and pattern is None:
            logger.warning(
                "attention_window_size: the source says 0, which the original code treats as no window (its "
                "`if not any(attention_window_sizes)` test: documents attend to the whole document); converted as "
                "None (unlimited) to score as the original did. In sparse-ce, 0 means a document token sees only "
                "itself: pass --window 0 for that."
            )
    if attention_pattern is not None:
        fields.update({flag: None for flag in DIRECTION_FLAGS}, attention_pattern=attention_pattern)
        if window != "default":
            fields["attention_window_size"] = window
        elif not has_pattern:
            fields["attention_window_size"] = None
    elif pattern is not None or not has_pattern:
        preset = SparseCrossEncoderConfig.from_preset(pattern or "sparse", window)
        fields.update(attention_window_size=preset.attention_window_size, attention_pattern=None, **preset.pattern_flags)
    elif window != "default":
        fields["attention_window_size"] = window
    if score_head is not None:
        fields["score_head"] = score_head
    config = SparseCrossEncoderConfig.from_legacy_dict({**fields, "num_labels": 1})  # rejects non-BERT model types
    options = [f"--pattern {pattern}"] * (pattern is not None) + ["--pattern-json"] * (attention_pattern is not None)
    options += [f"--window {'none' if window is None else window}"] * (window != "default")
    if has_pattern and options:
        logger.info(
            "pattern: %s gives %s, overriding the source's own (%s)", " ".join(options),
            describe(config.attention_window_size, config.pattern_flags, getattr(config, "attention_pattern", None)),
            describe_source(source),
        )

    architectures = source.get("architectures") or []
    for name in architectures:
        if not (name.endswith(("Model", "ForSequenceClassification")) or name in ENCODER_ARCHITECTURES):
            raise ValueError(f"architectures: {name} has a head a cross-encoder cannot reuse; convert its BertModel")
    labels = len(source["id2label"]) if "id2label" in source else source.get("num_labels", 2)  # v5 omits 2 labels
    if labels != 1 and any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"num_labels: the source classifier has {labels} outputs; a cross-encoder scores with one logit. "
            "Save its encoder (model.bert.save_pretrained) and convert that; the head is then newly initialised."
        )
    return config


def load_weights(
    folder: Path, config: SparseCrossEncoderConfig
) -> tuple[SparseCrossEncoderForSequenceClassification, set[str]]:
    """Load the source weights under ``config`` and check that nothing but the classifier head is missing.

    Returns:
        The model and the missing (newly initialised) keys, a subset of ``classifier.*``.

    Raises:
        ValueError: Other missing keys, unexpected keys besides buffers and BERT pre-training heads, or mismatched
            shapes; the message lists them.
    """
    model, info = SparseCrossEncoderForSequenceClassification.from_pretrained(
        folder, config=config, output_loading_info=True, ignore_mismatched_sizes=True  # mismatches are errors below
    )
    missing = set(info["missing_keys"])
    if config.score_head != "cls" and any(k == "classifier.weight" for k in info["unexpected_keys"]):
        # a cls head's bias has the cosine head's name and shape: start the cosine head afresh instead
        model.classifier.scale.data.fill_(config.cosine_scale)
        model.classifier.bias.data.zero_()
        missing |= {"classifier.scale", "classifier.bias"}
    problems = {
        "missing": sorted(k for k in missing if not k.startswith("classifier.")),
        "unexpected": sorted(
            k for k in info["unexpected_keys"]
            if not IGNORED_UNEXPECTED.search(k) and not (config.score_head != "cls" and _replaced_by_cosine(k))
        ),
        "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
        "errors": list(info.get("error_msgs", [])),
    }
    if any(problems.values()):
        listed = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
        raise ValueError(f"weights: {folder} does not load cleanly as a BERT cross-encoder ({listed})")
    if missing:
        logger.warning("classifier head newly initialised (%s): fine-tune the model", ", ".join(sorted(missing)))
    return model, missing


def _replaced_by_cosine(key: str) -> bool:
    """BERT's pooler and a ``cls`` classifier: the ``cosine`` head has neither."""
    return key.startswith(("pooler.", "bert.pooler.")) or key in ("classifier.weight", "classifier.bias")


def render_model_card(
    config: SparseCrossEncoderConfig, source: str, hub_id: str | None, model_id: str, notes: list[str], command: str
) -> str:
    """Fill the packaged ``model_card.md`` template for a converted folder.

    Args:
        config: The converted model's config.
        source: Source checkpoint as given (folder or Hub id).
        hub_id: Hub id of the source, written as ``base_model``; ``None`` for a local folder.
        model_id: Name used in the usage snippets.
        notes: Paragraphs on what the conversion changed (head, pattern, positions).
        command: The command line that reproduces the conversion.
    """
    template = Template(resources.files("sparse_ce.convert").joinpath("model_card.md").read_text(encoding="utf-8"))
    window = config.attention_window_size
    return template.substitute(
        base_model=f"base_model: {hub_id}\n" if hub_id else "",
        model_id=model_id,
        source=source,
        pattern=_pattern_name(config),
        window="unlimited" if window is None else str(window),
        max_length=config.max_position_embeddings,
        flags=_pattern_rows(config),
        notes="\n\n".join(notes),
        command=command,
    )


def _pattern_name(config: SparseCrossEncoderConfig) -> str:
    if getattr(config, "attention_pattern", None) is not None:  # configs of older remote code have no such field
        return "explicit per-layer five-segment pattern (`attention_pattern`)"
    return f"`{config.preset_name}`" if config.preset_name else "custom flags"


def _pattern_rows(config: SparseCrossEncoderConfig) -> str:
    """The card's pattern rows: the six flags, or per layer which segments each segment attends to."""
    if getattr(config, "attention_pattern", None) is None:
        return "\n".join(f"| `{flag}` | {'on' if on else 'off'} |" for flag, on in config.pattern_flags.items())
    rows = []
    for i, matrix in enumerate(config.attention_pattern["layers"]):
        sees = "; ".join(
            f"{src} → {', '.join(dst for dst, on in zip(SEGMENT_NAMES, row) if on) or 'nothing'}"
            for src, row in zip(SEGMENT_NAMES, matrix)
        )
        rows.append(f"| layer {i} | {sees} |")
    return "\n".join(rows)


def _card_notes(source, config, name, missing, source_positions, trained_positions) -> list[str]:
    """The model card's paragraphs on the classifier head, a changed pattern and extended positions."""
    if missing and config.score_head != "cls":
        notes = [
            f"**The cosine score head is new:** scale {config.cosine_scale:g} and bias 0 over the cosine of the mean "
            f"query and mean document states of `{name}`. It ranks like a mean-pooling bi-encoder at best (and the "
            "attention pattern changes those states): fine-tune before use."
        ]
    elif missing:
        notes = [
            f"**The classifier head is untrained:** `{name}` had no sequence-classification head, so `classifier.*` "
            "was newly initialised. Scores are meaningless until the model is fine-tuned."
        ]
    else:
        notes = [f"The classifier head is the one of `{name}`."]
    if is_original_checkpoint(source):
        notes.append(
            "Converted from a checkpoint saved by the original code of Schlatt et al. "
            "(webis-de/ecir24-sparse-cross-encoder): the weights are unchanged and the pattern is read from its config."
            + (" Its `attention_window_size: 0` meant no window there (documents see the whole document), so it is "
               "converted as unlimited." if source.get("attention_window_size") == 0 and config.attention_window_size is None else "")
        )
    # a source without pattern keys is a dense BERT: unlimited window, every direction on (the legacy defaults too)
    trained_window = original_window(source) if is_original_checkpoint(source) else source.get("attention_window_size")
    before = [trained_window, source.get("attention_pattern"),
              *(source.get(flag, True) for flag in DIRECTION_FLAGS)]
    if before != [config.attention_window_size, getattr(config, "attention_pattern", None), *config.pattern_flags.values()]:
        notes.append("The attention pattern differs from the one the source was trained with: fine-tune before use.")
    if config.max_position_embeddings != source_positions:
        rows = f"first {trained_positions}" if trained_positions else str(source_positions)
        notes.append(
            f"The position table was extended from {source_positions} to {config.max_position_embeddings} positions "
            f"by linear interpolation over the {rows} trained positions (Chen et al., 2023); fine-tune on long inputs."
        )
    return notes


def _command(src, dst_name, pattern, window, max_positions, trained_positions, score_head=None, pattern_json=None) -> str:
    """The ``sparse-ce convert`` line that reproduces a conversion (for the model card)."""
    parts = ["sparse-ce", "convert", str(src), dst_name]
    if pattern is not None:
        parts += ["--pattern", pattern]
    if pattern_json is not None:
        parts += ["--pattern-json", str(pattern_json)]
    if window != "default":
        parts += ["--window", "none" if window is None else str(window)]
    if score_head is not None:
        parts += ["--score-head", score_head]
    if max_positions is not None:
        parts += ["--max-positions", str(max_positions)]
    if trained_positions is not None:
        parts += ["--trained-positions", str(trained_positions)]
    return " ".join(parts)
