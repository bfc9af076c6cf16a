"""The trained default model shipped in the repository: loads, is what its card says, reproduces its recorded scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_ce.rank import PairScorer

MODEL = Path(__file__).parents[1] / "models" / "sparse-ce-minilm-l6-w4"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((MODEL / "recorded_scores.json").read_text())


def test_default_model_is_a_small_trained_sparse_w4_hub_folder():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "sparse_ce" and config["attention_window_size"] == 4
    assert config["sparse_ce_untrained_head"] is False
    assert not config["query_doc_attention"] and not config["query_cls_attention"]  # the paper's pattern
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 50 * 2**20
    for name in ("modeling_sparse_ce.py", "configuration_sparse_ce.py", "README.md", "tokenizer.json"):
        assert (MODEL / name).is_file(), name
    card = (MODEL / "README.md").read_text()
    assert "train_st.py" in card and "nDCG@10" in card and "untrained" not in card


@pytest.mark.slow
def test_default_model_reproduces_its_recorded_scores(recorded):
    pairs = recorded["pairs"]
    scorer = PairScorer(str(MODEL), device="cpu", dtype=recorded["dtype"], progress=False)
    scores, _ = scorer.score([p["query"] for p in pairs], [p["passage"] for p in pairs], [p["qid"] for p in pairs])
    assert scores == pytest.approx([p["score"] for p in pairs], abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) > 1  # not a constant head


@pytest.mark.slow
def test_default_model_ranks_through_cross_encoder(recorded):
    from sentence_transformers import CrossEncoder

    pairs = recorded["pairs"]
    model = CrossEncoder(str(MODEL), trust_remote_code=True, max_length=recorded["max_length"])
    assert model.model.dtype == torch.float32  # float16 on disk, float32 by default
    logits = model.predict([(p["query"], p["passage"]) for p in pairs], activation_fn=torch.nn.Identity())
    assert list(logits) == pytest.approx([p["score"] for p in pairs], abs=1e-4)


def test_default_model_code_is_the_package_code():
    """The folder's remote code is a copy of this package's: a change to the model must re-ship it."""
    root = Path(__file__).parents[1]
    for copy in MODEL.glob("*.py"):
        source = root / copy.name if copy.name == "configuration_sparse_ce.py" else root / "modeling_sparse_ce" / copy.name
        assert copy.read_text() == source.read_text(), f"{copy.name} differs from {source}: re-run ship_default.py"


@pytest.mark.slow
def test_default_model_improves_bm25_on_dl19():
    """What a re-ranker is for: over the BM25 top-100 of the DL19 queries, the shipped model's nDCG@10 beats BM25's
    (a re-shipped model that ranks worse fails here). The default scoring path: dtype auto."""
    import ir_measures

    from sparse_ce.data import read_dl_json, read_qrels

    data = Path(__file__).parents[2] / "shared" / "data" / "trec-dl"
    if not (data / "bm25_top100_dl19.json").exists():
        pytest.skip(f"{data} is absent")
    stage = read_dl_json(data / "bm25_top100_dl19.json")
    qrels = read_qrels(data / "qrels.dl19-passage.txt")
    scorer = PairScorer(str(MODEL), device="cpu", dtype="auto", progress=False)
    qids, queries, documents = stage.pairs()
    scores, _ = scorer.score(queries, documents, qids)
    measure = ir_measures.parse_measure("nDCG@10")

    def ndcg(ranking):
        run = [ir_measures.ScoredDoc(q, d, s) for q, hits in ranking.items() for d, s in hits]
        return ir_measures.calc_aggregate([measure], qrels, run)[measure]

    reranked, bm25 = ndcg(stage.ranking(scores)), ndcg(stage.ranking())
    assert bm25 == pytest.approx(0.5058, abs=1e-3)
    assert reranked > bm25 + 0.02, f"the shipped model re-ranks DL19 to nDCG@10 {reranked:.4f}, BM25 {bm25:.4f}"
