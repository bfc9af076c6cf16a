"""The CUDA op against the CPU op, for a session with a GPU (CI only compile-checks the .cu).

Builds the CUDA variant with ``kernel_src/build_local.py --cuda`` (the one nvcc recipe) and compares out, lse, dq, dk
and dv with a float32 CPU reference: all 64 flag combinations x windows {-1, 0, 1, 4, 64} x head dims
{13, 48, 64, 100, 128, 200, 256} (every ELEMS path, partial 32-lane tails) x 3 heads, documents of 1, 3, fewer than w
and 130 tokens, index tensors on the CPU and on the GPU; empty queries and documents; 100 documents sharing one
query; bfloat16 / float16; rows without a key of finite score; per-dtype tolerances (``tolerances``); the contract's
error messages; the device-side validation of GPU-resident index tensors and ``validate=False``; the refusal under
``torch.use_deterministic_algorithms(True)``; CUDA-graph capture (and its clear error for CPU index tensors) and
torch.compile.

The CUDA variant also registers the CPU op (build_local.py compiles both), which is the reference.
``SPARSE_CE_CUDA_KERNEL=DIR`` reuses a build_local.py --cuda folder instead of building one.
``SPARSE_CE_REQUIRE_CUDA=1`` (a GPU session) turns every skip of this file into a failure: no ``kernels``, no CUDA
device or the dry run below fail instead of passing with zero coverage (tests/test_kernel_cuda_require.py).
``SPARSE_CE_TEST_DEVICE=cpu`` runs the same comparisons with the CPU op on both sides (a dry run of this file on a
machine without a GPU; the cuda-only tests skip).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REQUIRE_CUDA = os.environ.get("SPARSE_CE_REQUIRE_CUDA") == "1"
DEVICE = os.environ.get("SPARSE_CE_TEST_DEVICE", "cuda")


def skip_or_fail(reason: str) -> None:
    """Skip this module, or fail it under SPARSE_CE_REQUIRE_CUDA=1."""
    if REQUIRE_CUDA:
        pytest.fail(f"SPARSE_CE_REQUIRE_CUDA=1: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:  # before importing test_kernel_cpu, whose own importorskip would skip this module silently
    import kernels  # noqa: F401
except ImportError as error:
    skip_or_fail(f"the kernels package is missing ({error})")
if DEVICE != "cuda" and REQUIRE_CUDA:
    skip_or_fail(f"SPARSE_CE_TEST_DEVICE={DEVICE} is a dry run, not the CUDA op")
if DEVICE == "cuda" and not torch.cuda.is_available():
    skip_or_fail("no CUDA device")

from test_kernel_contract import EMPTY_SEGMENT_LAYOUTS, packed  # noqa: E402
from test_kernel_cpu import INVALID_INPUTS, kernel_repo, valid_args  # noqa: E402, F401  (fixtures)
from test_kernel_compile import CLS_DOC, CU_DOCS, CU_QUERIES, ROW_TO_QUERY, masked_inputs  # noqa: E402

KERNEL_SRC = Path(__file__).resolve().parents[1] / "kernel_src"
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs the CUDA op")
QUERY_SEES_ROW = 4 | 8  # query_cls, query_doc: no shared queries
INDEX_DEVICES = ["cpu", DEVICE] if DEVICE != "cpu" else ["cpu"]
HEAD_DIMS = [13, 48, 64, 100, 128, 200, 256]  # ELEMS 1, 2, 2, 4, 4, 8, 8; 13, 48, 100, 200: partial lane tails


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


def random_inputs(T, heads, dim, dtype=torch.float32, seed=0):
    """q, k, v, grad_out, rounded to ``dtype`` (the reference computes in float32 from these same values)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, heads, dim, generator=gen).to(dtype) for _ in range(4)]


def run(device_kernel, kernel, index_device, inputs, index, flags, window, scale):
    """(device results, float32 CPU reference): out, lse, dq, dk, dv, on the CPU. The reference forward takes the
    same rounded inputs in float32; the reference backward also takes the device's own out and lse, so that both
    backwards see identical inputs and differ only by float32 arithmetic and the final rounding."""
    on_device = [x.to(DEVICE) for x in inputs]
    idx = [x.to(index_device) for x in index]
    out, lse = device_kernel.sparse_attention_fwd(*on_device[:3], *idx, flags, window, scale)
    grads = device_kernel.sparse_attention_bwd(on_device[3], *on_device[:3], out, lse, *idx, flags, window, scale)
    got = [x.cpu() for x in (out, lse, *grads)]
    f32 = [x.float() for x in inputs]
    ref_out, ref_lse = kernel.sparse_attention_fwd(*f32[:3], *index, flags, window, scale)
    ref_grads = kernel.sparse_attention_bwd(f32[3], *f32[:3], got[0].float(), got[1], *index, flags, window, scale)
    return got, [ref_out, ref_lse, *ref_grads]


