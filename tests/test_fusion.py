"""Fusing a re-ranker with its first stage (``sparse_ce.rank.fusion``) in ``rerank`` and ``evaluate``."""

from __future__ import annotations

import json
import math

import pytest
from tiny import make_data_folder

from sparse_ce.cli import main
from sparse_ce.data import Candidate, FirstStage, read_run
from sparse_ce.rank.fusion import fuse_first_stage, zscore

QUERIES = {"1": "how long is life cycle of flea", "2": "do goldfish grow"}
DOCS = {  # first-stage order with descending BM25 scores
    "1": [("d1", "a flea can live up to a year"), ("d2", "the dog and the cat"), ("d3", "flea life cycle is long")],
    "2": [("e1", "goldfish grow fast"), ("e2", "wifi vs bluetooth"), ("e3", "goldfish in cold water")],
}


def first_stage() -> FirstStage:
    return FirstStage(dict(QUERIES), {q: [Candidate(d, t, 10.0 - i) for i, (d, t) in enumerate(docs)]
                                      for q, docs in DOCS.items()})


def test_fusion_is_the_weighted_sum_of_per_query_z_scores():
    stage = first_stage()
    run = {"1": [("d1", 0.1), ("d2", 0.9), ("d3", 0.5)], "2": [("e1", -2.0), ("e2", 4.0), ("e3", 1.0)]}
    fused = fuse_first_stage(run, stage, 0.3)
    for qid, hits in run.items():
        model = dict(hits)
        mean = sum(model.values()) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in model.values()) / 3)
        lexical = {c.docid: c.score for c in stage.candidates[qid]}
        expected = {d: (model[d] - mean) / std + 0.3 * (lexical[d] - 9.0) / math.sqrt(2 / 3) for d in model}
        assert dict(fused[qid]) == pytest.approx(expected)
    assert fuse_first_stage(run, stage, 0.0) == {q: list(zscore(dict(h)).items()) for q, h in run.items()}
    assert zscore({"a": 2.0, "b": 2.0}) == {"a": 0.0, "b": 0.0}  # ties: no division by zero


def test_fusion_refuses_unknown_documents_and_bad_weights():
    stage = first_stage()
    with pytest.raises(ValueError, match="query 1: 1 re-ranked documents have no first-stage score, e.g. 'zz'"):
        fuse_first_stage({"1": [("d1", 1.0), ("zz", 0.0)]}, stage, 0.5)
    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            fuse_first_stage({"1": [("d1", 1.0)]}, stage, weight)


def write_dl_json(path):
    """QUERIES and DOCS as a TREC DL JSON first stage (BM25 scores descending in DOCS' order)."""
    path.write_text(json.dumps([
        {"query": QUERIES[q],
         "hits": [{"qid": q, "docid": d, "rank": i + 1, "score": 10.0 - i, "content": t} for i, (d, t) in enumerate(docs)]}
        for q, docs in DOCS.items()
    ]))
    return path


def test_rerank_fuse_first_stage_moves_the_ranking_toward_bm25(tiny_model_dir, tmp_path, capsys):
    dl_json = write_dl_json(tmp_path / "dl.json")
    common = ["rerank", "--model", str(tiny_model_dir), "--dl-json", str(dl_json), "--no-progress", "--dtype", "float32"]
    assert main([*common, "--output", str(tmp_path / "plain.run")]) == 0
    assert main([*common, "--output", str(tmp_path / "fused.run"), "--fuse-first-stage", "0.5"]) == 0
    assert "z(model) + 0.5 * z(first stage)" in capsys.readouterr().out
    plain, fused = read_run(tmp_path / "plain.run"), read_run(tmp_path / "fused.run")
    expected = fuse_first_stage(plain, first_stage(), 0.5)
    for qid in QUERIES:
        assert dict(fused[qid]) == pytest.approx(dict(expected[qid]), abs=1e-9)
    assert main([*common, "--output", str(tmp_path / "lexical.run"), "--fuse-first-stage", "1e6"]) == 0
    lexical = read_run(tmp_path / "lexical.run")
    assert {q: [d for d, _ in hits] for q, hits in lexical.items()} == {q: [d for d, _ in docs] for q, docs in DOCS.items()}
    assert main([*common, "--output", str(tmp_path / "bad.run"), "--fuse-first-stage", "-1"]) == 2
    assert "--fuse-first-stage: expected a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.run").exists()


def test_evaluate_reports_the_fused_system_from_its_run(tiny_model_dir, tmp_path, capsys):
    data = make_data_folder(tmp_path / "data")
    out = tmp_path / "eval"
    argv = ["evaluate", "--system", f"ce={tiny_model_dir}", "--collections", "dl19", "--data", str(data),
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--depth", "8", "--fuse-first-stage", "0.3"]
    assert main(argv) == 0
    assert "| `ce+bm25` |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["fuse_first_stage"] == {"ce": 0.3}
    runs = out / "runs"
    fused = read_run(runs / "ce+bm25-dl19-top8.run")
    plain = read_run(runs / "ce-dl19-top8.run")
    from sparse_ce.data.collections import load_collection

    stage = load_collection("dl19", data, tmp_path / "cache", 8).first_stage
    expected = fuse_first_stage(plain, stage, 0.3)
    assert fused.keys() == expected.keys()
    for qid, hits in fused.items():
        assert dict(hits) == pytest.approx(dict(expected[qid]))
    assert results["collections"]["dl19"]["ce+bm25"]["queries"] == results["collections"]["dl19"]["ce"]["queries"]
    assert main([*argv[:-1], "-2"]) == 2


def test_auto_reads_the_weight_stored_with_the_model(tiny_model_dir, tmp_path, capsys):
    """``--fuse-first-stage auto`` uses the model's ``first_stage_fusion_weight``; none stored: one line, exit 2."""
    import shutil

    from sparse_ce.rank.fusion import STORED_WEIGHT_FIELD, resolve_weight

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    dl_json = write_dl_json(tmp_path / "dl.json")
    common = ["rerank", "--model", str(model), "--dl-json", str(dl_json), "--no-progress", "--dtype", "float32"]
    assert main([*common, "--output", str(tmp_path / "none.run"), "--fuse-first-stage", "auto"]) == 2
    assert f"stores no {STORED_WEIGHT_FIELD}" in capsys.readouterr().err and not (tmp_path / "none.run").exists()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, STORED_WEIGHT_FIELD: 0.5}))
    assert resolve_weight("auto", str(model)) == 0.5 and resolve_weight(0.2, str(model)) == 0.2
    assert main([*common, "--output", str(tmp_path / "auto.run"), "--fuse-first-stage", "auto"]) == 0
    assert main([*common, "--output", str(tmp_path / "half.run"), "--fuse-first-stage", "0.5"]) == 0
    assert read_run(tmp_path / "auto.run") == read_run(tmp_path / "half.run")
    assert "z(model) + 0.5 * z(first stage)" in capsys.readouterr().out
