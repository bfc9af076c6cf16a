"""A tiny BERT tokenizer and sparse cross-encoder built offline, shared by the tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertTokenizerFast

from modeling_sparse_ce import SparseCrossEncoderConfig, SparseCrossEncoderForSequenceClassification

WORDS = (
    "the a of and to in is for on what how why who when does do did are was were can with by from at as it that this "
    "flea life cycle long dog cat goldfish grow wifi bluetooth war enter us year day water heat cold light fast slow "
    "model rank search query document passage attention sparse window token"
).split()

TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def make_tokenizer(folder: Path, model_max_length: int = 128) -> BertTokenizerFast:
    """A word-piece tokenizer over a small fixed vocabulary (letters make every word spellable)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase, *string.digits]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits] + list(string.punctuation)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    return BertTokenizerFast(vocab=vocab, model_max_length=model_max_length)


def make_config(tokenizer: BertTokenizerFast, preset: str = "sparse", window=2, **overrides) -> SparseCrossEncoderConfig:
    fields = dict(TINY_MODEL, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id)
    fields.update(overrides)
    return SparseCrossEncoderConfig.from_preset(preset, window=window, **fields)


def make_model_folder(folder: Path, preset: str = "sparse", window=2, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny sparse cross-encoder with its tokenizer into ``folder``."""
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    model = SparseCrossEncoderForSequenceClassification(make_config(tokenizer, preset, window, **overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
