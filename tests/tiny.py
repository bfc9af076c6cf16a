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
    fields = dict(TINY_MODEL, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  sep_token_id=tokenizer.sep_token_id, cls_token_id=tokenizer.cls_token_id)
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


def make_bert_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny plain BERT encoder (a bi-encoder's checkpoint) with its tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY_MODEL, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **overrides})
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_mixencoder_folder(folder: Path, k: int = 2, strategy: str = "C", layers=(0, 1), seed: int = 0, noise: float = 0.05) -> Path:
    """A tiny MixEncoder converted from a tiny BERT; ``noise`` perturbs every weight so that the interaction layers
    (zero-initialised blends) take part."""
    from modeling_mixencoder import MixEncoderForSequenceClassification
    from sparse_ce.precompute.convert import convert_mixencoder

    convert_mixencoder(make_bert_folder(folder.parent / f"{folder.name}-bert", seed), folder, num_context=k,
                       strategy=strategy, interaction_layers=list(layers), overwrite=True)
    if noise:
        model = MixEncoderForSequenceClassification.from_pretrained(folder)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(folder)
    return folder


TOPICS = {
    "101": "how long is the life cycle of a flea",
    "102": "do goldfish grow",
    "103": "what is sparse attention",
    "104": "why is the dog cold",
}
PASSAGES = {
    "p1": "a flea can live up to a year",
    "p2": "the flea life cycle is long in cold water",
    "p3": "the dog and the cat",
    "p4": "goldfish grow fast in water",
    "p5": "do goldfish grow slow in cold water",
    "p6": "wifi vs bluetooth",
    "p7": "sparse attention uses a window of tokens",
    "p8": "the model can rank a document for a query",
    "p9": "a cold dog in the water",
    "p10": "light and heat",
}
GRADES = {
    "101": {"p1": 3, "p2": 2, "p3": 0},
    "102": {"p4": 2, "p5": 3, "p6": 0},
    "103": {"p7": 3, "p8": 1},
    "104": {"p9": 2, "p3": 1, "p10": 0},
}


def _dl_entries(topics: dict[str, str]) -> list[dict]:
    """Every passage as a candidate of every query, in a fixed per-query order (a stand-in first stage)."""
    entries = []
    for n, (qid, text) in enumerate(topics.items()):
        order = list(PASSAGES)[n:] + list(PASSAGES)[:n]
        hits = [{"qid": qid, "docid": d, "rank": r, "score": 20.0 - r, "content": PASSAGES[d]} for r, d in enumerate(order, 1)]
        entries.append({"query": text, "hits": hits})
    return entries


def make_data_folder(root: Path) -> Path:
    """A miniature of ``../shared/data``: TREC DL 19-22 JSON first stages and qrels, Vaswani and SciFact files."""
    import gzip
    import json

    dl = root / "trec-dl"
    (dl / "train-extra").mkdir(parents=True, exist_ok=True)
    qrels = "".join(f"{q} 0 {d} {g}\n" for q, docs in GRADES.items() for d, g in docs.items())
    for year in (19, 20, 21, 22):
        (dl / f"bm25_top100_dl{year}.json").write_text(json.dumps(_dl_entries(TOPICS)))
        if year != 22:
            (dl / f"qrels.dl{year}-passage.txt").write_text(qrels)
    extra = _dl_entries({"101": TOPICS["101"]})[:1]
    extra[0]["hits"] = extra[0]["hits"][::-1]
    (dl / "train-extra" / "OTHER_dl21.json").write_text(json.dumps(extra))
    vaswani = root / "vaswani"
    vaswani.mkdir(exist_ok=True)
    (vaswani / "query-text.trec").write_text(
        "".join(f"<top>\n<num>{q}</num><title>\n{t}\n</title>\n</top>\n" for q, t in TOPICS.items())
    )
    (vaswani / "doc-text.trec").write_text("".join(f"<DOC>\n<DOCNO>{d}</DOCNO>\n{t}\n</DOC>\n" for d, t in PASSAGES.items()))
    (vaswani / "qrels").write_text("".join(f"{q} 0 {d} 1\n" for q, docs in GRADES.items() for d, g in docs.items() if g))
    scifact = root / "scifact"
    scifact.mkdir(exist_ok=True)
    (scifact / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in PASSAGES.items())
    )
    with gzip.open(scifact / "topics.test.tsv.gz", "wt") as f:
        f.write("".join(f"{q}\t{t}\n" for q, t in TOPICS.items()))
    (scifact / "qrels.test.txt").write_text(
        "".join(f"{q} 0 {d} 1\n" for q, docs in GRADES.items() for d, g in docs.items() if g >= 2)
    )
    return root


def make_bi_encoder_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny sentence-transformers bi-encoder (BERT + mean pooling) saved to ``folder``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    tokenizer = make_tokenizer(folder / "bert")
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tokenizer), **TINY_MODEL)).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    encoder = Transformer(str(folder / "bert"), max_seq_length=64)
    SentenceTransformer(modules=[encoder, Pooling(encoder.get_embedding_dimension())]).save(str(folder / "st"))
    return folder / "st"
