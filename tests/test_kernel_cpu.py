"""The sparse_ce_kernels Hub kernel (kernel_src/), CPU variant: build, load through ``kernels``, equivalence.

The kernel is compiled once per source content, torch version and CPU (:mod:`sparse_ce.native`, cached under
``~/.cache/sparse-ce/kernels`` or ``$SPARSE_CE_KERNEL_CACHE``), laid out as a kernel repository ``build/<variant>/``,
loaded with ``kernels.get_local_kernel`` and, in a fresh process, with ``kernels.get_kernel`` from a fake offline
Hub cache. Its op is checked against the dense oracle (Schlatt et al., ECIR 2024, Eqs. 1-3) and the per-token
oracle of test_attention.py: outputs, gradients (shared queries included), all 64 flag combinations, windows,
one-token documents and documents shorter than the window, half precision, and input validation.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configuration_sparse_ce import DIRECTION_FLAGS
from modeling_sparse_ce.attention_dense import dense_attention
from modeling_sparse_ce.attention_kernel import layout_offsets, load_kernel, pattern_flags
from modeling_sparse_ce.attention import ATTENTION_FUNCTIONS as ALL_FUNCTIONS
from modeling_sparse_ce.pattern import Segment
from sparse_ce.native import build_cpu_kernel
from test_attention import make_layout, oracle, pattern_of, random_qkv

pytest.importorskip("kernels")

WINDOWS = [None, 0, 1, 4, 64]
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def kernel_repo() -> Path:
    """Folder with ``build/<variant>/`` of the CPU kernel: the same compile-once cache the models use by default."""
    return build_cpu_kernel()


@pytest.fixture(scope="session")
def kernel(kernel_repo):
    from kernels import get_local_kernel

    return get_local_kernel(kernel_repo)


# --- op arguments from a SegmentLayout (test-only helpers; the model has its own adapter) ----------------------------


def op_args(layout, pattern):
    """``cu_queries, cu_docs, row_to_query, flags, window`` of the packed layout, through the model's adapter."""
    window = pattern.window
    return (*layout_offsets(layout), layout.row_to_query, pattern_flags(pattern), -1 if window is None else window)


def run_kernel(kernel, qkv, layout, pattern):
    return kernel.sparse_attention(*qkv, *op_args(layout, pattern), scale=qkv[0].shape[-1] ** -0.5)


def run_dense(qkv, layout, pattern):
    return dense_attention(*qkv, layout, pattern, scaling=qkv[0].shape[-1] ** -0.5)[0]


def all_flags(on=True):
    return {flag: on for flag in DIRECTION_FLAGS}


# --- loading -----------------------------------------------------------------------------------------------------------


def test_local_kernel_layout_and_namespace(kernel, kernel_repo):
    (variant,) = (kernel_repo / "build").iterdir()
    assert variant.name.startswith(f"torch{''.join(torch.__version__.split('.')[:2])}-cxx11-cpu-")
    metadata = json.loads((variant / "metadata.json").read_text())
    assert metadata["backend"] == {"type": "cpu"} and metadata["name"] == "sparse-ce-kernels"
    namespace = metadata["id"]
    assert namespace.startswith("_sparse_ce_kernels_cpu_")
    assert kernel.add_op_namespace_prefix("sparse_attention_fwd") == f"{namespace}::sparse_attention_fwd"
    assert hasattr(getattr(torch.ops, namespace), "sparse_attention_bwd")
    assert set(kernel.__all__) >= {"sparse_attention", "ops"}


