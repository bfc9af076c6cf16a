"""Checkpoints saved by the original code (Schlatt et al., webis-de/ecir24-sparse-cross-encoder) convert and score as
the original does.

``fixtures/original-sparse-ce-w4`` was written by the original code itself (``experiments/make_original_fixture.py``:
its model class, ``save_pretrained`` and forward with the authors' C++ CPU window kernel, transformers 4.36; seeded),
with the original's scores on fixed pairs. Those scores come from the original with its [SEP] padding bug patched
(the longest document of a batch lost its final [SEP]); the unpatched scores are in the file for information only.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from sparse_ce.cli import main
from sparse_ce.convert import convert

FIXTURE = Path(__file__).parent / "fixtures" / "original-sparse-ce-w4"
RECORD = json.loads((FIXTURE / "scores.json").read_text())
QUERIES = [pair["query"] for pair in RECORD["pairs"] for _ in pair["documents"]]
DOCS = [doc for pair in RECORD["pairs"] for doc in pair["documents"]]
PAPER_FLAGS = dict(cls_query_attention=True, cls_doc_attention=True, query_cls_attention=False,
                   query_doc_attention=False, doc_cls_attention=True, doc_query_attention=True)


def flat(rows):
    return torch.tensor([score for row in rows for score in row])


def scores(folder, batched=True):
    """The converted model's logits on the fixture's pairs: one padded batch, or pair by pair."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        if batched:
            return model(**tokenizer(QUERIES, DOCS, padding=True, return_tensors="pt")).logits[:, 0]
        return torch.cat([model(**tokenizer([q], [d], return_tensors="pt")).logits[:, 0] for q, d in zip(QUERIES, DOCS)])


def pattern_of(folder):
    config = json.loads((folder / "config.json").read_text())
    return config["attention_window_size"], {flag: config[flag] for flag in PAPER_FLAGS}


def test_fixture_is_the_original_format():
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["model_type"] == "bert" and config["transformers_version"] == "4.36.2"
    assert config["architectures"] == ["SparseCrossEncoderModelForSequenceClassification"]
    assert config["attention_window_size"] == 4 and all(config[flag] == on for flag, on in PAPER_FLAGS.items())
    assert RECORD["provenance"]["model_code"]["commit"] == "c423d799d8efd0f0a0f75123f2ffc91023eb9a67"
    assert RECORD["provenance"]["kernel"]["commit"] == "2423e46f098a44bfd5e741b8a9ffddbb9bab7e4f"


def test_original_checkpoint_scores_as_the_original(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_ce.convert"):
        dst = convert(FIXTURE, tmp_path / "out")
    assert "saved by the original sparse cross-encoder code" in caplog.text
    assert "its pattern is window=4, off: query_cls_attention, query_doc_attention" in caplog.text
    assert "missing=none" in caplog.text and "overriding" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert pattern_of(dst) == (4, PAPER_FLAGS)
    card = (dst / "README.md").read_text()
    assert "saved by the original code" in card and "pattern differs" not in card
    expected = flat(RECORD["scores"])
    assert expected.std() > 0.05
    torch.testing.assert_close(scores(dst), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores(dst, batched=False), expected, atol=1e-5, rtol=0)
    # the [SEP] fix matters: the unpatched original scores its longest documents without their final [SEP]
    assert (flat(RECORD["scores_unpatched_original"]) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("options, logged, window, changed", [
    (["--window", "2"], "--window 2 gives window=2, off: query_cls_attention, query_doc_attention", 2, {}),
    (["--pattern", "full"], "--pattern full gives window=none, all directions on", None,
     {"query_cls_attention": True, "query_doc_attention": True}),
])
def test_cli_options_override_the_detected_pattern(tmp_path, caplog, options, logged, window, changed):
    with caplog.at_level(logging.INFO, logger="sparse_ce.convert"):
        assert main(["convert", str(FIXTURE), str(tmp_path / "out"), *options]) == 0
    lines = [r.getMessage() for r in caplog.records if "overriding the source's own" in r.getMessage()]
    assert lines == [f"pattern: {logged}, overriding the source's own "
                     "(window=4, off: query_cls_attention, query_doc_attention)"]
    assert pattern_of(tmp_path / "out") == (window, {**PAPER_FLAGS, **changed})
    assert "pattern differs" in (tmp_path / "out" / "README.md").read_text()


def test_window_0_means_no_window_as_in_the_original(tmp_path, caplog):
    src = tmp_path / "w0"
    shutil.copytree(FIXTURE, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "attention_window_size": 0}))
    # as the published 4,096 model, whose tokenizer config still says 512: the limit follows the position table
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 16}))
    with caplog.at_level(logging.INFO, logger="sparse_ce.convert"):
        dst = convert(src, tmp_path / "out")
    assert [r.levelno for r in caplog.records if "treats as no window" in r.getMessage()] == [logging.WARNING]
    assert pattern_of(dst) == (None, PAPER_FLAGS)
    assert "pattern differs" not in (dst / "README.md").read_text()
    assert AutoTokenizer.from_pretrained(dst).model_max_length == config["max_position_embeddings"] == 64
    torch.testing.assert_close(scores(dst), flat(RECORD["scores_window_0"]), atol=1e-5, rtol=0)
    # asked for explicitly, 0 keeps this package's meaning (a document token sees only itself)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparse_ce.convert"):
        self_only = convert(src, tmp_path / "self-only", window=0)
    assert "treats as no window" not in caplog.text
    assert "--window 0 gives window=0" in caplog.text and "attention_window_size=0 means no window" in caplog.text
    assert pattern_of(self_only)[0] == 0
    assert (scores(self_only) - flat(RECORD["scores_window_0"])).abs().max() > 1e-3


def test_precompute_convert_does_not_import_the_convert_command():
    """Item 7 of issue 24: the shared source helpers live in sparse_ce.sources; no import cycle remains."""
    code = ("import sys, sparse_ce.precompute.convert as p, sparse_ce.sources as s; "
            "assert p.resolve_source is s.resolve_source and p.load_tokenizer is s.load_tokenizer; "
            "assert 'sparse_ce.convert.command' not in sys.modules, 'command imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
