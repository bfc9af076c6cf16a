"""The op contract's corners on the CPU op (tests/test_kernel_cuda.py holds the CUDA op to the same, on a GPU).

- Zero-length queries and documents (the contract only asks for non-decreasing offsets) against a float64
  reference written from the contract's key sets alone (torch_binding.h), not from the model's SegmentLayout.
- Windows near INT64_MAX: the shared checks clamp a window to T, so no op computes ``t + window + 1`` with signed
  overflow; any window >= the longest document equals -1.
- ``validate=False`` (the model's layouts): the CPU op still checks host-resident values; autograd and the fake
  registrations take the extra argument; the model's adapter passes it to builds that have it.
- ``torch.use_deterministic_algorithms(True)``: the CPU op (no atomics) runs and repeats bit for bit.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from test_kernel_cpu import kernel, kernel_repo  # noqa: F401  (fixtures)

pytest.importorskip("kernels")

# (query lengths, document lengths, row_to_query) with empty segments; the second shares query 1 between rows 0, 2
EMPTY_SEGMENT_LAYOUTS = [([0, 3, 2], [4, 0, 3], [0, 1, 2]), ([3, 0], [0, 5, 2], [1, 1, 0])]
QUERY_SEES_ROW = 4 | 8  # query_cls, query_doc: no shared queries


def packed(query_lens, doc_lens, row_to_query):
    """Index tensors of the packed layout: ``[CLS] x B | queries | documents``."""
    cu_q = torch.tensor([0, *itertools.accumulate(query_lens)]) + len(doc_lens)
    cu_d = torch.tensor([0, *itertools.accumulate(doc_lens)]) + int(cu_q[-1])
    return cu_q, cu_d, torch.tensor(row_to_query)


def contract_mask(cu_q, cu_d, r2q, flags, window):
    """``[T, T]``: key j allowed for row t, as torch_binding.h states the key sets."""
    cu_q, cu_d, r2q = cu_q.tolist(), cu_d.tolist(), r2q.tolist()
    T, B, U = cu_d[-1], len(cu_d) - 1, len(cu_q) - 1
    mask = torch.zeros(T, T, dtype=torch.bool)
    query, doc = (lambda u: range(cu_q[u], cu_q[u + 1])), (lambda b: range(cu_d[b], cu_d[b + 1]))
    for b in range(B):
        u = r2q[b]
        mask[b, [b, *(query(u) if flags & 1 else []), *(doc(b) if flags & 2 else [])]] = True
        for t in doc(b):
            band = [j for j in doc(b) if window < 0 or abs(t - j) <= window]
            mask[t, [*([b] if flags & 16 else []), *(query(u) if flags & 32 else []), *band]] = True
    for u in range(U):
        for t in query(u):
            mask[t, [*query(u), *([u] if flags & 4 else []), *(doc(u) if flags & 8 else [])]] = True
    return mask


def reference(q, k, v, mask, scale):
    """out and lse in float64 (differentiable): one softmax per (row, head) over the allowed keys."""
    scores = torch.einsum("thd,jhd->htj", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.einsum("htj,jhd->thd", scores.softmax(-1), v), lse.T


def random_inputs(T, heads=3, dim=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, heads, dim, generator=gen) for _ in range(4)]  # q, k, v, grad_out


@pytest.mark.parametrize("window", [-1, 0, 2])
@pytest.mark.parametrize("case", range(len(EMPTY_SEGMENT_LAYOUTS)))
def test_empty_query_and_document_match_the_contract(kernel, case, window):
    query_lens, doc_lens, row_to_query = EMPTY_SEGMENT_LAYOUTS[case]
    index = packed(query_lens, doc_lens, row_to_query)
    shared = len(query_lens) != len(doc_lens)
    q, k, v, grad = random_inputs(int(index[1][-1]))
    for flags in range(64):
        if shared and flags & QUERY_SEES_ROW:
            continue
        out, lse = kernel.sparse_attention_fwd(q, k, v, *index, flags, window, 0.3)
        dq, dk, dv = kernel.sparse_attention_bwd(grad, q, k, v, out, lse, *index, flags, window, 0.3)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        want_out, want_lse = reference(*leaves, contract_mask(*index, flags, window), 0.3)
        want_grads = torch.autograd.grad(want_out, leaves, grad.double())
        for name, got, want in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, dq, dk, dv],
                                   [want_out, want_lse, *want_grads]):
            torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} flags={flags} window={window}: {m}")


@pytest.mark.parametrize("dim", [8, 13])  # 8: the AVX2 register-blocked forward; 13: the generic one
@pytest.mark.parametrize("flags", [0, 1 | 2 | 16 | 32])
def test_huge_windows_equal_unlimited(kernel, dim, flags):
    index = packed([2, 3], [6, 1, 9], [0, 1, 1])
    q, k, v, grad = random_inputs(int(index[1][-1]), dim=dim, seed=1)
    results = {}
    for window in [-1, 9, 10**6, 2**62, 2**63 - 1]:
        out, lse = kernel.sparse_attention_fwd(q, k, v, *index, flags, window, 0.3)
        results[window] = (out, lse, *kernel.sparse_attention_bwd(grad, q, k, v, out, lse, *index, flags, window, 0.3))
    for window, got in results.items():  # the same key sets, so the same arithmetic: bit for bit
        for g, w in zip(got, results[-1]):
            torch.testing.assert_close(g, w, atol=0, rtol=0, msg=lambda m: f"window={window}: {m}")


def test_validate_false_still_checks_host_values(kernel):
    index = packed([2], [3, 4], [0, 0])
    q, k, v, _ = random_inputs(int(index[1][-1]), dim=4)
    want = kernel.sparse_attention(q, k, v, *index, 51, 1)
    torch.testing.assert_close(kernel.sparse_attention(q, k, v, *index, 51, 1, validate=False), want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match=r"row_to_query\[1\] = 5 is out of range"):
        kernel.sparse_attention(q, k, v, index[0], index[1], torch.tensor([0, 5]), 51, 1, validate=False)


@pytest.mark.parametrize("validate", [True, False])
def test_autograd_and_opcheck_with_validate(kernel, validate):
    """The dispatcher drops an argument equal to its default: the autograd formula returns one gradient per input
    it got, for both values."""
    index = packed([2, 1], [3, 4, 2], [0, 1, 0])
    q, k, v, grad = random_inputs(int(index[1][-1]), dim=8, seed=2)
    grads = {}
    for flag in (True, validate):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        kernel.sparse_attention(*leaves, *index, 51, 2, validate=flag).backward(grad)
        grads[flag] = [x.grad for x in leaves]
    for got, want in zip(grads[validate], grads[True]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(kernel.ops.sparse_attention_fwd.default, (*leaves, *index, 51, 2, 0.5, validate))


def test_model_adapter_skips_validation_only_where_the_build_has_the_argument():
    from modeling_sparse_ce.attention_kernel import kernel_attention
    from configuration_sparse_ce import DIRECTION_FLAGS
    from modeling_sparse_ce.pattern import AttentionPattern
    from test_attention import make_layout

    layout = make_layout([2], [3], [0], False)
    pattern = AttentionPattern.from_flags(dict.fromkeys(DIRECTION_FLAGS, False), 2)
    qkv = [torch.randn(layout.batch_size + 5, 2, 4)] * 3
    seen = []
    for has in (True, False):
        module = types.SimpleNamespace(sparse_attention=lambda *args, **kwargs: seen.append(kwargs) or args[0])
        if has:
            module.HAS_VALIDATE_ARGUMENT = True
        kernel_attention(*qkv, layout, pattern, scaling=0.5, kernel=module)
    assert seen == [{"validate": False}, {}]


def test_deterministic_mode_cpu_op_runs_and_repeats(kernel):
    """The CPU backward writes each gradient element from one task (no atomics): deterministic, so it must not
    refuse as the CUDA backward does."""
    index = packed([3], [40, 7, 20], [0, 0, 0])
    q, k, v, grad = random_inputs(int(index[1][-1]), dim=16, seed=3)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = kernel.sparse_attention(*leaves, *index, 51, 4)
            out.backward(grad)
            runs.append([out.detach(), *[x.grad for x in leaves]])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
