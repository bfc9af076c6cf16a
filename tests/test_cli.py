"""The command line's entry points and its answers to bad input (issue 23, items 3 and 6): one line, exit 2, before
any work, whichever way the command is entered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_ce.cli import main

ENTRY_POINTS = {
    "sparse-ce": [str(Path(sys.executable).with_name("sparse-ce"))],
    "python -m sparse_ce": [sys.executable, "-m", "sparse_ce"],
    "python -m sparse_ce.cli": [sys.executable, "-m", "sparse_ce.cli"],
}


def first_stage(path: Path, queries: list[str]) -> Path:
    """A TREC DL JSON first stage: each query with two short candidates."""
    hits = [{"qid": 0, "docid": "d1", "rank": 1, "score": 2.0, "content": "goldfish grow fast"},
            {"qid": 0, "docid": "d2", "rank": 2, "score": 1.0, "content": "the dog"}]
    path.write_text(json.dumps([{"query": q, "hits": [{**h, "qid": i, "docid": f"{h['docid']}-{i}"} for h in hits]}
                                for i, q in enumerate(queries, 1)]))
    return path


@pytest.mark.parametrize("argv, message", [
    (["rerank", "--model", "/no/such/model", "--dl-json", "x.json", "--output", "x.run"],
     "sparse-ce rerank: --dl-json: [Errno 2] No such file or directory: 'x.json'"),  # a UsageError of the command
])
def test_every_entry_point_answers_a_usage_error_in_one_line_with_exit_2(tmp_path, argv, message):
    answers = set()
    for name, command in ENTRY_POINTS.items():
        done = subprocess.run([*command, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        err = done.stderr.strip()
        assert done.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert message is None or err == message, (name, err)
        answers.add(err)
    assert len(answers) == 1  # the same line from each


def answer(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``sparse-ce argv`` run in this process (an argparse error exits)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize("queries, extra, message", [
    (["do goldfish grow", ""], [], "sparse-ce rerank: query '2': empty query"),
    (["do goldfish grow", " ".join(["flea"] * 130)], [], "sparse-ce rerank: query '2': 130 tokens leave -5 of "
     "max_length 128 for the document (at least 8 needed); shorten the query or raise max_length"),
    (["do goldfish grow"], ["--tag", "my run"], "sparse-ce rerank: argument --tag: a run tag is one word"),
    (["do goldfish grow"], ["--tag", ""], "sparse-ce rerank: argument --tag: a run tag is one word"),
    (["do goldfish grow"], ["--threads", "0"], "sparse-ce rerank: argument --threads: expected a positive integer"),
    (["do goldfish grow"], ["--batch-tokens", "0"], "sparse-ce rerank: argument --batch-tokens: expected a positive"),
    (["do goldfish grow"], ["--max-length", "-1"], "sparse-ce rerank: argument --max-length: expected a positive"),
    (["do goldfish grow"], ["--limit-queries", "0"], "sparse-ce rerank: argument --limit-queries: expected a positive"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_model_dir, tmp_path, capsys, queries, extra, message):
    output = tmp_path / "out.run"
    argv = ["rerank", "--model", str(tiny_model_dir), "--dl-json", str(first_stage(tmp_path / "dl.json", queries)),
            "--output", str(output), "--no-progress", *extra]
    status, err = answer(argv, capsys)
    assert status == 2 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert not output.exists()


@pytest.mark.parametrize("extra", [["--depth", "0"], ["--limit-queries", "0"], ["--threads", "0"]])
def test_evaluate_refuses_non_positive_counts(tmp_path, capsys, extra):
    status, err = answer(["evaluate", "--system", "a=b", "--output-dir", str(tmp_path / "o"), *extra], capsys)
    assert status == 2 and err.startswith(f"sparse-ce evaluate: argument {extra[0]}: expected a positive integer")
    assert not (tmp_path / "o").exists()


def test_a_good_tag_is_written_in_every_run_line(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "out.run"
    argv = ["rerank", "--model", str(tiny_model_dir), "--dl-json", str(first_stage(tmp_path / "dl.json", ["dog"])),
            "--output", str(output), "--no-progress", "--tag", "my-run"]
    assert main(argv) == 0
    assert [line.split()[5] for line in output.read_text().splitlines()] == ["my-run", "my-run"]


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_an_empty_query_in_a_collection_stops_evaluate_and_analyze_before_any_work(
        spread_model_dir, tmp_path, capsys, command):
    from tiny import make_data_folder

    data = make_data_folder(tmp_path / "data")
    dl19 = data / "trec-dl" / "bm25_top100_dl19.json"
    entries = json.loads(dl19.read_text())
    entries[0]["query"] = ""
    dl19.write_text(json.dumps(entries))
    out = tmp_path / "out"
    argv = {"evaluate": ["evaluate", "--system", f"m={spread_model_dir}", "--output-dir", str(out)],
            "analyze": ["analyze", "ablate", "--model", str(spread_model_dir), "--output-dir", str(out)]}[command]
    status, err = answer([*argv, "--collections", "dl19", "--data", str(data), "--no-progress"], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "empty query" in err, err
    assert not out.exists()
