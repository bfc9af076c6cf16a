"""``sparse-ce evaluate``: collections, BM25 first stages, measures, the paired TOST and the tables."""

from __future__ import annotations

import json
import random
from pathlib import Path

import ir_measures
import pytest
from scipy import stats
from tiny import GRADES, PASSAGES, TOPICS, make_bi_encoder_folder, make_data_folder

from sparse_ce.cli import main
from sparse_ce.data.collections import bm25_run, load_collection
from sparse_ce.data import read_run
from sparse_ce.eval.equivalence import equivalence_summary, queries_for_power, tost, tost_power
from sparse_ce.eval.evaluate import compare, measure_run, truncate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("data"))


def test_tost_matches_its_definition():
    rng = random.Random(0)
    for _ in range(20):
        diffs = [rng.gauss(rng.uniform(-0.03, 0.03), rng.uniform(0.01, 0.1)) for _ in range(rng.randint(5, 60))]
        n = len(diffs)
        mean = sum(diffs) / n
        se = (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5
        lower = stats.t.sf((mean + 0.02) / se, n - 1)  # H0: mean <= -0.02
        upper = stats.t.cdf((mean - 0.02) / se, n - 1)  # H0: mean >= +0.02
        assert tost(diffs, 0.02) == pytest.approx(max(lower, upper), rel=1e-9)


def test_tost_separates_equivalent_from_different():
    rng = random.Random(1)
    close = [rng.gauss(0.0, 0.02) for _ in range(200)]
    far = [rng.gauss(0.05, 0.02) for _ in range(200)]
    assert tost(close, 0.02) < 0.05
    assert tost(far, 0.02) > 0.5
    assert tost([0.01], 0.02) == 1.0  # one query is no evidence
    assert tost([0.0, 0.0, 0.0], 0.02) == 0.0 and tost([0.03, 0.03], 0.02) == 1.0


@pytest.mark.parametrize("sd,n,delta", [(0.1, 60, 0.0), (0.05, 40, 0.0), (0.08, 200, 0.01), (0.15, 90, -0.005)])
def test_tost_power_matches_simulation(sd, n, delta):
    """The power formula against the rate at which simulated TOSTs conclude equivalence."""
    rng = random.Random(2)
    runs = 2000
    hits = sum(tost([rng.gauss(delta, sd) for _ in range(n)], 0.02) < 0.05 for _ in range(runs))
    assert tost_power(sd, n, 0.02, delta) == pytest.approx(hits / runs, abs=0.035)


def test_queries_for_power_is_the_smallest_sufficient_count():
    n = queries_for_power(0.1, 0.02)
    assert tost_power(0.1, n, 0.02) >= 0.8 > tost_power(0.1, n - 1, 0.02)
    assert queries_for_power(0.1, 0.02, delta=0.03) is None  # a true Δ outside the bound is never equivalent
    assert queries_for_power(0.2, 0.02) > n  # more spread, more queries


def test_equivalence_summary_interval_agrees_with_tost():
    rng = random.Random(3)
    for _ in range(20):
        diffs = [rng.gauss(rng.uniform(-0.02, 0.02), rng.uniform(0.005, 0.05)) for _ in range(rng.randint(10, 300))]
        summary = equivalence_summary(diffs, 0.02)
        inside = -0.02 < summary["ci"][0] and summary["ci"][1] < 0.02
        assert inside == (summary["tost_p"] < 0.05)  # TOST at α ⇔ the (1 - 2α) interval inside the bound
        assert summary["ci"][0] < summary["delta"] < summary["ci"][1]


def test_bm25_run_ranks_term_matches_first():
    docs = {"a": "goldfish grow in water", "b": "the dog barks", "c": "goldfish goldfish and more goldfish"}
    run = bm25_run({"q": "growing goldfish"}, docs, depth=10)
    assert [d for d, _ in run["q"]][:2] in (["a", "c"], ["c", "a"])
    assert "b" not in dict(run["q"])  # no shared term: score 0, not retrieved


@pytest.mark.parametrize("name,relevant_grade", [("dl19", 2), ("dl20", 2), ("vaswani", 1), ("scifact", 1)])
def test_collections_load_judged_queries_with_texts(data, tmp_path, name, relevant_grade):
    collection = load_collection(name, data, tmp_path, depth=5)
    stage = collection.first_stage
    assert set(stage.queries) <= set(TOPICS) and stage.queries
    assert collection.relevant_grade == relevant_grade
    for hits in stage.candidates.values():
        assert hits and all(PASSAGES[c.docid] == c.text for c in hits)
        assert [c.score for c in hits] == sorted((c.score for c in hits), reverse=True)
    if name in ("vaswani", "scifact"):  # BM25 retrieved and cached
        assert len(list((tmp_path / "bm25").glob(f"{name}-top5-*.run"))) == 1
        assert all(len(hits) <= 5 for hits in stage.candidates.values())


def test_bm25_cache_is_keyed_by_its_inputs(data, tmp_path):
    """A changed corpus or topic never reuses a cached run of the same name and depth."""
    first = load_collection("vaswani", data, tmp_path, depth=5)
    (cached,) = (tmp_path / "bm25").glob("vaswani-top5-*.run")
    cached.write_text("".join(f"{q} Q0 p10 1 9.0 x\n" for q in first.first_stage.queries))  # a marker run
    assert all([c.docid for c in hits] == ["p10"] for hits in load_collection("vaswani", data, tmp_path, 5)
               .first_stage.candidates.values())  # same inputs: the cache is read
    corpus = data / "vaswani" / "doc-text.trec"
    original = corpus.read_text()
    try:
        corpus.write_text(original.replace("light and heat", "light and heat and goldfish"))
        again = load_collection("vaswani", data, tmp_path, depth=5)
    finally:
        corpus.write_text(original)
    assert len(list((tmp_path / "bm25").glob("vaswani-top5-*.run"))) == 2
    assert any([c.docid for c in hits] != ["p10"] for hits in again.first_stage.candidates.values())


def test_unknown_collection_is_named(data, tmp_path):
    with pytest.raises(ValueError, match="unknown 'dl18'"):
        load_collection("dl18", data, tmp_path)


def test_measure_run_agrees_with_ir_measures_and_counts_lost_queries_as_zero(data, tmp_path):
    collection = truncate(load_collection("dl19", data, tmp_path), depth=6, limit_queries=None)
    run = {qid: [(c.docid, -i) for i, c in enumerate(hits)] for qid, hits in collection.first_stage.candidates.items()}
    measured = measure_run(collection, run)
    qrels = list(collection.qrels)
    scored = [ir_measures.ScoredDoc(q, d, s) for q, hits in run.items() for d, s in hits]
    expected = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, scored)[ir_measures.nDCG @ 10]
    assert measured["mean"]["nDCG@10"] == pytest.approx(expected)
    assert measured["queries"] == len(GRADES)
    lost = dict(run)
    del lost["101"]
    assert measure_run(collection, lost)["per_query"]["101"] == 0.0
    assert measure_run(collection, lost)["mean"]["nDCG@10"] < measured["mean"]["nDCG@10"]


