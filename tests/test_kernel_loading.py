"""Loading the attention kernel through ``kernels``: fallback, once per process, optional dependency."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from configuration_sparse_ce import DIRECTION_FLAGS
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce.attention_kernel import layout_offsets, load_kernel, pattern_flags
from modeling_sparse_ce.pattern import AttentionPattern
from test_attention import make_layout
from test_model import pairs_batch, ragged_pairs
from tiny import make_config


@pytest.fixture(autouse=True)
def fresh_loader():
    load_kernel.cache_clear()
    yield
    load_kernel.cache_clear()


def test_auto_falls_back_to_windowed_once_and_fast(tiny_tokenizer, caplog, monkeypatch):
    monkeypatch.delenv("SPARSE_CE_KERNEL", raising=False)
    model = SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer)).eval()
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="modeling_sparse_ce.attention_kernel"), torch.no_grad():
        auto = model(**batch).logits
        model(**batch)
        SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer)).eval()(**batch)
    assert time.perf_counter() - start < 10  # offline: no network retries
    fallback = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(fallback) == 1 and "sparse-ce/sparse-attention" in fallback[0].getMessage()
    with torch.no_grad():
        torch.testing.assert_close(auto, model(**batch, attention_backend="windowed").logits, atol=0, rtol=0)


def test_explicit_kernel_backend_without_kernel_is_an_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("SPARSE_CE_KERNEL", "off")
    model = SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer)).eval()
    with pytest.raises(RuntimeError, match="attention_backend='kernel'"):
        model(**pairs_batch(tiny_tokenizer, ragged_pairs()), attention_backend="kernel")


def test_remote_code_imports_and_runs_without_kernels(tiny_model_dir, tmp_path):
    script = f"""
import sys
sys.modules["kernels"] = None  # not installed
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {str(tiny_model_dir)!r}
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules")
print(model(**tok(["do goldfish grow"], ["goldfish grow"], return_tensors="pt")).logits.shape)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 1])" in result.stdout
    assert "not installed" in result.stderr


def test_flag_bits_follow_direction_flag_order():
    for bit, flag in enumerate(DIRECTION_FLAGS):
        flags = {name: name == flag for name in DIRECTION_FLAGS}
        pattern = AttentionPattern.from_config(type("C", (), dict(flags, attention_window_size=None)))
        assert pattern_flags(pattern) == 1 << bit


def test_layout_offsets_delimit_packed_segments():
    layout = make_layout([3, 3, 2], [5, 1, 7], [0, 0, 1], share=True)
    cu_queries, cu_docs = layout_offsets(layout)
    assert cu_queries.tolist() == [3, 6, 8] and cu_docs.tolist() == [8, 13, 14, 21]
    assert cu_docs[-1] == layout.positions.shape[0]