# rtol of out and the gradients against the float32 reference (computed from the same rounded inputs).
# float32: 1e-5 (~170 units of roundoff): the ops sum in different orders (a warp's shuffle tree and atomics against
# 8 partial sums), with different exps (expf against a polynomial, <= 2 ulp) and an online against a two-pass
# softmax; over the <= ~150 terms per element here that stays near 1e-6.
# bfloat16 / float16: 2 units of roundoff (2 * 2^-8, 2 * 2^-11): the device rounds its float32 result once
# (<= 1 unit); the float32 differences above are far below that.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-8, torch.float16: 2 * 2.0**-11}
LSE_TOL = 1e-5  # lse is float32 for every dtype (atol and rtol)
FLOOR = 1e-5  # atol = FLOOR x the reference's largest |element|: float32 cancellation in elements near zero


def assert_same(got, want, msg, grad_rtol=None):
    dtype = got[0].dtype
    for i, (g, w, name) in enumerate(zip(got, want, ["out", "lse", "dq", "dk", "dv"])):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), name
        if name == "lse":
            atol = rtol = LSE_TOL
        else:
            finite = w[torch.isfinite(w)]
            atol = FLOOR * float(finite.abs().max()) if finite.numel() else 0.0
            rtol = grad_rtol if grad_rtol and i >= 2 else RTOL[dtype]
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name} {msg}: {m}")


@pytest.mark.parametrize("index_device", INDEX_DEVICES)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("window", [-1, 0, 1, 4, 64])
def test_all_flags_match_cpu(kernel, device_kernel, window, dim, index_device):
    doc_lens = [1, 3, max(1, window - 1) if window > 1 else 2, 130]
    for flags in range(64):
        shared = not flags & QUERY_SEES_ROW
        row_to_query = [0, 0, 1, 0] if shared else [0, 1, 2, 3]
        query_lens = [4, 2] if shared else [4, 4, 2, 6]
        index = packed(query_lens, doc_lens, row_to_query)
        inputs = random_inputs(int(index[1][-1]), 3, dim, seed=flags)
        got, want = run(device_kernel, kernel, index_device, inputs, index, flags, window, dim**-0.5)
        assert_same(got, want, f"flags={flags} window={window} dim={dim}")


@pytest.mark.parametrize("index_device", INDEX_DEVICES)
@pytest.mark.parametrize("dim", [13, 64])
@pytest.mark.parametrize("window", [-1, 0, 2])
@pytest.mark.parametrize("case", range(len(EMPTY_SEGMENT_LAYOUTS)))
def test_empty_query_and_document_match_cpu(kernel, device_kernel, case, window, dim, index_device):
    """Zero-length segments share their start offset with the next one (the owner search must skip them);
    tests/test_kernel_contract.py holds the CPU op to a reference written from the contract."""
    query_lens, doc_lens, row_to_query = EMPTY_SEGMENT_LAYOUTS[case]
    index = packed(query_lens, doc_lens, row_to_query)
    inputs = random_inputs(int(index[1][-1]), 3, dim, seed=case)
    for flags in range(64):
        if len(query_lens) != len(doc_lens) and flags & QUERY_SEES_ROW:
            continue  # a shared query
        got, want = run(device_kernel, kernel, index_device, inputs, index, flags, window, dim**-0.5)
        assert_same(got, want, f"case={case} flags={flags} window={window}")


@pytest.mark.parametrize("flags", [1 | 2 | 16 | 32, 1 | 16 | 32])  # the paper's preset, and without cls_doc
def test_hundred_documents_share_one_query(kernel, device_kernel, flags):
    """The shared query's dK/dV sum 100 documents' rows (atomics under contention on the GPU). Those sums have
    15,300 terms, and float32 summation error grows with sqrt(terms) (~7e-6 per order here): gradients get 1e-4."""
    index = packed([10], [153] * 100, [0] * 100)
    inputs = random_inputs(int(index[1][-1]), 12, 32)
    got, want = run(device_kernel, kernel, DEVICE, inputs, index, flags, 4, 32**-0.5)
    assert_same(got, want, "100 docs", grad_rtol=1e-4)


