"""Where the attention kernel comes from: nothing unpinned from the Hub, fallback once per process, optional deps."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from configuration_sparse_ce import DIRECTION_FLAGS
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce import attention_kernel
from modeling_sparse_ce.attention_kernel import layout_offsets, load_kernel, pattern_flags
from modeling_sparse_ce.pattern import AttentionPattern
from test_attention import make_layout
from test_model import pairs_batch, ragged_pairs
from tiny import make_config


@pytest.fixture(autouse=True)
def fresh_loader(monkeypatch):
    for env in ("SPARSE_CE_KERNEL", "SPARSE_CE_KERNELS_LOCK", "LOCAL_KERNELS"):
        monkeypatch.delenv(env, raising=False)
    for cached in (load_kernel, attention_kernel._log_unpinned, attention_kernel._log_fallback):
        cached.cache_clear()
    yield
    for cached in (load_kernel, attention_kernel._log_unpinned, attention_kernel._log_fallback):
        cached.cache_clear()


class RecordingKernels:
    """A stand-in ``kernels`` module: records every call, loads nothing."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            raise RuntimeError("stand-in: nothing to load")

        return record


@pytest.fixture
def recorder(monkeypatch):
    stand_in = RecordingKernels()
    monkeypatch.setattr(attention_kernel, "kernels", stand_in)
    monkeypatch.setattr(attention_kernel, "load_cpu_kernel", None)  # no built-in op: only the Hub path is under test
    return stand_in


def run_auto(tokenizer, **config):
    model = SparseCrossEncoderForSequenceClassification(make_config(tokenizer, **config)).eval()
    with torch.no_grad():
        return model(**pairs_batch(tokenizer, ragged_pairs())).logits, model


def test_default_config_makes_no_download_call(tiny_tokenizer, recorder, caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_sparse_ce.attention_kernel"):
        logits, model = run_auto(tiny_tokenizer)
        run_auto(tiny_tokenizer)
    assert recorder.calls == []
    fallback = [r.getMessage() for r in caplog.records if "no attention kernel" in r.getMessage()]
    assert len(fallback) == 1 and "builtin" in fallback[0]  # logged once per process
    with torch.no_grad():
        torch.testing.assert_close(logits, model(**pairs_batch(tiny_tokenizer, ragged_pairs()),
                                                 attention_backend="windowed").logits, atol=0, rtol=0)


def test_unpinned_repo_id_is_never_fetched(tiny_tokenizer, recorder, caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_sparse_ce.attention_kernel"):
        run_auto(tiny_tokenizer, kernel_repo_id="someone/sparse-attention", kernel_version=1)
        run_auto(tiny_tokenizer, kernel_repo_id="someone/sparse-attention")
    assert recorder.calls == []
    unpinned = [r.getMessage() for r in caplog.records if "not pinned" in r.getMessage()]
    assert len(unpinned) == 1 and "someone/sparse-attention" in unpinned[0]


def test_pinned_revision_is_what_gets_downloaded(tiny_tokenizer, recorder):
    sha = "0123456789abcdef0123456789abcdef01234567"
    run_auto(tiny_tokenizer, kernel_repo_id="org/kernel", kernel_revision=sha)
    assert recorder.calls == [("get_kernel", ("org/kernel",), {"revision": sha, "trust_remote_code": True})]


def test_lock_file_entry_loads_through_get_locked_kernel(tiny_tokenizer, recorder, monkeypatch, tmp_path):
    lock = tmp_path / "kernels.lock"
    lock.write_text("[]")
    monkeypatch.setenv("SPARSE_CE_KERNELS_LOCK", str(lock))
    run_auto(tiny_tokenizer, kernel_repo_id="org/kernel")
    assert recorder.calls == [("get_locked_kernel", ("org/kernel",), {"lockfile": lock, "trust_remote_code": True})]


def test_local_kernels_mapping_counts_as_pinned(tiny_tokenizer, recorder, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_KERNELS", f"org/kernel={tmp_path}")
    run_auto(tiny_tokenizer, kernel_repo_id="org/kernel", kernel_version=2)
    assert recorder.calls == [("get_kernel", ("org/kernel",), {"version": 2, "trust_remote_code": True})]


@pytest.mark.parametrize("revision", ["main", "v1", "0123abc", "0123456789ABCDEF0123456789ABCDEF01234567", 7])
def test_revision_must_be_a_commit_sha(tiny_tokenizer, revision):
    with pytest.raises(ValueError, match="kernel_revision: expected a 40-hex commit sha"):
        make_config(tiny_tokenizer, kernel_repo_id="org/kernel", kernel_revision=revision)


def test_kernel_off_disables_every_source(tiny_tokenizer, recorder, monkeypatch):
    monkeypatch.setenv("SPARSE_CE_KERNEL", "off")
    run_auto(tiny_tokenizer, kernel_repo_id="org/kernel", kernel_revision="0" * 40)
    assert recorder.calls == []


def test_explicit_kernel_backend_without_kernel_is_an_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("SPARSE_CE_KERNEL", "off")
    model = SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer)).eval()
    with pytest.raises(RuntimeError, match="attention_backend='kernel'"):
        model(**pairs_batch(tiny_tokenizer, ragged_pairs()), attention_backend="kernel")


@pytest.mark.parametrize("kernels_installed", [False, True])
def test_remote_code_imports_and_runs_without_kernels(tiny_model_dir, tmp_path, kernels_installed):
    """The Hub folder alone (no sparse_ce package) loads and runs on CPU through its fallback, with `kernels`
    unimportable or installed. transformers >= 5.25 requires `kernels` and kernelizes every model in from_pretrained,
    failing when it is missing; its switch USE_HUB_KERNELS=NO stands for the older transformers that did not."""
    hide = "" if kernels_installed else 'sys.modules["kernels"] = None  # not installed'
    script = f"""
import sys
{hide}
sys.modules["sparse_ce"] = None  # a Hub folder alone, without the package
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path = {str(tiny_model_dir)!r}
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules")
print(model(**tok(["do goldfish grow"], ["goldfish grow"], return_tensors="pt")).logits.shape)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    if not kernels_installed:
        env["USE_HUB_KERNELS"] = "NO"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 1])" in result.stdout
    assert "no attention kernel for cpu" in result.stderr


def test_flag_bits_follow_direction_flag_order():
    for bit, flag in enumerate(DIRECTION_FLAGS):
        flags = {name: name == flag for name in DIRECTION_FLAGS}
        pattern = AttentionPattern.from_flags(flags, None)
        assert pattern_flags(pattern) == 1 << bit


def test_layout_offsets_delimit_packed_segments():
    layout = make_layout([3, 3, 2], [5, 1, 7], [0, 0, 1], share=True)
    cu_queries, cu_docs = layout_offsets(layout)
    assert cu_queries.tolist() == [3, 6, 8] and cu_docs.tolist() == [8, 13, 14, 21]
    assert cu_docs[-1] == layout.positions.shape[0]
