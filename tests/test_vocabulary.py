"""One vocabulary across the commands (issue 23, item 5): thresholds in every measure's label, one relevance
default per collection, the shared option names and their deprecated aliases."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ir_measures
import pytest
from tiny import make_data_folder

from sparse_ce.cli import main
from sparse_ce.data.collections import load_collection, measure_label
from sparse_ce.eval.evaluate import markdown_single, measure_run, truncate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_folder(tmp_path_factory.mktemp("data"))


def test_every_binary_label_names_its_threshold():
    assert [measure_label(ir_measures.parse_measure(m)) for m in ("nDCG@10", "RR@10", "RR(rel=2)@10", "R@100", "AP")] \
        == ["nDCG@10", "RR(rel=1)@10", "RR(rel=2)@10", "R(rel=1)@100", "AP(rel=1)"]


def test_rerank_and_evaluate_give_one_meaning_to_rr_on_trec_dl(data, spread_model_dir, tmp_path, capsys):
    """DL19 through rerank (DL JSON) and evaluate: the same run, the same RR@10 cut (grade ≥ 2), one label."""
    run = tmp_path / "dl19.run"
    dl19 = data / "trec-dl" / "bm25_top100_dl19.json"
    qrels = data / "trec-dl" / "qrels.dl19-passage.txt"
    base = ["rerank", "--model", str(spread_model_dir), "--dl-json", str(dl19), "--qrels", str(qrels), "--output",
            str(run), "--no-progress", "--dtype", "float32"]
    assert main(base) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "(queries judged" in line]
    printed = dict(re.findall(r"(\S+)=([0-9.]+)", line))
    collection = truncate(load_collection("dl19", data, tmp_path), 100, None)
    from sparse_ce.data import read_run

    measured = measure_run(collection, read_run(run))["mean"]
    assert set(printed) == {"nDCG@10", "RR(rel=2)@10", "R(rel=2)@100"}
    for label, value in printed.items():
        assert float(value) == pytest.approx(measured[label], abs=5e-5)
    lenient = ir_measures.calc_aggregate([ir_measures.RR @ 10], list(ir_measures.read_trec_qrels(str(qrels))),
                                         ir_measures.read_trec_run(str(run)))[ir_measures.RR @ 10]
    assert lenient != pytest.approx(measured["RR(rel=2)@10"], abs=1e-3)  # the cut matters on these judgements
    assert main([*base, "--relevant-grade", "1"]) == 0  # asked for: the lenient cut, named as such
    assert f"RR(rel=1)@10={lenient:.4f}" in capsys.readouterr().out


def test_evaluate_labels_carry_thresholds_and_model_card_names_them(data, spread_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--system", f"m={spread_model_dir}", "--collections", "dl19", "vaswani", "--data",
                 str(data), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--depth", "6",
                 "--no-progress", "--fuse-first-stage", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "RR(rel=2)@10" in results["collections"]["dl19"]["m"] and "RR(rel=1)@10" in results["collections"]["vaswani"]["m"]
    assert set(results["collections"]["dl19"]) == {"m", "bm25"}  # --fuse-first-stage 0: no fused row
    table = (out / "results.md").read_text()
    assert "dl19 RR(rel=2)@10" in table and "vaswani RR(rel=1)@10" in table
    card = markdown_single({c: {**{k: v for k, v in rows["m"].items() if "@" in k}, "queries": 4}
                            for c, rows in results["collections"].items()}, 6, None)
    assert "| dl19 | 4 | grade ≥ 2 |" in card and "| vaswani | 4 | grade ≥ 1 |" in card


def test_evaluate_model_leaves_the_working_directory_alone(data, spread_model_dir, tmp_path, monkeypatch):
    from sparse_ce.eval.evaluate import evaluate_model

    monkeypatch.chdir(tmp_path)
    results = evaluate_model(str(spread_model_dir), ["dl19"], data, depth=4, cache_dir=tmp_path / "cache")
    assert results["dl19"]["queries"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # was: dl19.run written here


def test_analyze_takes_model_and_collections_and_the_old_spellings_say_they_are_deprecated(
        data, spread_model_dir, tmp_path, capsys):
    assert main(["analyze", "svd", "--model", str(spread_model_dir), "--output-dir", str(tmp_path / "new")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["analyze", "svd", str(spread_model_dir), "--output-dir", str(tmp_path / "old")]) == 0
    assert "sparse-ce analyze svd: a positional MODEL is deprecated; use --model MODEL" in capsys.readouterr().err
    assert main(["analyze", "heads", "--model", str(spread_model_dir), "--collection", "dl19", "--data", str(data),
                 "--per-class", "1", "--output-dir", str(tmp_path / "heads"), "--limit-queries", "1"]) == 0
    assert "--collection is deprecated; use --collections" in capsys.readouterr().err
    assert main(["analyze", "svd", "--output-dir", str(tmp_path / "none")]) == 2
    assert "--model: required" in capsys.readouterr().err


def test_no_option_name_means_two_things_across_commands():
    """Every option that two sub-commands share has one help text's meaning: the shared names are checked here."""
    from sparse_ce.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    dtype_help = {}
    for name, command in commands.items():
        for action in command._actions:
            if "--dtype" in action.option_strings and name != "bench":  # bench is timed in its own dtype (see report)
                dtype_help[name] = action
    assert dtype_help["index"].dest == "storage_dtype"  # the alias of --storage-dtype, deprecated
    assert {n for n, a in dtype_help.items() if a.dest == "dtype"} >= {"rerank", "evaluate"}
    for name in ("rerank", "evaluate", "index"):
        flags = {s for a in commands[name]._actions for s in a.option_strings}
        assert "--no-progress" in flags and "--threads" in flags