def test_get_kernel_from_offline_hub_cache(kernel_repo, tmp_path):
    """The published path: kernels.get_kernel(repo, version=1) resolves a cached snapshot offline."""
    repo_cache = tmp_path / "kernels--sparse-ce--sparse-attention"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "v1").write_text(FAKE_SHA)
    shutil.copytree(kernel_repo / "build", repo_cache / "snapshots" / FAKE_SHA / "build")
    script = textwrap.dedent(
        """
        import torch
        from modeling_sparse_ce import SparseCrossEncoderConfig
        from modeling_sparse_ce.attention_kernel import find_kernel
        config = SparseCrossEncoderConfig(kernel_repo_id="sparse-ce/sparse-attention", kernel_revision="%s")
        k = find_kernel(config, torch.device("cpu"))  # pinned: tried before the built-in op
        assert k.__name__.startswith("sparse_ce_kernels") or "snapshots" in k.__file__, k
        q = torch.randn(7, 2, 4)
        cu_q, cu_d, r2q = torch.tensor([2, 4]), torch.tensor([4, 5, 7]), torch.tensor([0, 0])
        out = k.sparse_attention(q, q, q, cu_q, cu_d, r2q, 63 - 12, 1)
        assert out.shape == q.shape and torch.isfinite(out).all()
        print("OK", k.ops)
        """
        % FAKE_SHA
    )
    env = dict(os.environ, KERNELS_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    for name in ("LOCAL_KERNELS", "SPARSE_CE_KERNEL"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


# --- equivalence -------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    dim=st.sampled_from([1, 4, 8, 13, 32, 64]),  # 8, 32, 64: the AVX2 fp32 path; others: the generic one
    window=st.sampled_from(WINDOWS + [2, 3]),
    flags=st.fixed_dictionaries({flag: st.booleans() for flag in DIRECTION_FLAGS}),
)
def test_kernel_matches_paper_oracle(kernel, data, batch, heads, dim, window, flags):
    query_ids = data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch))
    qlen_of = {u: data.draw(st.integers(1, 5)) for u in set(query_ids)}
    doc_lens = data.draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch))
    pattern = pattern_of(flags, window)
    layout = make_layout([qlen_of[u] for u in query_ids], doc_lens, query_ids, pattern.query_is_independent)
    qkv = [x.detach() for x in random_qkv(layout, heads, dim, seed=data.draw(st.integers(0, 100)))]
    expected = oracle(*qkv, layout, flags, window)
    torch.testing.assert_close(run_kernel(kernel, qkv, layout, pattern), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
def test_kernel_equals_dense_all_flag_combinations(kernel, window):
    """All 64 flag settings on ragged documents (1 token, shorter and longer than w): outputs and gradients.

    Rows share queries whenever the pattern allows it, so shared query K/V gradients are summed over documents.
    """
    doc_lens = [1, 3, 70, 9, 130]
    for values in itertools.product([False, True], repeat=len(DIRECTION_FLAGS)):
        flags = dict(zip(DIRECTION_FLAGS, values))
        pattern = pattern_of(flags, window)
        query_ids = [0, 0, 1, 0, 2] if pattern.query_is_independent else [0, 1, 2, 3, 4]
        layout = make_layout([4, 4, 2, 4, 6], doc_lens, query_ids, pattern.query_is_independent)
        assert layout.shares_queries == pattern.query_is_independent
        results = {}
        for name, fn in {"kernel": lambda x: run_kernel(kernel, x, layout, pattern), "dense": None}.items():
            qkv = random_qkv(layout, heads=2, dim=8, seed=7)
            out = fn(qkv) if fn else run_dense(qkv, layout, pattern)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results[name] = (out.detach(), *[x.grad for x in qkv])
        msg = f"flags={flags} window={window}"
        torch.testing.assert_close(results["kernel"][0], results["dense"][0], atol=1e-5, rtol=1e-5, msg=msg)
        for got, want, name in zip(results["kernel"][1:], results["dense"][1:], "qkv"):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"d{name}: {msg}")


def test_kernel_gradcheck_shared_query(kernel):
    flags = all_flags() | {"query_cls_attention": False, "query_doc_attention": False}
    pattern = pattern_of(flags, 2)
    layout = make_layout([3, 3, 2], [5, 1, 4], [0, 0, 1], True)
    assert layout.shares_queries
    qkv = [x.detach().double().requires_grad_() for x in random_qkv(layout, heads=2, dim=3)]
    args = op_args(layout, pattern)
    # float64 is not a kernel dtype: check float32 gradients against float64 finite differences of the dense oracle
    qkv32 = [x.detach().float().requires_grad_() for x in qkv]
    out = kernel.sparse_attention(*qkv32, *args)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = run_dense(qkv, layout, pattern)
    ref.backward(grad.double())
    for got, want in zip(qkv32, qkv):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_close_to_fp32(kernel, dtype):
    flags = all_flags() | {"query_cls_attention": False, "query_doc_attention": False}
    pattern = pattern_of(flags, 4)
    layout = make_layout([5, 5, 3], [200, 17, 64], [0, 0, 1], True)
    qkv = [x.detach() for x in random_qkv(layout, heads=4, dim=16)]
    expected = run_dense(qkv, layout, pattern)
    half = [x.to(dtype).requires_grad_() for x in qkv]
    out = run_kernel(kernel, half, layout, pattern)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all() for x in half)


def test_kernel_lse_and_raw_ops(kernel):
    pattern = pattern_of(all_flags(), None)
    layout = make_layout([2, 3], [4, 2], [0, 1], False)
    qkv = [x.detach() for x in random_qkv(layout, heads=2, dim=4)]
    out, lse = kernel.sparse_attention_fwd(*qkv, *op_args(layout, pattern), 0.5)
    assert lse.dtype == torch.float32 and lse.shape == qkv[0].shape[:2]
    # full attention inside each row: lse of row b's [CLS] is logsumexp over all of row b's tokens
    keys = torch.cat([torch.tensor([0]), torch.arange(2, 4), torch.arange(7, 11)])
    scores = torch.einsum("hd,khd->hk", qkv[0][0], qkv[1][keys]) * 0.5
    torch.testing.assert_close(lse[0], scores.logsumexp(-1))


# --- validation --------------------------------------------------------------------------------------------------------


@pytest.fixture
def valid_args():
    pattern = pattern_of(all_flags() | {"query_cls_attention": False, "query_doc_attention": False}, 2)
    layout = make_layout([2, 2], [3, 4], [0, 0], True)
    qkv = [x.detach() for x in random_qkv(layout, heads=2, dim=4)]
    return qkv, list(op_args(layout, pattern))


