"""Every command checks its output location and its input before it computes (issue 24 item 6): one line, exit 2,
no work done. ``/proc`` takes no new file even for root, so a location under it is unwritable on any Linux machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sparse_ce.cli import main
from sparse_ce.errors import UsageError, check_output

ROOT = Path(__file__).parents[1]
MODEL = str(ROOT / "models" / "sparse-ce-minilm-l6-w4")
UNWRITABLE = "/proc/sparse-ce-test/out"


def one_line_exit_2(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_check_output_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    check_output(tmp_path / "new" / "deeper" / "run.txt", "--output")  # missing folders are fine (made on write)
    check_output(tmp_path / "new-folder", "--output-dir", folder=True)
    assert not (tmp_path / "new").exists() and not (tmp_path / "new-folder").exists()  # nothing is created
    for path, folder, message in [(tmp_path / "folder", False, "is a folder"), (tmp_path / "file", True, "is a file"),
                                  (tmp_path / "file" / "x.run", False, "is a file, so"),
                                  (Path(UNWRITABLE), False, "cannot write in /proc")]:
        with pytest.raises(UsageError, match=message):
            check_output(path, "--output", folder=folder)


@pytest.mark.parametrize("argv", [
    ["rerank", "--model", MODEL, "--dl-json", "DL19", "--output", UNWRITABLE + ".run"],
    ["evaluate", "--system", f"w4={MODEL}", "--output-dir", UNWRITABLE],
    ["analyze", "ablate", "--model", MODEL, "--collections", "dl19", "--output-dir", UNWRITABLE],
    ["index", "--model", MODEL, "--corpus", "corpus.jsonl", "--output", UNWRITABLE],
    ["bench", "--smoke", "--output-dir", UNWRITABLE],
    ["convert", MODEL, UNWRITABLE],
], ids=lambda argv: argv[0])
def test_every_command_refuses_an_unwritable_output_first(argv, capsys, tmp_path):
    dl19 = ROOT.parent / "shared" / "data" / "trec-dl" / "bm25_top100_dl19.json"
    argv = [str(dl19) if a == "DL19" else str(tmp_path / a) if a == "corpus.jsonl" else a for a in argv]
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "a passage"}\n')
    one_line_exit_2(argv, capsys, UNWRITABLE, "cannot write in /proc")


def test_train_st_refuses_an_unwritable_output_first(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        import train_st
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit) as stop:
        train_st.parse_args(["--output", UNWRITABLE])
    assert stop.value.code == 2 and "cannot write in /proc" in capsys.readouterr().err


def test_rerank_refuses_an_empty_first_stage_and_convert_a_missing_source(capsys, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([]))
    one_line_exit_2(["rerank", "--model", MODEL, "--dl-json", str(empty), "--output", str(tmp_path / "x.run")], capsys,
                    "no query with candidates")
    assert not (tmp_path / "x.run").exists()
    one_line_exit_2(["convert", str(tmp_path / "no-such-model"), str(tmp_path / "out")], capsys, "src:")
    assert not (tmp_path / "out").exists()


def test_analyze_names_its_extra_before_any_work(capsys, monkeypatch, tmp_path):
    """Without matplotlib (its figures come last) analyze stops at once, naming the extra (issue 26 item 8)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    one_line_exit_2(["analyze", "ablate", "--model", MODEL, "--collections", "dl19", "--output-dir", str(tmp_path / "a")],
                    capsys, "needs matplotlib", "pip install 'sparse-ce[analysis]'")
    assert not (tmp_path / "a").exists()
