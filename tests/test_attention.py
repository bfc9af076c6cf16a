"""Attention backends against the paper's definition (Schlatt et al., ECIR 2024, Eqs. 1-3).

The oracle below is written from the paper's rules token by token (no shared code with the backends): [CLS] and
query rows attend to whole allowed segments, document rows to allowed prefix segments and to document tokens within
distance w. Both backends are checked against it on random shapes, and against each other for all 64 flag
combinations and windows, outputs and gradients, ragged documents shorter than the window and one-token documents.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configuration_sparse_ce import DIRECTION_FLAGS
from modeling_sparse_ce.attention_dense import dense_attention
from modeling_sparse_ce.attention_windowed import windowed_attention
from modeling_sparse_ce.pattern import AttentionPattern
from modeling_sparse_ce.segments import build_segment_layout

WINDOWS = [None, 64, 16, 4, 1, 0]
BACKENDS = {"dense": dense_attention, "windowed": windowed_attention}


def make_layout(query_lens, doc_lens, query_ids, share):
    """Right-padded batch with rows ``[CLS] q [SEP] d [SEP]``; rows with equal ``query_ids`` share a query."""
    batch = len(doc_lens)
    seq = max(1 + q + d for q, d in zip(query_lens, doc_lens)) + 1  # one column of padding at least
    ids = torch.zeros(batch, seq, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for b, (q, d) in enumerate(zip(query_lens, doc_lens)):
        gen = torch.Generator().manual_seed(1000 + query_ids[b])
        ids[b, 0] = 2
        ids[b, 1 : 1 + q] = torch.randint(5, 50, (q,), generator=gen)
        ids[b, 1 + q : 1 + q + d] = torch.randint(5, 50, (d,))
        types[b, 1 + q : 1 + q + d] = 1
        mask[b, : 1 + q + d] = 1
    return build_segment_layout(ids, mask, types, share_query=share)


def pattern_of(flags, window):
    return AttentionPattern.from_flags(flags, window)


def oracle(q, k, v, layout, flags, window):
    """Per-token softmax over the keys the paper's pattern allows; packed output like the backends."""
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    b_count = layout.batch_size
    q_start = torch.cumsum(layout.query_lengths, 0) - layout.query_lengths
    d_start = torch.cumsum(layout.doc_lengths, 0) - layout.doc_lengths
    for b in range(b_count):
        u = int(layout.row_to_query[b])
        cls = [b]
        query = [b_count + int(q_start[u]) + j for j in range(int(layout.query_lengths[u]))]
        base = b_count + layout.num_query_tokens + int(d_start[b])
        doc = [base + j for j in range(int(layout.doc_lengths[b]))]
        seg = {"cls": cls, "query": query, "doc": doc}
        rows = cls + doc + (query if int(layout.query_rows[u]) == b else [])
        for i in rows:
            me = next(name for name, toks in seg.items() if i in toks)
            keys = []
            for other, toks in seg.items():
                if other == me:
                    if me == "doc" and window is not None:
                        toks = [t for t in toks if abs(t - i) <= window]
                    keys += toks
                elif flags[f"{me}_{other}_attention"]:
                    keys += toks
            scores = torch.einsum("hd,khd->hk", q[i], k[keys]) * scale
            out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[keys])
    return out


def random_qkv(layout, heads=2, dim=4, dtype=torch.float32, seed=0):
    tokens = layout.positions.shape[0]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, heads, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


