"""The query is computed once per query inside ``CrossEncoder.predict`` / ``rank`` (Schlatt et al., Section 3.4)."""

from __future__ import annotations

import torch
from sentence_transformers import CrossEncoder

QUERY = "how long is the life cycle of a flea"
DOCS = ["the flea life cycle can last a year", "a dog", "fleas and cats and dogs in water", "the year", "goldfish grow"]


def packed_tokens_per_batch(model: CrossEncoder, run) -> list[int]:
    """Tokens entering the first encoder layer for each forward of ``run()``."""
    seen = []
    hook = model.model.bert.encoder.layer[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_predict_computes_each_query_once(tiny_model_dir):
    model = CrossEncoder(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    tokenizer = model.tokenizer
    pairs = [(QUERY, d) for d in DOCS] + [("do goldfish grow", d) for d in DOCS[:2]]
    seen = packed_tokens_per_batch(model, lambda: model.predict(pairs, batch_size=len(pairs)))
    query_tokens = {q: len(tokenizer(q)["input_ids"]) - 1 for q, _ in pairs}  # query + [SEP], without [CLS]
    doc_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for _, d in pairs)
    assert seen == [len(pairs) + sum(query_tokens.values()) + doc_tokens]


def test_rank_scores_equal_unshared_computation(spread_model_dir):
    model = CrossEncoder(str(spread_model_dir), trust_remote_code=True, device="cpu")
    shared = model.rank(QUERY, DOCS)
    scores = torch.tensor([r["score"] for r in shared])
    assert scores.max() - scores.min() > 1e-2  # documents told apart: a wrong score would show
    model.model.config.share_query = False
    seen = packed_tokens_per_batch(model, lambda: model.rank(QUERY, DOCS))
    unshared = model.rank(QUERY, DOCS)
    assert [r["corpus_id"] for r in shared] == [r["corpus_id"] for r in unshared]
    torch.testing.assert_close(torch.tensor([r["score"] for r in shared]), torch.tensor([r["score"] for r in unshared]), atol=1e-5, rtol=0)
    query_tokens = len(model.tokenizer(QUERY)["input_ids"]) - 1
    doc_tokens = sum(len(model.tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS)
    assert seen == [len(DOCS) * (1 + query_tokens) + doc_tokens]
