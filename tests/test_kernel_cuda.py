"""The CUDA op against the CPU op, for a session with a GPU (skipped without one; CI only compile-checks the .cu).

Builds the CUDA variant with ``kernel_src/build_local.py --cuda`` (the one nvcc recipe) and compares out, lse, dq, dk
and dv with the CPU op: all 64 flag combinations x windows {-1, 0, 1, 4, 64} x head dims {13, 32, 64, 128},
documents of 1, 3, fewer than w and 130 tokens, index tensors on the CPU and on the GPU; 100 documents sharing one
query; half precision; rows without a key of finite score; the contract's error messages; the device-side
validation of GPU-resident index tensors; CUDA-graph capture and torch.compile.

The CUDA variant also registers the CPU op (build_local.py compiles both), which is the reference.
``SPARSE_CE_CUDA_KERNEL=DIR`` reuses a build_local.py --cuda folder instead of building one.
``SPARSE_CE_TEST_DEVICE=cpu`` runs the same comparisons with the CPU op on both sides (a dry run of this file on a
machine without a GPU).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_kernel_cpu import INVALID_INPUTS, kernel_repo, valid_args  # noqa: F401  (fixtures)
from test_kernel_compile import CLS_DOC, CU_DOCS, CU_QUERIES, ROW_TO_QUERY, masked_inputs

pytest.importorskip("kernels")
DEVICE = os.environ.get("SPARSE_CE_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
KERNEL_SRC = Path(__file__).resolve().parents[1] / "kernel_src"
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs the CUDA op")
QUERY_SEES_ROW = 4 | 8  # query_cls, query_doc: no shared queries


@pytest.fixture(scope="session")
def device_build(tmp_path_factory, request):
    if DEVICE != "cuda":
        return request.getfixturevalue("kernel_repo")
    if os.environ.get("SPARSE_CE_CUDA_KERNEL"):
        return Path(os.environ["SPARSE_CE_CUDA_KERNEL"])
    out = tmp_path_factory.mktemp("cuda-kernel")
    result = subprocess.run([sys.executable, str(KERNEL_SRC / "build_local.py"), "--out", str(out), "--cuda"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return out


@pytest.fixture(scope="session")
def device_kernel(device_build):
    from kernels import get_local_kernel

    return get_local_kernel(device_build)


@pytest.fixture(scope="session")
def kernel(device_kernel):
    """The CPU reference: the same build's CPU implementation."""
    return device_kernel


def packed(query_lens, doc_lens, row_to_query):
    """Index tensors of the packed layout: ``[CLS] x B | queries | documents``."""
    cu_q = torch.tensor([0, *itertools.accumulate(query_lens)]) + len(doc_lens)
    cu_d = torch.tensor([0, *itertools.accumulate(doc_lens)]) + int(cu_q[-1])
    return cu_q, cu_d, torch.tensor(row_to_query)


def random_inputs(T, heads, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, heads, dim, generator=gen).to(dtype) for _ in range(4)]  # q, k, v, grad_out


def fwd_bwd(kernel, device, index_device, q, k, v, grad, index, flags, window, scale):
    """out, lse, dq, dk, dv of the raw ops on ``device``, returned on the CPU in float32."""
    to = [x.to(device) for x in (q, k, v, grad)]
    idx = [x.to(index_device) for x in index]
    out, lse = kernel.sparse_attention_fwd(*to[:3], *idx, flags, window, scale)
    grads = kernel.sparse_attention_bwd(to[3], *to[:3], out, lse, *idx, flags, window, scale)
    return [x.float().cpu() for x in (out, lse, *grads)]


def assert_same(got, want, atol, msg):
    for g, w, name in zip(got, want, ["out", "lse", "dq", "dk", "dv"]):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol, msg=lambda m: f"{name} {msg}: {m}")


@pytest.mark.parametrize("index_device", ["cpu", DEVICE])
@pytest.mark.parametrize("dim", [13, 32, 64, 128])
@pytest.mark.parametrize("window", [-1, 0, 1, 4, 64])
def test_all_flags_match_cpu(kernel, device_kernel, window, dim, index_device):
    doc_lens = [1, 3, max(1, window - 1) if window > 1 else 2, 130]
    for flags in range(64):
        shared = not flags & QUERY_SEES_ROW
        row_to_query = [0, 0, 1, 0] if shared else [0, 1, 2, 3]
        query_lens = [4, 2] if shared else [4, 4, 2, 6]
        index = packed(query_lens, doc_lens, row_to_query)
        q, k, v, grad = random_inputs(int(index[1][-1]), 2, dim, seed=flags)
        args = (q, k, v, grad, index, flags, window, dim**-0.5)
        want = fwd_bwd(kernel, "cpu", "cpu", *args)
        got = fwd_bwd(device_kernel, DEVICE, index_device, *args)
        assert_same(got, want, 1e-4, f"flags={flags} window={window} dim={dim}")


