"""Scores that rank: sentence-transformers' ``CrossEncoder`` (predict, rank, default arguments) orders documents as
the logits do (issue 24). Its default activation for one label is a sigmoid, which saturates on ranking-trained
logits (8-16 on DL19 for the shipped model: the top 10 of a query tied at 0.999999881 in float32, so ``rank`` fell
back to input order); every model this package writes stores the identity in ``config.sentence_transformers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configuration_sparse_ce import SCORE_ACTIVATION, SparseCrossEncoderConfig
from modeling_mixencoder.configuration_mixencoder import SCORE_ACTIVATION as MIX_ACTIVATION
from modeling_mixencoder.configuration_mixencoder import MixEncoderConfig

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "models" / "sparse-ce-minilm-l6-w4"
DL19 = ROOT.parent / "shared" / "data" / "trec-dl"


def test_configs_store_the_identity_and_keep_a_given_activation():
    assert SCORE_ACTIVATION == MIX_ACTIVATION == "torch.nn.modules.linear.Identity"
    for config_class in (SparseCrossEncoderConfig, MixEncoderConfig):
        assert config_class().to_dict()["sentence_transformers"] == {"activation_fn": SCORE_ACTIVATION}
        given = {"activation_fn": "torch.nn.modules.activation.Sigmoid", "other": 1}  # e.g. a converted BCE model's
        assert config_class(sentence_transformers=given).sentence_transformers == given
        assert config_class(sentence_transformers={"other": 1}).sentence_transformers == {
            "other": 1, "activation_fn": SCORE_ACTIVATION}


def test_cross_encoder_predicts_logits_for_a_saved_model(tiny_model_dir):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_model_dir), trust_remote_code=True)
    assert isinstance(model.activation_fn, torch.nn.Identity)
    pairs = [("how long do fleas live", "the flea life cycle"), ("what is wifi", "wifi and bluetooth")]
    logits = model.predict(pairs, activation_fn=torch.nn.Identity())
    assert model.predict(pairs).tolist() == pytest.approx(logits.tolist(), abs=0)


@pytest.mark.slow
def test_shipped_model_ranks_dl19_as_its_logits_and_as_rerank():
    """Five DL19 queries x 100 BM25 passages (same repaired text for both): CrossEncoder.rank's order is the logits'
    order, its scores tie only where logits do, and predict's nDCG@10 equals PairScorer's at float32."""
    if not (DL19 / "bm25_top100_dl19.json").exists():
        pytest.skip(f"{DL19} is absent")
    import ir_measures
    from sentence_transformers import CrossEncoder

    from sparse_ce.data import read_dl_json, read_qrels
    from sparse_ce.rank import PairScorer

    stage = read_dl_json(DL19 / "bm25_top100_dl19.json", limit=5)
    qrels = read_qrels(DL19 / "qrels.dl19-passage.txt")
    cross_encoder = CrossEncoder(str(MODEL), trust_remote_code=True)
    scorer = PairScorer(str(MODEL), device="cpu", dtype="float32", progress=False)
    runs = {"predict": {}, "rerank": {}}
    for qid, hits in stage.candidates.items():
        query, texts = stage.queries[qid], [hit.text for hit in hits]
        predicted = cross_encoder.predict([(query, text) for text in texts])
        logits = cross_encoder.predict([(query, text) for text in texts], activation_fn=torch.nn.Identity())
        ranked = cross_encoder.rank(query, texts)
        order = sorted(range(len(texts)), key=lambda i: -float(logits[i]))
        assert [r["corpus_id"] for r in ranked] == order, qid
        assert len(set(float(s) for s in predicted)) == len(set(float(s) for s in logits)), qid  # no new ties
        assert float(logits.max()) > 5  # a sigmoid would have saturated these
        scores, _ = scorer.score([query] * len(texts), texts, [qid] * len(texts))
        for name, values in (("predict", predicted), ("rerank", scores)):
            runs[name][qid] = {hit.docid: float(v) for hit, v in zip(hits, values)}
    measure = ir_measures.nDCG @ 10
    ndcg = {name: ir_measures.calc_aggregate([measure], qrels, run)[measure] for name, run in runs.items()}
    assert abs(ndcg["predict"] - ndcg["rerank"]) <= 1e-3, ndcg