def run(backend, qkv, layout, pattern):
    return BACKENDS[backend](*qkv, layout, pattern, scaling=qkv[0].shape[-1] ** -0.5)[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    dim=st.sampled_from([2, 4, 8]),
    window=st.sampled_from(WINDOWS + [2, 3]),
    flags=st.fixed_dictionaries({flag: st.booleans() for flag in DIRECTION_FLAGS}),
)
def test_backends_match_paper_oracle(data, batch, heads, dim, window, flags):
    query_ids = data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch))
    qlen_of = {u: data.draw(st.integers(1, 5)) for u in set(query_ids)}
    doc_lens = data.draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch))
    pattern = pattern_of(flags, window)
    layout = make_layout([qlen_of[u] for u in query_ids], doc_lens, query_ids, pattern.query_is_independent)
    qkv = random_qkv(layout, heads, dim, seed=data.draw(st.integers(0, 100)))
    expected = oracle(*[x.detach() for x in qkv], layout, flags, window)
    for backend in BACKENDS:
        torch.testing.assert_close(run(backend, qkv, layout, pattern), expected, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("window", WINDOWS)
def test_windowed_equals_dense_all_flag_combinations(window):
    """All 64 flag settings: ragged documents (1 token, shorter than w, longer than w), outputs and gradients."""
    doc_lens = [1, 3, 70, 9, 130]
    for values in itertools.product([False, True], repeat=len(DIRECTION_FLAGS)):
        flags = dict(zip(DIRECTION_FLAGS, values))
        pattern = pattern_of(flags, window)
        query_ids = [0, 0, 1, 0, 2] if pattern.query_is_independent else [0, 1, 2, 3, 4]
        layout = make_layout([4, 4, 2, 4, 6], doc_lens, query_ids, pattern.query_is_independent)
        grads = {}
        outs = {}
        for backend in BACKENDS:
            qkv = random_qkv(layout, seed=7)
            out = run(backend, qkv, layout, pattern)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs[backend], grads[backend] = out.detach(), [x.grad for x in qkv]
        torch.testing.assert_close(outs["windowed"], outs["dense"], atol=1e-5, rtol=1e-5, msg=str(flags))
        for g_win, g_dense in zip(grads["windowed"], grads["dense"]):
            torch.testing.assert_close(g_win, g_dense, atol=1e-5, rtol=1e-5, msg=str(flags))


def test_windowed_bf16_close_to_fp32():
    flags = {flag: True for flag in DIRECTION_FLAGS} | {"query_cls_attention": False, "query_doc_attention": False}
    pattern = pattern_of(flags, 4)
    layout = make_layout([5, 5, 3], [200, 17, 64], [0, 0, 1], True)
    qkv = random_qkv(layout, heads=4, dim=16)
    expected = run("dense", qkv, layout, pattern)
    out = run("windowed", [x.detach().bfloat16() for x in qkv], layout, pattern)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_windowed_never_builds_doc_by_doc_scores(monkeypatch):
    """Memory linear in document length: no attention call scores a document against the whole document."""
    import torch.nn.functional as F

    flags = {flag: True for flag in DIRECTION_FLAGS}
    pattern = pattern_of(flags, 4)
    layout = make_layout([4], [4000], [0], False)
    qkv = [x.detach() for x in random_qkv(layout, heads=2, dim=8)]
    largest = 0
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        nonlocal largest
        largest = max(largest, q.shape[0] * q.shape[-2] * k.shape[-2])  # blocks x rows x keys scores per head
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    expected = run("dense", qkv, layout, pattern)
    largest_dense, largest = largest, 0
    out = run("windowed", qkv, layout, pattern)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert largest_dense >= 4000 * 4000  # the spy sees the dense oracle's square
    assert 0 < largest < 2 * 4000 * 64  # a doc x doc matrix would have 4000 * 4000 entries


def test_windowed_rejects_attention_weights():
    layout = make_layout([2], [5], [0], False)
    qkv = random_qkv(layout)
    with pytest.raises(ValueError, match="output_attentions"):
        windowed_attention(*qkv, layout, pattern_of({f: True for f in DIRECTION_FLAGS}, 2), scaling=1.0, output_attentions=True)


def test_dense_weights_are_zero_outside_the_pattern():
    flags = {flag: True for flag in DIRECTION_FLAGS} | {"query_cls_attention": False, "query_doc_attention": False}
    pattern = pattern_of(flags, 1)
    layout = make_layout([3, 2], [6, 4], [0, 1], True)
    qkv = random_qkv(layout)
    _, weights = dense_attention(*qkv, layout, pattern, scaling=0.5, output_attentions=True)
    mask = pattern.dense_mask(layout.segment_ids)[0][:, None].expand_as(weights)
    valid = (layout.segment_ids >= 0)[:, None, :, None].expand_as(weights)
    assert torch.all(weights[~mask & valid] == 0)
    real = (layout.segment_ids >= 0)[:, None, :].expand_as(weights.sum(-1))
    torch.testing.assert_close(weights.sum(-1), real.float())  # real rows sum to 1, padding rows are zero
    # query row 1 of row 0 sees only the query: [CLS] (col 0) and document columns stay zero
    assert torch.all(weights[0, :, 1, 0] == 0) and torch.all(weights[0, :, 1, 4:] == 0)


def test_distinct_queries_in_unsorted_order_keep_their_rows():
    """Regression: unique() sorts queries; with nothing shared every row must still read its own query."""
    flags = {flag: False for flag in DIRECTION_FLAGS} | {"doc_query_attention": True}
    pattern = pattern_of(flags, None)
    layout = make_layout([1, 1], [1, 1], [1, 0], share=True)
    assert layout.row_to_query.tolist() == [0, 1] and not layout.shares_queries
    qkv = random_qkv(layout)
    expected = oracle(*[x.detach() for x in qkv], layout, flags, None)
    for backend in BACKENDS:
        torch.testing.assert_close(run(backend, qkv, layout, pattern), expected, atol=1e-5, rtol=1e-5, msg=backend)


def test_patterns_outside_the_flag_family_are_rejected_by_the_windowed_backend():
    pattern = pattern_of({flag: True for flag in DIRECTION_FLAGS}, 4)
    assert pattern.in_flag_family and pattern.window == 4
    matrix = pattern.matrix
    matrix[2][3] = 0  # [SEP]1 no longer attends to the document like the query does
    odd = AttentionPattern.from_matrix(matrix, 4)
    assert not odd.in_flag_family
    layout = make_layout([2], [5], [0], False)
    with pytest.raises(ValueError, match="windowed backend: the pattern .* is not one of the six-flag family"):
        windowed_attention(*random_qkv(layout), layout, odd, scaling=1.0)
