"""PairScorer: pair encoding, truncation and MaxP, batching by query, input order."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from tiny import WORDS, make_model_folder

from sparse_ce.rank import MIN_DOCUMENT_TOKENS, PairScorer

QUERIES = ["how long is life cycle of flea", "do goldfish grow", "what is wifi vs bluetooth"]


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny sparse model whose scores spread over about one unit (the default init gives ~1e-4 differences)."""
    return make_model_folder(tmp_path_factory.mktemp("spread"), initializer_range=0.2)


@pytest.fixture(scope="module")
def pairs():
    """Six documents per query, 0 to 250 words long (some over the 128-token limit)."""
    rng = random.Random(0)
    queries, documents = [], []
    for query in QUERIES:
        for words in (3, 250, 20, 60, 140, 9):
            queries.append(query)
            documents.append(random_text(rng, words))
    return queries, documents


def scorer(model_dir, **options) -> PairScorer:
    return PairScorer(str(model_dir), progress=False, **options)


def direct_score(s: PairScorer, input_ids: list[int]) -> float:
    """The model's logit for one row built outside the scorer ([SEP] ends the query: token types 0...0 1...1)."""
    first_sep = input_ids.index(s.tokenizer.sep_token_id)
    types = [0] * (first_sep + 1) + [1] * (len(input_ids) - first_sep - 1)
    with torch.inference_mode():
        out = s.model(input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([types]))
    return out.logits[0, 0].item()


def test_half_precision_storage_is_scored_in_float32(model_dir, tmp_path):
    """Weights stored as float16 with config dtype float32 (the shipped model) compute in float32 by default."""
    import json
    import shutil

    from transformers import AutoModelForSequenceClassification

    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).half().save_pretrained(half)
    config = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    assert scorer(half).model.dtype == torch.float32
    assert scorer(half, dtype="bfloat16").model.dtype == torch.bfloat16


def test_default_max_length_and_limit(model_dir):
    assert scorer(model_dir).max_length == 128
    with pytest.raises(ValueError, match="max_position_embeddings 128"):
        scorer(model_dir, max_length=129)


def test_scores_match_single_pairs_in_shuffled_input_order(model_dir, pairs):
    s = scorer(model_dir, batch_tokens=400)
    queries, documents = pairs
    order = list(range(len(queries)))
    random.Random(1).shuffle(order)
    scores, _ = s.score([queries[i] for i in order], [documents[i] for i in order])
    for position, i in enumerate(order):
        ids = s.tokenizer(queries[i], documents[i], truncation="only_second", max_length=128)["input_ids"]
        assert scores[position] == pytest.approx(direct_score(s, ids), abs=1e-5)
    assert max(scores) - min(scores) > 0.01  # a permutation would show


@pytest.mark.parametrize("maxp", [False, True])
def test_batching_and_query_sharing_do_not_change_scores(model_dir, pairs, maxp):
    queries, documents = pairs
    one_by_one, _ = scorer(model_dir, batch_tokens=1, maxp=maxp).score(queries, documents)
    per_query, _ = scorer(model_dir, batch_tokens=700, maxp=maxp).score(queries, documents)  # split queries
    all_at_once, _ = scorer(model_dir, batch_tokens=100_000, maxp=maxp).score(queries, documents)
    assert per_query == pytest.approx(one_by_one, abs=1e-5)
    assert all_at_once == pytest.approx(one_by_one, abs=1e-5)


def test_batches_hold_whole_queries_within_the_token_budget(model_dir, pairs):
    queries, documents = pairs
    s = scorer(model_dir, batch_tokens=1000)
    rows, _ = s.encode(queries + ["why is the dog cold"], documents + ["a dog"])
    batches = s.batches(rows)
    assert [row for batch in batches for row in batch] == rows  # every row once, in order
    padded = [len(batch) * max(len(r.input_ids) for r in batch) for batch in batches]
    assert all(p <= 1000 for p, batch in zip(padded, batches) if len(batch) > 1)  # one row may exceed it alone
    for query in {row.query for row in rows}:
        holding = [i for i, batch in enumerate(batches) if any(r.query == query for r in batch)]
        rows_of_query = [r for r in rows if r.query == query]
        if _padded(rows_of_query) <= 1000:
            assert len(holding) == 1  # a query that fits is never split
        assert holding == list(range(holding[0], holding[-1] + 1))  # and its forwards are consecutive
    lengths = [len(r.input_ids) for r in rows if r.query == 0]
    assert lengths == sorted(lengths, reverse=True)  # longest first within a query: little padding
    assert len(s.batches(rows)) > len(scorer(model_dir, batch_tokens=100_000).batches(rows)) == 1


def _padded(rows):
    return len(rows) * max(len(r.input_ids) for r in rows)


def test_loaded_model_and_backend_option(model_dir, pairs):
    from transformers import AutoModelForSequenceClassification

    queries, documents = pairs
    expected, _ = scorer(model_dir).score(queries, documents)
    loaded = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).train()
    s = PairScorer(loaded, tokenizer=scorer(model_dir).tokenizer, progress=False, attention_backend="dense")
    scores, _ = s.score(queries, documents)
    assert scores == pytest.approx(expected, abs=1e-5) and loaded.training  # scored in eval mode, mode restored
    with pytest.raises(ValueError, match="tokenizer: needed"):
        PairScorer(loaded)


