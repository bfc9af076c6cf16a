"""``sparse-ce rerank`` and the first-stage readers and run writer behind it."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import ir_measures
import pytest
from ir_measures import nDCG

from sparse_ce.cli import main
from sparse_ce.data import iter_corpus, read_corpus, read_dl_json, read_run, read_topics, write_run
from sparse_ce.rank import PairScorer

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"

QUERIES = {"1": "how long is life cycle of flea", "2": "do goldfish grow"}
DOCS = {
    "1": {
        "d1": "a flea can live up to a year",
        "d2": "the dog and the cat",
        "d3": "flea life cycle is long in cold water",
        "d4": "wifi vs bluetooth",
        "d5": "",
    },
    "2": {
        "e1": "goldfish grow fast in water",
        "e2": "the war year",
        "e3": "do goldfish grow slow in cold water",
        "e4": "how fast does a dog grow",
        "e5": "light and heat",
    },
}
QRELS = "1 0 d1 3\n1 0 d3 2\n1 0 d2 0\n2 0 e1 1\n2 0 e3 3\n"


@pytest.fixture
def collection(tmp_path) -> dict[str, Path]:
    """2 queries x 5 documents as DL JSON, qrels, TREC run, TSV topics and corpora in three formats."""
    entries = [
        {
            "query": QUERIES[qid],
            "hits": [
                {"qid": int(qid), "docid": docid, "rank": rank, "score": 10.0 - rank, "content": text}
                for rank, (docid, text) in enumerate(DOCS[qid].items(), 1)
            ],
        }
        for qid in QUERIES
    ]
    files = {name: tmp_path / name for name in ("dl.json", "qrels.txt", "first.run", "topics.tsv.gz")}
    files["dl.json"].write_text(json.dumps(entries))
    files["qrels.txt"].write_text(QRELS)
    files["first.run"].write_text(
        "".join(
            f"{qid} Q0 {docid} {rank} {10.0 - rank} bm25\n"
            for qid in QUERIES
            for rank, docid in enumerate(DOCS[qid], 1)
        )
    )
    with gzip.open(files["topics.tsv.gz"], "wt") as f:
        f.write("".join(f"{qid}\t{text}\n" for qid, text in QUERIES.items()))
    texts = {docid: text for docs in DOCS.values() for docid, text in docs.items()}
    texts["unused"] = "never read"
    files["jsonl"] = tmp_path / "corpus.jsonl"
    files["jsonl"].write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in texts.items()))
    files["tsv"] = tmp_path / "corpus.tsv"
    files["tsv"].write_text("".join(f"{d}\t{t}\n" for d, t in texts.items()))
    files["trec"] = tmp_path / "corpus.trec"
    files["trec"].write_text("".join(f"<DOC>\n<DOCNO>{d}</DOCNO>\n{t}\n</DOC>\n" for d, t in texts.items()))
    return files


def read_written_run(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    run: dict[str, list[tuple[str, int, float]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, docid, rank, score, tag = line.split()
        assert (q0, tag) == ("Q0", "sparse-ce")
        run.setdefault(qid, []).append((docid, int(rank), float(score)))
    return run


def printed_ndcg(out: str) -> float:
    return float(re.search(r"nDCG@10=([0-9.]+)", out).group(1))


def test_rerank_dl_json_writes_valid_run_and_prints_ndcg(spread_model_dir, collection, tmp_path, capsys):
    tiny_model_dir = spread_model_dir  # scores ~0.1 apart: a score on the wrong document shows (issue 23)
    output = tmp_path / "out" / "reranked.run"
    args = ["rerank", "--model", str(tiny_model_dir), "--dl-json", str(collection["dl.json"]), "--output", str(output)]
    assert main([*args, "--qrels", str(collection["qrels.txt"]), "--no-progress", "--batch-tokens", "40",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    run = read_written_run(output)
    assert list(run) == list(QUERIES)
    scorer = PairScorer(str(tiny_model_dir), progress=False)
    for qid, hits in run.items():
        assert sorted(docid for docid, _, _ in hits) == sorted(DOCS[qid])
        assert [rank for _, rank, _ in hits] == list(range(1, len(DOCS[qid]) + 1))
        assert [score for _, _, score in hits] == sorted((score for _, _, score in hits), reverse=True)
        expected, _ = scorer.score([QUERIES[qid]] * len(hits), [DOCS[qid][docid] for docid, _, _ in hits])
        assert [score for _, _, score in hits] == pytest.approx(expected, abs=1e-5)  # each score on its document
        assert max(expected) - min(expected) > 1e-2
    qrels = list(ir_measures.read_trec_qrels(str(collection["qrels.txt"])))
    ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, ir_measures.read_trec_run(str(output)))[nDCG @ 10]
    assert printed_ndcg(out) == pytest.approx(ndcg, abs=5e-5)
    assert "RR(rel=2)@10=" in out and "R(rel=2)@100=" in out and "(queries judged: 2)" in out  # TREC DL: grade ≥ 2
    assert f"run: {output}" in out
    assert "documents cut to max_length 128: 0 of 10" in out
    assert "ms per query" in out and re.search(r"10 pairs in [0-9.]+ s: [0-9.]+ pairs/s", out)


@pytest.mark.parametrize("corpus", ["jsonl", "tsv", "trec"])
def test_rerank_run_topics_corpus_equals_dl_json(tiny_model_dir, collection, tmp_path, corpus):
    common = ["--model", str(tiny_model_dir), "--no-progress"]
    main(["rerank", *common, "--dl-json", str(collection["dl.json"]), "--output", str(tmp_path / "a.run")])
    main(
        [
            "rerank",
            *common,
            "--output",
            str(tmp_path / "b.run"),
            "--run",
            str(collection["first.run"]),
            "--topics",
            str(collection["topics.tsv.gz"]),
            "--corpus",
            str(collection[corpus]),
        ]
    )
    assert (tmp_path / "b.run").read_text() == (tmp_path / "a.run").read_text()


def test_limit_queries_and_maxp(tiny_model_dir, collection, tmp_path, capsys):
    output = tmp_path / "one.run"
    main(
        [
            "rerank",
            "--model",
            str(tiny_model_dir),
            "--dl-json",
            str(collection["dl.json"]),
            "--output",
            str(output),
            "--limit-queries",
            "1",
            "--maxp",
            "--max-length",
            "18",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert list(read_written_run(output)) == ["1"]
    assert "documents cut to max_length 18: 0 of 5" in out
    assert int(re.search(r"split into MaxP windows: (\d+) of 5", out).group(1)) > 0


def test_metrics_cover_reranked_queries_only(tiny_model_dir, collection, tmp_path, capsys):
    output = tmp_path / "one.run"
    main(
        [
            "rerank",
            "--model",
            str(tiny_model_dir),
            "--dl-json",
            str(collection["dl.json"]),
            "--output",
            str(output),
            "--qrels",
            str(collection["qrels.txt"]),
            "--limit-queries",
            "1",
            "--measures",
            "nDCG@10",
            "RR(rel=2)@10",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    qrels = list(ir_measures.read_trec_qrels(str(collection["qrels.txt"])))
    (per_query,) = [
        m.value
        for m in ir_measures.iter_calc([nDCG @ 10], qrels, ir_measures.read_trec_run(str(output)))
        if m.query_id == "1"
    ]
    assert printed_ndcg(out) == pytest.approx(per_query, abs=5e-5)  # not diluted by the query left out
    assert "RR(rel=2)@10=" in out and "R@100" not in out and "(queries judged: 1)" in out


def test_rerank_needs_one_kind_of_input(tiny_model_dir, collection, tmp_path, capsys):
    base = ["rerank", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.run")]
    assert main([*base, "--run", str(collection["first.run"])]) == 2
    assert "either --dl-json" in capsys.readouterr().err
    assert main([*base, "--dl-json", str(collection["dl.json"]), "--run", str(collection["first.run"])]) == 2
    assert "either --dl-json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not JSON"),
        ('{"query": "x"}', "expected a JSON list"),
        ('[{"query": "x"}]', "entry 0 is not"),
        ('[{"query": "x", "hits": [{"qid": 1, "docid": "a", "rank": 1, "score": 1}]}]', "a hit without content"),
    ],
)
def test_bad_input_is_one_line_naming_the_argument(tiny_model_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["rerank", "--model", str(tiny_model_dir), "--dl-json", str(bad), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-ce rerank: --dl-json:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("model", ["missing-folder", "./nope", "/no/such/model"])
def test_missing_model_folder_is_one_line(collection, tmp_path, capsys, model):
    args = ["rerank", "--model", model, "--dl-json", str(collection["dl.json"]), "--output", str(tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sparse-ce rerank: --model {model}: no such folder"


def test_folder_without_config_is_not_a_model(collection, tmp_path, capsys):
    args = ["rerank", "--model", str(tmp_path), "--dl-json", str(collection["dl.json"]), "--output", str(tmp_path / "x")]
    assert main(args) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err


def test_untrained_head_warns(tiny_model_dir, collection, tmp_path, capsys, caplog):
    model = tmp_path / "untrained"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sparse_ce_untrained_head": True}))
    args = [
        "rerank",
        "--model",
        str(model),
        "--dl-json",
        str(collection["dl.json"]),
        "--output",
        str(tmp_path / "u.run"),
    ]
    main([*args, "--no-progress"])
    assert "WARNING" in capsys.readouterr().out
    assert any(
        r.levelname == "WARNING" and "untrained classifier head mean nothing" in r.message for r in caplog.records
    )


def test_trained_head_does_not_warn(tiny_model_dir, collection, tmp_path, capsys):
    main(
        [
            "rerank",
            "--model",
            str(tiny_model_dir),
            "--dl-json",
            str(collection["dl.json"]),
            "--output",
            str(tmp_path / "t.run"),
            "--no-progress",
        ]
    )
    assert "untrained" not in capsys.readouterr().out


def test_read_dl_json_fixes_mojibake(tmp_path):
    path = tmp_path / "moji.json"
    hits = [
        {"qid": 7, "docid": "x", "rank": 2, "score": 1.0, "content": "a flea\u00e2\u20ac\u2122s life"},
        {"qid": 7, "docid": "y", "rank": 1, "score": 2.0, "content": "dog"},
    ]
    path.write_text(json.dumps([{"query": "flea", "hits": hits}]))
    first_stage = read_dl_json(path)
    assert first_stage.queries == {"7": "flea"}
    assert [c.docid for c in first_stage.candidates["7"]] == ["y", "x"]  # rank order
    assert first_stage.candidates["7"][1].text == "a flea's life"
    assert read_dl_json(path, fix_text=False).candidates["7"][1].text == "a flea\u00e2\u20ac\u2122s life"


def test_read_run_orders_by_rank_and_limits(tmp_path):
    path = tmp_path / "r.run"
    path.write_text("5 Q0 b 2 1.0 t\n5 Q0 a 1 2.0 t\n3 Q0 c 1 9.0 t\n")
    assert read_run(path) == {"5": [("a", 2.0), ("b", 1.0)], "3": [("c", 9.0)]}
    assert list(read_run(path, limit=1)) == ["5"]
    path.write_text("5 Q0 b 2\n")
    with pytest.raises(ValueError, match="r.run:1"):
        read_run(path)


def test_read_topics_tsv_and_trec(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("1\thow long\n2\tdo goldfish grow\n")
    assert read_topics(tsv) == {"1": "how long", "2": "do goldfish grow"}
    trec = tmp_path / "t.trec"
    trec.write_text(
        "<top>\n<num>1</num><title>\nMEASUREMENT OF\nLIQUIDS\n</title>\n</top>\n"  # Vaswani style
        "<top>\n<num> Number: 301\n<title> oil spills\n<desc> x\n</top>\n"  # classic TREC style, no closing tags
    )
    assert read_topics(trec) == {"1": "MEASUREMENT OF LIQUIDS", "301": "oil spills"}


def test_corpus_formats_and_lazy_reading(tmp_path, collection):
    for name in ("jsonl", "tsv", "trec"):
        docs = dict(iter_corpus(collection[name]))
        assert docs["d1"] == "a flea can live up to a year" and docs["d5"] == "" and len(docs) == 11
        assert read_corpus(collection[name], {"e2", "d1"}) == {
            "e2": "the war year",
            "d1": "a flea can live up to a year",
        }
        with pytest.raises(ValueError, match="1 documents of the run are not in the corpus"):
            read_corpus(collection[name], {"d1", "nope"})
    beir = tmp_path / "beir.jsonl"
    beir.write_text(json.dumps({"_id": "9", "title": "Flea", "text": "life cycle"}) + "\n")
    assert dict(iter_corpus(beir)) == {"9": "Flea life cycle"}
    trec = tmp_path / "one-line.trec"
    trec.write_text("<DOC><DOCNO>n1</DOCNO><TEXT>a\nb</TEXT></DOC><DOC><DOCNO> n2 </DOCNO>c</DOC>\n")
    assert dict(iter_corpus(trec)) == {"n1": "a b", "n2": "c"}


def test_write_run_ties_follow_trec_eval(tmp_path):
    path = tmp_path / "ties.run"
    write_run(path, {"q": [("a", 1.0), ("c", 2.0), ("b", 1.0), ("d", 0.5)]})
    assert path.read_text().splitlines() == [
        "q Q0 c 1 2.0 sparse-ce",
        "q Q0 b 2 1.0 sparse-ce",
        "q Q0 a 3 1.0 sparse-ce",
        "q Q0 d 4 0.5 sparse-ce",
    ]


def test_rerank_real_dl19_first_query(tiny_model_dir, tmp_path, capsys):
    dl19 = SHARED_DATA / "trec-dl" / "bm25_top100_dl19.json"
    if not dl19.exists():
        pytest.skip(f"{dl19} is absent")
    output = tmp_path / "dl19.run"
    main(
        [
            "rerank",
            "--model",
            str(tiny_model_dir),
            "--dl-json",
            str(dl19),
            "--output",
            str(output),
            "--qrels",
            str(SHARED_DATA / "trec-dl" / "qrels.dl19-passage.txt"),
            "--limit-queries",
            "1",
            "--no-progress",
        ]
    )
    lines = output.read_text().splitlines()
    assert len(lines) == 100 and len({line.split()[2] for line in lines}) == 100
    assert 0.0 <= printed_ndcg(capsys.readouterr().out) <= 1.0


def test_first_stage_ranking_pairs_scores_in_pair_order(collection):
    stage = read_dl_json(collection["dl.json"])
    qids, _, _ = stage.pairs()
    assert stage.ranking()["1"][0] == ("d1", 9.0)  # first-stage scores by default
    ranking = stage.ranking([float(i) for i in range(len(qids))])
    assert [s for hits in ranking.values() for _, s in hits] == [float(i) for i in range(len(qids))]
    assert [d for d, _ in ranking["2"]] == list(DOCS["2"])
    with pytest.raises(ValueError, match="scores for"):
        stage.ranking([1.0])


@pytest.mark.slow
def test_rerank_under_torchrun_shards_queries_and_writes_one_run(spread_model_dir, collection, tmp_path):
    """Two CPU processes (gloo): each scores every other query, the main process writes the merged run."""
    tiny_model_dir = spread_model_dir  # scores ~0.1 apart: a query's scores on another query's documents show
    import os
    import subprocess
    import sys

    single = tmp_path / "single.run"
    assert main(["rerank", "--model", str(tiny_model_dir), "--dl-json", str(collection["dl.json"]), "--output",
                 str(single), "--no-progress", "--dtype", "float32"]) == 0
    merged = tmp_path / "merged.run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "-m",
               "sparse_ce.cli", "rerank", "--model", str(tiny_model_dir), "--dl-json", str(collection["dl.json"]),
               "--output", str(merged), "--qrels", str(collection["qrels.txt"]), "--no-progress", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run: ") == 1 and "2 process(es) x 1 thread(s)" in result.stdout
    expected, got = read_written_run(single), read_written_run(merged)
    assert list(got) == list(expected)  # queries in first-stage order, each complete
    for qid in expected:
        assert [d for d, _, _ in got[qid]] == [d for d, _, _ in expected[qid]]
        assert [s for _, _, s in got[qid]] == pytest.approx([s for _, _, s in expected[qid]], abs=1e-5)


def test_dtype_auto_is_bfloat16_only_with_bfloat16_arithmetic(monkeypatch):
    import torch

    from sparse_ce import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert runtime.resolve_dtype("auto", cpu) == "float32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert runtime.resolve_dtype("auto", cpu) == "bfloat16"
    assert runtime.resolve_dtype("float32", cpu) == "float32" and runtime.resolve_dtype(None, cpu) is None
