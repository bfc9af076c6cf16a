"""Queries without candidates of their own (the unjudged DL21/DL22 topics): BM25 candidates from the training
passages, the test queries and the dev passages kept out, and teacher score files whose gaps a model fills."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tiny import TOPICS, make_data_folder

from sparse_ce.rank.fusion import zscore
from sparse_ce.train import pool as pooling
from sparse_ce.train.pool import TrainingQuery
from sparse_ce.train.teacher import TeacherSpec, component_scores, missing_pool, teacher_scores

sys.path.insert(0, str(Path(__file__).parents[1]))
import train_st  # noqa: E402

POOL = {
    "1": TrainingQuery("flea life", {"a": "a flea lives a year", "b": "the flea life cycle"}),
    "2": TrainingQuery("goldfish", {"c": "goldfish grow fast", "d": "dogs and cats"}),
    "dev": TrainingQuery("sparse attention", {"e": "the goldfish attention span"}),
}


def write_topics(path: Path, topics: dict[str, str]) -> Path:
    path.write_text("".join(f"{qid}\t{text}\n" for qid, text in topics.items()))
    return path


def test_retrieved_queries_take_bm25_candidates_from_training_passages_only(tmp_path):
    topics = write_topics(tmp_path / "topics.tsv", {
        "1": "flea life",  # pooled already: skipped
        "9": "Do  Goldfish GROW",  # a test query's text: skipped
        "7": "goldfish attention",  # its best match "e" belongs to a dev query: never a candidate
        "8": "zebra",  # no passage shares a word: no candidates, no query
        "6": "flea goldfish",
    })
    got = pooling.retrieved_queries([topics], POOL, depth=5, held_out=["dev"], excluded_texts=["do goldfish grow"])
    assert list(got) == ["7", "6"]
    assert got["7"] == TrainingQuery("goldfish attention", {"c": "goldfish grow fast"})
    assert got["6"].text == "flea goldfish" and set(got["6"].documents) == {"a", "b", "c"}
    assert all(text == {**POOL["1"].documents, **POOL["2"].documents}[d] for d, text in got["6"].documents.items())
    one = pooling.retrieved_queries([topics], POOL, depth=1, held_out=["dev"])
    assert [len(q.documents) for q in one.values()] == [1, 1, 1] and "9" in one  # nothing excluded this time


def test_score_file_gaps_are_scored_by_the_model_after_the_bar(tmp_path):
    pool = {**POOL, "6": TrainingQuery("flea goldfish", {"a": "a flea lives a year", "c": "goldfish grow fast"})}
    score_file = tmp_path / "scores.tsv"
    score_file.write_text("qid docid score\n1 a 0.9\n1 b 0.1\n2 c 0.8\n2 d 0.2\ndev e 0.5\n")
    with pytest.raises(ValueError, match=r"2 pooled pairs have no score.*scores:FILE\|MODEL"):
        component_scores(f"scores:{score_file}", pool)
    raw = component_scores(f"scores:{score_file}|bm25", pool)
    assert raw["1"] == {"a": 0.9, "b": 0.1} and raw["2"] == {"c": 0.8, "d": 0.2}  # the file wins where it has scores
    assert raw["6"] == component_scores("bm25", missing_pool(pool, [("6", "a"), ("6", "c")]))["6"]
    fused = teacher_scores([TeacherSpec.parse(f"scores:{score_file}|bm25*0.5")], pool)
    assert fused["6"] == pytest.approx({d: 0.5 * z for d, z in zscore(raw["6"]).items()})
    with pytest.raises(ValueError, match="does not exist.*fetch-teacher"):
        component_scores(f"scores:{score_file}|{tmp_path / 'no-such-model'}", pool)


def test_missing_pool_keeps_only_the_named_pairs_in_pool_order():
    part = missing_pool(POOL, [("2", "d"), ("1", "b"), ("1", "a")])
    assert list(part) == ["1", "2"] and list(part["1"].documents) == ["a", "b"] and list(part["2"].documents) == ["d"]


def test_train_st_adds_retrieved_queries_but_never_test_queries(tmp_path):
    data = make_data_folder(tmp_path / "data")
    dl = data / "trec-dl"
    write_topics(dl / "topics.dl19-passage.txt", {"901": "what is sparse attention in goldfish"})
    write_topics(dl / "topics.dl20.txt", {})
    topics = write_topics(tmp_path / "dl21.tsv", {"201": "goldfish life", "202": "What is sparse attention in goldfish"})
    args = train_st.parse_args(["--output", str(tmp_path / "out"), "--data", str(data), "--dev-queries", "1",
                                "--retrieved-queries", str(topics), "--retrieved-depth", "3"])
    pool, _, _, dev_ids = train_st.training_pool(args)
    assert set(pool) == {*TOPICS, "201"} and len(pool["201"].documents) == 3 and len(dev_ids) == 1
    (dl / "topics.dl20.txt").unlink()
    with pytest.raises(SystemExit, match="test topics"):
        train_st.training_pool(args)


def test_default_teacher_fills_the_score_files_gaps_with_the_fetched_mpnet(tmp_path):
    from sparse_ce.train import mpnet

    args = train_st.parse_args(["--output", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    specs = train_st.teacher_specs(args)
    assert [spec.weight for spec in specs] == [1.0, 0.3] and specs[1].source == "bm25"
    assert specs[0].source == f"scores:{tmp_path / 'data'}/{train_st.MPNET_SCORES}|{mpnet.DEFAULT_OUTPUT}"