def test_rows_have_two_sep_and_query_is_never_cut(model_dir, pairs):
    queries, documents = pairs
    for maxp in (False, True):
        s = scorer(model_dir, maxp=maxp)
        all_queries = queries + ["do goldfish grow"]
        rows, _ = s.encode(all_queries, documents + [""])
        tok = s.tokenizer
        for row in rows:
            query_ids = tok(all_queries[row.pair], add_special_tokens=False)["input_ids"]
            assert row.input_ids.count(tok.sep_token_id) == 2
            assert row.input_ids[0] == tok.cls_token_id and row.input_ids[-1] == tok.sep_token_id
            assert row.input_ids[1 : 1 + len(query_ids)] == query_ids
            assert len(row.input_ids) <= 128
            first_doc = len(query_ids) + 2
            assert row.token_type_ids == [0] * first_doc + [1] * (len(row.input_ids) - first_doc)


def test_truncation_count_and_warning(model_dir, pairs, caplog):
    queries, documents = pairs
    s = scorer(model_dir)
    room = {q: 128 - 3 - len(s.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUERIES}
    expected = sum(
        len(s.tokenizer(d, add_special_tokens=False)["input_ids"]) > room[q] for q, d in zip(queries, documents)
    )
    assert 0 < expected < len(documents)
    with caplog.at_level(logging.WARNING):
        _, stats = s.score(queries, documents)
    assert stats.truncated == stats.long_documents == expected
    assert stats.rows == stats.pairs == len(documents)
    assert f"{expected} of {len(documents)} documents were longer" in caplog.text
    _, stats = scorer(model_dir, maxp=True).score(queries, documents)
    assert (stats.truncated, stats.long_documents) == (0, expected)
    assert stats.rows > len(documents)


def test_maxp_is_max_over_windows_built_by_hand(model_dir):
    s = scorer(model_dir, maxp=True, max_length=40, batch_tokens=120)
    tok = s.tokenizer
    query = "how long is life cycle of flea"
    documents = [random_text(random.Random(2), 90), random_text(random.Random(3), 5)]
    scores, stats = s.score([query, query], documents)
    q_ids = tok(query, add_special_tokens=False)["input_ids"]
    window = 40 - 3 - len(q_ids)
    step = window - window // 2  # windows overlap by half a window
    rows = 0
    for document, score in zip(documents, scores):
        d_ids = tok(document, add_special_tokens=False)["input_ids"]
        starts = range(0, max(len(d_ids) - window, 0) + step, step)
        windows = [d_ids[i : i + window] for i in starts]
        assert sum(len(w) for w in windows) >= len(d_ids)
        rows += len(windows)
        row_scores = [
            direct_score(s, [tok.cls_token_id, *q_ids, tok.sep_token_id, *w, tok.sep_token_id]) for w in windows
        ]
        assert score == pytest.approx(max(row_scores), abs=1e-5)
    assert stats.rows == rows and rows > 4


def test_long_query_raises_naming_it(model_dir):
    s = scorer(model_dir, max_length=32)
    long_query = " ".join(["flea"] * (32 - 3 - MIN_DOCUMENT_TOKENS + 1))
    with pytest.raises(ValueError, match=r"query 'q7': 22 tokens leave 7 of max_length 32"):
        s.score(["do goldfish grow", long_query], ["water", "water"], query_ids=["q1", "q7"])
    s.score([long_query[5:]], ["water"])  # one token shorter fits


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_raises(model_dir, query):
    with pytest.raises(ValueError, match="empty query"):
        scorer(model_dir).score(["do goldfish grow", query], ["water", "water"], query_ids=["q1", "q2"])


def test_empty_document_warns_and_is_scored(model_dir, caplog):
    s = scorer(model_dir)
    with caplog.at_level(logging.WARNING):
        scores, stats = s.score(["do goldfish grow"] * 3, ["water heat", "", "  "])
    assert stats.empty_documents == 2
    assert "2 of 3 documents are empty" in caplog.text
    tok = s.tokenizer
    ids = [
        tok.cls_token_id,
        *tok("do goldfish grow", add_special_tokens=False)["input_ids"],
        tok.sep_token_id,
        tok.sep_token_id,
    ]
    assert scores[1] == scores[2] == pytest.approx(direct_score(s, ids), abs=1e-5)


def test_mismatched_lengths_raise(model_dir):
    with pytest.raises(ValueError, match="differ in length"):
        scorer(model_dir).score(["a", "b"], ["x"])


def test_dtype_option(model_dir, pairs):
    queries, documents = pairs
    s = scorer(model_dir, dtype="bfloat16")
    assert s.model.dtype == torch.bfloat16
    reference, _ = scorer(model_dir).score(queries, documents)
    scores, _ = s.score(queries, documents)
    assert scores == pytest.approx(reference, abs=0.1)


def test_dtype_auto_follows_the_hardware(model_dir, monkeypatch):
    """``auto``: bfloat16 where the CPU has bfloat16 arithmetic, float32 where it has not."""
    import sparse_ce.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert scorer(model_dir, device="cpu", dtype="auto").model.dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert scorer(model_dir, device="cpu", dtype="auto").model.dtype == torch.float32