def test_compare_deltas_are_paired_differences():
    per_query = {"c": {"base": {"mean": {"nDCG@10": 0.5}, "per_query": {"1": 0.4, "2": 0.6}, "queries": 2},
                       "sys": {"mean": {"nDCG@10": 0.55}, "per_query": {"1": 0.5, "2": 0.6}, "queries": 2}}}
    results = compare(per_query, "base", 0.02)
    assert results["collections"]["c"]["sys"]["delta"] == pytest.approx(0.05)
    assert results["collections"]["c"]["base"]["delta"] == 0.0
    assert results["pooled"]["sys"]["queries"] == 2


def test_evaluate_command_writes_runs_tables_and_reuses_runs(data, tmp_path, tiny_model_dir, capsys):
    bi_encoder = make_bi_encoder_folder(tmp_path / "bi")
    out = tmp_path / "eval"
    argv = ["evaluate", "--system", f"ce={tiny_model_dir}", f"bi={bi_encoder}", "--collections", "dl19", "vaswani",
            "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--depth", "8"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| `ce` (baseline) |" in table and "| `bi` |" in table and "| `bm25` |" in table
    results = json.loads((out / "results.json").read_text())
    for collection in ("dl19", "vaswani"):
        for system in ("ce", "bi"):
            run = read_run(out / "runs" / f"{system}-{collection}-top8.run")
            assert all(len(hits) <= 8 for hits in run.values())
            assert results["collections"][collection][system]["queries"] > 0
    assert results["setup"]["baseline"] == "ce"
    pooled = results["pooled"]["bi"]  # with its interval and power, in the JSON and the table
    assert pooled["ci"][0] <= pooled["delta"] <= pooled["ci"][1] and 0.0 <= pooled["power_at_zero"] <= 1.0
    assert "power at Δ=0" in table and sum(line.startswith("| `bi` |") for line in table.splitlines()) == 3
    # a reused run is not recomputed: overwrite one with a perfect ranking and see the score follow it
    perfect = {q: [(d, float(g)) for d, g in docs.items()] for q, docs in GRADES.items()}
    (out / "runs" / "bi-dl19-top8.run").write_text(
        "".join(f"{q} Q0 {d} {r} {s} x\n" for q, hits in perfect.items()
                for r, (d, s) in enumerate(sorted(hits, key=lambda h: -h[1]), 1))
    )
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["collections"]["dl19"]["bi"]["nDCG@10"] == pytest.approx(1.0)
    assert "| `bi` |" in (out / "results.md").read_text()


def test_evaluate_rejects_bad_systems(data, tmp_path, capsys):
    assert main(["evaluate", "--system", "nomodel", "--output-dir", str(tmp_path)]) == 2
    assert "--system: expected NAME=MODEL" in capsys.readouterr().err
    assert main(["evaluate", "--system", "bm25=x", "--output-dir", str(tmp_path)]) == 2
    assert "reserved" in capsys.readouterr().err