@pytest.mark.parametrize("flags", [1 | 2 | 16 | 32, 1 | 16 | 32])  # the paper's preset, and without cls_doc
def test_hundred_documents_share_one_query(kernel, device_kernel, flags):
    """The shared query's dK/dV sum 100 documents' rows (atomics under contention on the GPU)."""
    index = packed([10], [153] * 100, [0] * 100)
    q, k, v, grad = random_inputs(int(index[1][-1]), 12, 32)
    args = (q, k, v, grad, index, flags, 4, 32**-0.5)
    assert_same(fwd_bwd(device_kernel, DEVICE, DEVICE, *args), fwd_bwd(kernel, "cpu", "cpu", *args), 1e-3, "100 docs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_cpu(kernel, device_kernel, dtype):
    index = packed([5, 3], [200, 17, 64], [0, 0, 1])
    q, k, v, grad = random_inputs(int(index[1][-1]), 4, 64, dtype)
    args = (q, k, v, grad, index, 1 | 2 | 16 | 32, 4, 0.125)
    assert_same(fwd_bwd(device_kernel, DEVICE, DEVICE, *args), fwd_bwd(kernel, "cpu", "cpu", *args), 3e-2, str(dtype))


def test_rows_without_finite_key_match_cpu(kernel, device_kernel):
    q, _, masked, v = masked_inputs(32, torch.float32)
    grad = torch.randn_like(q)
    args = (q, masked, v, grad, (CU_QUERIES, CU_DOCS, ROW_TO_QUERY), CLS_DOC, 1, 0.5)
    got = fwd_bwd(device_kernel, DEVICE, DEVICE, *args)
    assert not any(x.isnan().any() for x in got) and (got[0][4:7] == 0).all() and torch.isinf(got[1][4:7]).all()
    assert_same(got, fwd_bwd(kernel, "cpu", "cpu", *args), 1e-5, "-inf keys")


@pytest.mark.parametrize("mutate, message", INVALID_INPUTS)
def test_invalid_inputs_same_messages(device_kernel, valid_args, mutate, message):
    qkv, args = valid_args
    qkv, args = [x.to(DEVICE) for x in qkv], list(args)
    mutate(qkv, args)
    with pytest.raises(RuntimeError, match=message):
        device_kernel.sparse_attention_fwd(*qkv, *args, 0.5)


@cuda_only
@pytest.mark.parametrize("bad, message", [("row_to_query", r"row_to_query\[1\] = 5 is out of range \[0, 1\)"),
                                          ("cu_docs", r"cu_docs\[B\] = cu_docs\[2\] = 8 must equal")])
def test_device_index_tensors_validated_on_the_device(device_build, bad, message):
    """GPU-resident index tensors: the validation kernel prints the CPU op's message and asserts (no sync)."""
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from kernels import get_local_kernel
        k = get_local_kernel(Path({str(device_build)!r}))
        cu_q, cu_d, r2q = torch.tensor([2, 4]), torch.tensor([4, 7, 9]), torch.tensor([0, 0])
        if {bad!r} == "row_to_query":
            r2q = torch.tensor([0, 5])
        else:
            cu_d = torch.tensor([4, 7, 8])
        q = torch.randn(9, 2, 8, device="cuda")
        out, lse = k.sparse_attention_fwd(q, q, q, cu_q.cuda(), cu_d.cuda(), r2q.cuda(), 51, 1, 0.5)
        torch.cuda.synchronize()
        print("NO ERROR")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "NO ERROR" not in text, text
    assert "device-side assert" in text or "assert" in text.lower(), text
    import re

    assert re.search(message, text), text


@cuda_only
def test_cuda_graph_capture_replays(device_kernel):
    index = [x.cuda() for x in packed([4, 3], [40, 9, 70], [0, 0, 1])]
    q, k, v, grad = [x.cuda() for x in random_inputs(int(index[1][-1]), 4, 32)]
    ops = device_kernel.ops

    def step():
        out, lse = ops.sparse_attention_fwd(q, k, v, *index, 51, 4, 0.25)
        return (out, *ops.sparse_attention_bwd(grad, q, k, v, out, lse, *index, 51, 4, 0.25))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@cuda_only
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])  # reduce-overhead: CUDA graphs
def test_torch_compile_on_cuda_matches_eager(device_kernel, mode):
    index = [x.cuda() for x in packed([4, 3], [40, 9, 70], [0, 0, 1])]
    qkv = [x.cuda() for x in random_inputs(int(index[1][-1]), 4, 32)[:3]]

    def layer(q, k, v):
        return (device_kernel.sparse_attention(q * 1.5, k, v.tanh(), *index, 51, 4) ** 2).sum(-1)

    torch._dynamo.reset()
    results = {}
    for name, fn in {"eager": layer, "compiled": torch.compile(layer, fullgraph=True, mode=mode)}.items():
        for _ in range(3):  # reduce-overhead records the graph on a later call
            leaves = [x.clone().requires_grad_() for x in qkv]
            y = fn(*leaves)
            y.sum().backward()
        results[name] = [y.detach(), *[x.grad for x in leaves]]
    torch._dynamo.reset()
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
