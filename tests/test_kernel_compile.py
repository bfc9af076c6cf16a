"""The sparse_ce_kernels op beyond plain eager calls: NaN guards, torch.library registrations, torch.compile.

- Rows without a key of finite score (the reachable stand-in for a row with no key: every row sees at least itself
  through the op's interface, and inconsistent index tensors are rejected) give a zero output, lse = +inf and no
  NaN anywhere, forward and backward; other rows are unaffected.
- ``torch.library.opcheck`` of both ops: schema, fake (meta) implementations, the registered autograd formula and
  AOT dispatch with dynamic shapes.
- ``torch.compile(fullgraph=True)`` of a function calling the op: output and gradients equal eager.
"""

from __future__ import annotations

import pytest
import torch

from test_kernel_cpu import kernel, kernel_repo, op_args  # noqa: F401  (fixtures)
from test_attention import make_layout, pattern_of, random_qkv
from configuration_sparse_ce import DIRECTION_FLAGS

pytest.importorskip("kernels")

# [CLS]0 [CLS]1 | query 0: 2, 3 | document 0: 4, 5, 6 | document 1: 7, 8 (both rows share query 0)
CU_QUERIES, CU_DOCS, ROW_TO_QUERY = torch.tensor([2, 4]), torch.tensor([4, 7, 9]), torch.tensor([0, 0])
CLS_DOC = 2  # flags bit of cls_doc: [CLS] 0 sees document 0


def masked_inputs(dim, dtype, heads=3):
    """q > 0 everywhere and k = -inf on document 0, so its rows (w = 1) have no key of finite score."""
    gen = torch.Generator().manual_seed(3)
    q = (torch.rand(9, heads, dim, generator=gen) + 0.1).to(dtype)
    k = torch.randn(9, heads, dim, generator=gen).to(dtype)
    v = torch.randn(9, heads, dim, generator=gen).to(dtype)
    masked = k.clone()
    masked[4:7] = float("-inf")
    return q, k, masked, v


def run(kernel, q, k, v):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = kernel.sparse_attention_fwd(*leaves, CU_QUERIES, CU_DOCS, ROW_TO_QUERY, CLS_DOC, 1, 0.5)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out.detach(), lse, *[x.grad for x in leaves]


@pytest.mark.parametrize("dim, dtype", [(8, torch.float32), (13, torch.float32), (8, torch.bfloat16)])
def test_rows_without_finite_key_give_zero_and_no_nan(kernel, dim, dtype):
    """dim 8 fp32: the AVX2 register-blocked forward; 13 and bf16: the generic one."""
    q, k, masked, v = masked_inputs(dim, dtype)
    out, lse, dq, dk, dv = run(kernel, q, masked, v)
    for name, x in {"out": out, "dq": dq, "dk": dk, "dv": dv}.items():
        assert not x.float().isnan().any(), name
    assert (out[4:7] == 0).all()
    assert torch.isinf(lse[4:7]).all() and (lse[4:7] > 0).all()
    assert (dq[4:7] == 0).all() and (dk[4:7] == 0).all() and (dv[4:7] == 0).all()
    # [CLS] 0 also sees document 0, whose -inf keys get probability 0: it attends to itself alone
    torch.testing.assert_close(out[0].float(), v[0].float(), atol=1e-2 if dtype == torch.bfloat16 else 0, rtol=0)
    # rows that do not see document 0 are unaffected
    ref = run(kernel, q, k, v)
    others = [1, 2, 3, 7, 8]
    for got, want in zip((out, lse, dq, dv), (ref[0], ref[1], ref[2], ref[4])):
        torch.testing.assert_close(got[others], want[others], atol=0, rtol=0)


# --- torch.library registrations and torch.compile ---------------------------------------------------------------------


def shared_query_case(heads=2, dim=8, window=2):
    flags = {flag: True for flag in DIRECTION_FLAGS} | {"query_cls_attention": False, "query_doc_attention": False}
    pattern = pattern_of(flags, window)
    layout = make_layout([3, 3, 2], [5, 1, 7], [0, 0, 1], True)
    qkv = [x.detach() for x in random_qkv(layout, heads=heads, dim=dim)]
    return qkv, op_args(layout, pattern)


def test_ops_have_fake_and_autograd_registrations(kernel):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    fwd, bwd = (kernel.add_op_namespace_prefix(name) for name in ("sparse_attention_fwd", "sparse_attention_bwd"))
    assert has(fwd, "Meta") and has(bwd, "Meta") and has(fwd, "Autograd")
    qkv, args = shared_query_case()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (*qkv, *args[:3])]
        out, lse = kernel.ops.sparse_attention_fwd(*fake, *args[3:], 0.5)
    assert out.shape == qkv[0].shape and out.dtype == qkv[0].dtype
    assert lse.shape == qkv[0].shape[:2] and lse.dtype == torch.float32


def test_opcheck_forward_and_backward(kernel):
    qkv, args = shared_query_case()
    q, k, v = [x.clone().requires_grad_() for x in qkv]
    torch.library.opcheck(kernel.ops.sparse_attention_fwd.default, (q, k, v, *args, 0.5))
    out, lse = kernel.ops.sparse_attention_fwd(*qkv, *args, 0.5)
    grad = torch.randn_like(out)
    torch.library.opcheck(kernel.ops.sparse_attention_bwd.default, (grad, *qkv, out, lse, *args, 0.5))


def test_lse_is_not_differentiable(kernel):
    qkv, args = shared_query_case()
    q = qkv[0].clone().requires_grad_()
    out, lse = kernel.sparse_attention_fwd(q, *qkv[1:], *args, 0.5)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(kernel, backend):
    qkv, (cu_q, cu_d, r2q, flags, window) = shared_query_case(heads=2, dim=8)

    def layer(q, k, v, cu_q, cu_d, r2q):
        # around the op: ops the compiler fuses, so that the graph is more than the op alone
        out = kernel.sparse_attention(q * 1.5, k, v.tanh(), cu_q, cu_d, r2q, flags, window)
        return (out * out).sum(-1)

    results = {}
    torch._dynamo.reset()
    try:
        for name, fn in {"eager": layer, "compiled": torch.compile(layer, fullgraph=True, backend=backend)}.items():
            leaves = [x.clone().requires_grad_() for x in qkv]
            y = fn(*leaves, cu_q, cu_d, r2q)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            results[name] = (y.detach(), *[x.grad for x in leaves])
    finally:
        torch._dynamo.reset()
    for got, want, name in zip(results["compiled"], results["eager"], ["out", "dq", "dk", "dv"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert results["eager"][1].abs().sum() > 0  # gradients are real, not zeros