def call(kernel, qkv, args):
    return kernel.sparse_attention_fwd(*qkv, *args, 0.5)


def test_valid_args_run(kernel, valid_args):
    call(kernel, *valid_args)


# (mutation of valid_args, message): one contract, so tests/test_kernel_cuda.py expects the same messages on CUDA
INVALID_INPUTS = [
    (lambda qkv, a: qkv.__setitem__(1, qkv[1].double()), "float32, float16 or bfloat16"),
    (lambda qkv, a: qkv.__setitem__(2, qkv[2].half()), "dtype"),
    (lambda qkv, a: qkv.__setitem__(0, qkv[0].transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
    (lambda qkv, a: qkv.__setitem__(1, qkv[1][:-1]), "shape"),
    (lambda qkv, a: qkv.__setitem__(0, qkv[0][:, :, None]), "tokens, heads, head_dim"),
    (lambda qkv, a: qkv.__setitem__(slice(None), [x.double() for x in qkv]), "float32, float16 or bfloat16"),
    (lambda qkv, a: qkv.__setitem__(slice(None), [x[..., :0] for x in qkv]), r"head_dim must be in \[1, 256\]"),
    (lambda qkv, a: qkv.__setitem__(slice(None), [x.repeat(1, 1, 65) for x in qkv]), "head_dim must be in"),
    (lambda qkv, a: a.__setitem__(0, a[0][:1]), r"U >= 1"),  # no query
    (lambda qkv, a: a.__setitem__(1, a[1][:1]), r"B >= 1"),  # no document row
    (lambda qkv, a: a.__setitem__(1, a[1].repeat_interleave(2)[::2]), "contiguous"),
    (lambda qkv, a: a.__setitem__(1, torch.cat([a[1][:-1], a[1][-1:] - 1])), r"cu_docs\[B\]"),
    (lambda qkv, a: a.__setitem__(0, a[0].int()), "int64"),
    (lambda qkv, a: a.__setitem__(0, a[0] + 1), r"cu_queries\[0\]"),
    (lambda qkv, a: a.__setitem__(1, a[1].flip(0)), "cu_docs"),
    (lambda qkv, a: a.__setitem__(2, a[2] + 1), "out of range"),
    (lambda qkv, a: a.__setitem__(2, a[2][:1]), "row_to_query"),
    (lambda qkv, a: a.__setitem__(3, 64), "flags"),
    (lambda qkv, a: a.__setitem__(4, -2), "window"),
    (lambda qkv, a: a.__setitem__(3, 8), "cannot be shared"),  # query_doc with a shared query
    (lambda qkv, a: a.__setitem__(3, 4), "cannot be shared"),  # query_cls with a shared query
]


@pytest.mark.parametrize("mutate, message", INVALID_INPUTS)
def test_invalid_inputs_raise(kernel, valid_args, mutate, message):
    qkv, args = valid_args
    qkv, args = list(qkv), list(args)
    mutate(qkv, args)
    with pytest.raises(RuntimeError, match=message):
        call(kernel, qkv, args)


def test_query_doc_needs_identity_row_to_query(kernel):
    layout = make_layout([2, 2], [3, 4], [0, 1], False)
    qkv = [x.detach() for x in random_qkv(layout)]
    cu_q, cu_d, _, _, _ = op_args(layout, pattern_of(all_flags(), 1))
    with pytest.raises(RuntimeError, match="row_to_query"):
        kernel.sparse_attention_fwd(*qkv, cu_q, cu_d, torch.tensor([1, 0]), 8, 1, 0.5)


# --- the model on the kernel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["builtin", "override"])
def test_model_auto_backend_uses_the_kernel(kernel_repo, tiny_tokenizer, monkeypatch, source):
    """``auto`` finds the kernel (by default the built-in CPU op; or a local override), scores like ``windowed`` and
    back-propagates through it."""
    from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
    from test_model import pairs_batch, ragged_pairs
    from tiny import make_config

    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    if source == "override":
        monkeypatch.setenv("SPARSE_CE_KERNEL", str(kernel_repo))
    else:
        monkeypatch.delenv("SPARSE_CE_KERNEL", raising=False)
    load_kernel.cache_clear()
    try:
        torch.manual_seed(0)
        model = SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer, initializer_range=0.2)).eval()
        functions = model.bert.attention_functions("auto", model.bert.layer_patterns(), output_attentions=False)
        assert all(getattr(f, "func", None) is ALL_FUNCTIONS["kernel"] for f in functions)
        batch = pairs_batch(tiny_tokenizer, ragged_pairs())
        grads = {}
        for backend in ("auto", "windowed"):
            model.zero_grad()
            logits = model(**batch, attention_backend=backend).logits
            logits.sum().backward()
            grads[backend] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(grads["auto"][0], grads["windowed"][0], atol=1e-5, rtol=0)
        for mine, theirs in zip(grads["auto"][1], grads["windowed"][1]):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    finally:
        load_kernel.cache_clear()