@pytest.mark.parametrize("dim", [13, 64, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_cpu(kernel, device_kernel, dtype, dim):
    index = packed([5, 3], [200, 17, 64], [0, 0, 1])
    inputs = random_inputs(int(index[1][-1]), 3, dim, dtype)
    for flags, window in [(1 | 2 | 16 | 32, 4), (1 | 16 | 32, -1), (16 | 32, 0)]:
        got, want = run(device_kernel, kernel, DEVICE, inputs, index, flags, window, dim**-0.5)
        assert_same(got, want, f"{dtype} flags={flags} window={window}")


def test_rows_without_finite_key_match_cpu(kernel, device_kernel):
    q, _, masked, v = masked_inputs(32, torch.float32)
    inputs = [q, masked, v, torch.randn_like(q)]
    got, want = run(device_kernel, kernel, DEVICE, inputs, (CU_QUERIES, CU_DOCS, ROW_TO_QUERY), CLS_DOC, 1, 0.5)
    assert not any(x.isnan().any() for x in got) and (got[0][4:7] == 0).all() and torch.isinf(got[1][4:7]).all()
    assert_same(got, want, "-inf keys")


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
    assert re.search(message, text), text


@cuda_only
def test_device_build_registers_the_cuda_op(device_kernel):
    """Without it every call above would have raised; this names the cause (e.g. a CPU-only build passed in)."""
    for name in ("sparse_attention_fwd", "sparse_attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(device_kernel.add_op_namespace_prefix(name), "CUDA")


def small_case(heads=3, dim=32, index_device="cuda"):
    index = [x.to(index_device) for x in packed([4, 3], [40, 9, 70], [0, 0, 1])]
    return index, [x.cuda() for x in random_inputs(int(index[1][-1]), heads, dim)]


@cuda_only
def test_validate_false_skips_only_the_device_check(device_kernel):
    """The model passes validate=False (its layouts are built and checked on the host): no validation launch."""
    index, (q, k, v, _) = small_case()
    launched, outs = {}, {}
    for validate in (True, False):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            outs[validate] = device_kernel.sparse_attention(q, k, v, *index, 51, 4, validate=validate)
            torch.cuda.synchronize()
        launched[validate] = " ".join(event.name for event in prof.events())
    assert "sparse_attention_fwd_kernel" in launched[True] and "sparse_attention_fwd_kernel" in launched[False]
    assert "validate_layout_kernel" in launched[True] and "validate_layout_kernel" not in launched[False]
    torch.testing.assert_close(outs[False], outs[True], atol=0, rtol=0)


@cuda_only
def test_deterministic_mode_refuses_the_cuda_backward(device_kernel):
    """dk/dv are float32 atomicAdds: a clear error (a warning under warn_only) instead of silent nondeterminism.
    The forward (one warp per row, fixed order) runs. The CPU op's side: tests/test_kernel_contract.py."""
    index, (q, k, v, grad) = small_case()
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    message = r"atomicAdd.*use_deterministic_algorithms\(True\).*attention_backend='windowed'"
    try:
        torch.use_deterministic_algorithms(True)
        out, lse = device_kernel.sparse_attention_fwd(q, k, v, *index, 51, 4, 0.25)
        with pytest.raises(RuntimeError, match=message):
            device_kernel.sparse_attention_bwd(grad, q, k, v, out, lse, *index, 51, 4, 0.25)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with pytest.raises(RuntimeError, match=message):
            device_kernel.sparse_attention(*leaves, *index, 51, 4).backward(grad)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match=message):
            device_kernel.sparse_attention_bwd(grad, q, k, v, out, lse, *index, 51, 4, 0.25)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@cuda_only
def test_cuda_graph_capture_with_host_index_tensors_is_refused(device_kernel):
    """A captured graph cannot copy host tensors: a clear error before any CUDA call, and the context stays usable."""
    index, (q, k, v, _) = small_case(index_device="cpu")
    want, _ = device_kernel.sparse_attention_fwd(q, k, v, *index, 51, 4, 0.25)  # outside capture: copied, fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"CUDA-graph capture needs cu_queries, cu_docs and row_to_query on the GPU"):
        with torch.cuda.graph(graph):
            device_kernel.sparse_attention_fwd(q, k, v, *index, 51, 4, 0.25)
    got, _ = device_kernel.sparse_attention_fwd(q, k, v, *[x.cuda() for x in index], 51, 4, 0.25)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@cuda_only
def test_cuda_graph_capture_replays(device_kernel):
    index, (q, k, v, grad) = small_case()
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
