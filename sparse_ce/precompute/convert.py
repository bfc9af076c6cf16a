"""``sparse-ce convert --arch mixencoder``: a BERT checkpoint into a MixEncoder Hub folder.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3. The BERT
encoder is kept as it is; the context compressor, the interaction layers (their projections copied from the
encoder's layers, as the paper's code does) and the score head are new, and the untrained model scores as the dual
encoder with the same weights (see :mod:`modeling_mixencoder.modeling_mixencoder`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from modeling_mixencoder import MixEncoderConfig, MixEncoderForSequenceClassification

from ..sources import load_tokenizer, resolve_source

logger = logging.getLogger(__name__)

NEW_PARTS = re.compile(r"^(context|interaction|classifier)\.")
"""Keys a BERT source lacks: initialised by the conversion."""

DROPPED = re.compile(r"(^|\.)(pooler|embeddings\.position_ids|embeddings\.token_type_ids)(\.|$)|^cls\.|^classifier\.")
"""Source keys a MixEncoder does not use: BERT's pooler, index buffers, pre-training and classification heads."""


def add_mixencoder_arguments(group) -> None:
    """The MixEncoder's options, shared by ``sparse-ce convert --arch mixencoder`` and ``train_st.py``."""
    from modeling_mixencoder.configuration_mixencoder import ABLATIONS, INTERACTION_BLOCKS

    group.add_argument("--k", type=int, default=1, help="context embeddings per candidate")
    group.add_argument("--strategy", choices=["S", "C"], default="C",
                       help="S: k special tokens prepended; C: k context codes attending over the outputs")
    group.add_argument("--interaction-layers", type=int, nargs="+", metavar="LAYER",
                       help="0-based layers where candidates attend over the query (default: the last)")
    group.add_argument("--interaction-block", choices=INTERACTION_BLOCKS, default="authors",
                       help="authors: output dense + LayerNorm + feed-forward for E and H, as the authors' code "
                       "(default); light: zero-initialised residual projections only")
    group.add_argument("--no-dual-encoder-start", dest="dual_encoder_start", action="store_false",
                       help="the authors' block exactly (H_0 = 0, no zero-initialised blend): an untrained model is "
                       "then not the dual encoder")
    group.add_argument("--ablation", choices=[a for a in ABLATIONS if a], help="Table 3: score without H or without E")


def mixencoder_options(args) -> dict:
    """:func:`convert_mixencoder`'s keyword arguments from :func:`add_mixencoder_arguments`' options."""
    return dict(num_context=args.k, strategy=args.strategy, interaction_layers=args.interaction_layers,
                interaction_block=args.interaction_block, dual_encoder_start=args.dual_encoder_start,
                ablation=args.ablation)


def convert_mixencoder(
    src: str | Path,
    dst: str | Path,
    num_context: int = 1,
    strategy: str = "C",
    interaction_layers: list[int] | None = None,
    score_head: str = "cosine",
    interaction_block: str = "authors",
    dual_encoder_start: bool = True,
    ablation: str | None = None,
    overwrite: bool = False,
    model_id: str | None = None,
) -> Path:
    """Write a MixEncoder folder made from the BERT checkpoint ``src`` (folder or Hub id).

    Raises:
        ValueError: a non-BERT source, bad settings, or encoder weights that did not load.
        FileExistsError: ``dst`` is not empty and ``overwrite`` is false.
    """
    folder, hub_id = resolve_source(src)
    dst = Path(dst)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"dst: {dst} is not empty; pass overwrite=True (--overwrite) to write into it")
    source = json.loads((folder / "config.json").read_text())
    if source.get("model_type") not in ("bert", MixEncoderConfig.model_type):
        raise ValueError(f"src: model_type {source.get('model_type')!r}; a MixEncoder is made from a BERT checkpoint")
    fields = {k: v for k, v in source.items() if k not in ("id2label", "label2id", "num_labels", "auto_map", "architectures", "model_type")}
    fields.update(
        num_context=num_context, context_strategy=strategy, interaction_layers=interaction_layers,
        score_head=score_head, num_labels=1, interaction_block=interaction_block,
        dual_encoder_start=dual_encoder_start, ablation=ablation,
    )
    config = MixEncoderConfig(**fields)
    tokenizer = load_tokenizer(folder)
    config.sep_token_id, config.pad_token_id, config.cls_token_id = tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id
    model, info = MixEncoderForSequenceClassification.from_pretrained(folder, config=config, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not NEW_PARTS.search(k))
    unexpected = sorted(k for k in info["unexpected_keys"] if not DROPPED.search(k))
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"weights: {folder} does not load as a BERT encoder (missing: {missing}, unexpected: {unexpected}, "
            f"mismatched: {info['mismatched_keys']})"
        )
    if source.get("model_type") == "bert":
        model.init_from_encoder()
    # pair rows are split and each half cut by the model; a row may be as long as a cut query needs to leave the
    # candidate all its max_candidate_length tokens (any query up to the position table)
    tokenizer.model_max_length = config.max_position_embeddings + config.max_candidate_length
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    (dst / "README.md").write_text(model_card(config, hub_id or str(src), model_id or dst.name), encoding="utf-8")
    logger.info("converted %s -> %s: MixEncoder k=%d strategy=%s interaction layers %s", src, dst, num_context, strategy,
                config.interaction_layer_indices())
    return dst


def model_card(config: MixEncoderConfig, source: str, name: str) -> str:
    """A short card: what the model is, how it was made, how to use it."""
    return f"""---
library_name: sentence-transformers
pipeline_tag: text-ranking
tags: [cross-encoder, mixencoder, sparse-ce]
---

# {name}

A MixEncoder ("Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Wang et al.) made
from `{source}` by `sparse-ce convert {source} {name} --arch mixencoder --k {config.num_context} --strategy
{config.context_strategy} --interaction-layers {' '.join(map(str, config.interaction_layer_indices()))}
--interaction-block {config.interaction_block}{'' if config.dual_encoder_start else ' --no-dual-encoder-start'}{'' if config.ablation is None else ' --ablation ' + config.ablation}`.
Candidates are encoded alone into {config.num_context} context embedding(s) ({config.context_strategy}-strategy), the
query once; interaction at layer(s) {config.interaction_layer_indices()}; score head `{config.score_head}`.

Interaction block: `{config.interaction_block}`{'' if config.ablation is None else f', ablation `{config.ablation}` (Table 3)'}.
{"Untrained interaction layers start as no-ops: the model then scores as the dual encoder with the same weights." if config.dual_encoder_start else "The interaction layers are the authors' exactly (H_0 = 0): train the model before use."}

```python
from sentence_transformers import CrossEncoder
model = CrossEncoder("{name}", trust_remote_code=True)
scores = model.predict([("query", "passage one"), ("query", "passage two")])
```

Pre-compute a corpus once and score from the store: `sparse-ce index {name} --corpus FILE --output STORE`, then
`sparse-ce rerank --model {name} --index STORE ...` (see the sparse-ce README, docs/precompute.md).
"""
