"""Ablation modes ("Understanding Matching Mechanisms in Cross-Encoders", arXiv 2507.14604; issue 26 item 5).

``renormalise`` takes a removed direction's keys out of the softmax; ``zero`` (the paper's) keeps the softmax over the
model's own pattern and sets the removed weights to 0 afterwards, without renormalising. The oracle below is written
from that definition token by token on padded rows (test_layer_patterns.make_batch builds the rows): ``p = softmax``
over the keys ``layers`` allows (and the window), then ``p[j] = 0`` where ``zeroed`` marks (segment i, segment j),
output ``sum_j p[j] v[j]``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layer_patterns import make_batch

from configuration_sparse_ce import SEGMENT_NAMES, SparseCrossEncoderConfig, check_attention_pattern
from modeling_sparse_ce.attention import ATTENTION_FUNCTIONS, resolve_backend
from modeling_sparse_ce.attention_dense import dense_attention
from modeling_sparse_ce.pattern import AttentionPattern
from modeling_sparse_ce.segments import build_segment_layout
from sparse_ce.analysis.directions import Ablation

DOC, SEP2 = 3, 4
matrices = st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=5, max_size=5)


def zero_mode_oracle(q, k, v, layout, segments, matrix, zeroed, window):
    seq = layout.seq_len
    index = {int(flat): i for i, flat in enumerate(layout.positions)}
    out = torch.zeros_like(q)
    for b, segs in enumerate(segments):
        for i, si in enumerate(segs):
            if b * seq + i not in index:
                continue
            keys = [j for j, sj in enumerate(segs) if matrix[si][sj] and not (
                si in (DOC, SEP2) and sj in (DOC, SEP2) and window is not None and abs(i - j) > window)]
            if not keys:
                continue
            first = int(layout.query_rows[layout.row_to_query[b]])
            packed = [index.get(b * seq + j, index.get(first * seq + j)) for j in keys]
            p = (torch.einsum("hd,khd->hk", q[index[b * seq + i]], k[packed]) / math.sqrt(q.shape[-1])).softmax(-1)
            kept = torch.tensor([0.0 if zeroed[si][segs[j]] else 1.0 for j in keys], dtype=q.dtype)
            out[index[b * seq + i]] = torch.einsum("hk,khd->hd", p * kept, v[packed])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), matrix=matrices, zeroed=matrices, window=st.sampled_from([None, 0, 1, 4]),
       batch=st.integers(1, 3), heads=st.integers(1, 3))
def test_dense_zero_mode_matches_the_oracle(data, matrix, zeroed, window, batch, heads):
    query_lens = data.draw(st.lists(st.integers(1, 5), min_size=batch, max_size=batch))
    doc_lens = data.draw(st.lists(st.integers(0, 15), min_size=batch, max_size=batch))
    ids, types, mask, segments = make_batch(query_lens, doc_lens)
    layout = build_segment_layout(ids, mask, types, share_query=False)
    pattern = AttentionPattern.from_matrix(matrix, window, zeroed)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    qkv = [torch.randn(layout.positions.shape[0], heads, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    got, weights = dense_attention(*qkv, layout, pattern, scaling=0.5, output_attentions=True)
    expected = zero_mode_oracle(*qkv, layout, segments, matrix, zeroed, window)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dense_attention(*qkv, layout, pattern, scaling=0.5)[0], got, atol=1e-10, rtol=1e-10)
    assert bool((weights.sum(-1) <= 1 + 1e-9).all())  # never renormalised upwards


def test_zero_mode_differs_from_renormalising_where_a_sink_is_removed():
    """Removing document -> [SEP]2: renormalising moves [SEP]2's mass to the other keys, zeroing drops it."""
    ids, types, mask, _ = make_batch([3], [6])
    layout = build_segment_layout(ids, mask, types)
    full = [[1] * 5 for _ in range(5)]
    removed = [row[:] for row in full]
    removed[DOC][SEP2] = 0
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(layout.positions.shape[0], 2, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    base = dense_attention(*qkv, layout, AttentionPattern.from_matrix(full, None), scaling=0.5, output_attentions=True)
    renorm = dense_attention(*qkv, layout, AttentionPattern.from_matrix(removed, None), scaling=0.5, output_attentions=True)
    zeroed = [[int(a and not b) for a, b in zip(r1, r2)] for r1, r2 in zip(full, removed)]
    zero = dense_attention(*qkv, layout, AttentionPattern.from_matrix(full, None, zeroed), scaling=0.5,
                           output_attentions=True)
    doc_rows = layout.segment_ids[0] == DOC
    base_w, renorm_w, zero_w = (w[1][0][:, doc_rows] for w in (base, renorm, zero))
    sep2 = layout.segment_ids[0] == SEP2
    assert torch.allclose(zero_w[..., ~sep2], base_w[..., ~sep2])  # the other weights are left as they were
    assert (zero_w[..., sep2] == 0).all() and (renorm_w[..., sep2] == 0).all()
    torch.testing.assert_close(renorm_w.sum(-1), torch.ones_like(renorm_w.sum(-1)))
    assert bool((zero_w.sum(-1) < 1 - 1e-6).all())  # the sink's mass is gone
    nothing = AttentionPattern.from_matrix(full, None, [[0] * 5 for _ in range(5)])
    assert nothing == AttentionPattern.from_matrix(full, None) and not nothing.has_zeroed


def test_only_dense_runs_zeroing_and_auto_picks_it():
    pattern = AttentionPattern.from_matrix([[1] * 5] * 5, 4, [[1, 0, 0, 0, 0]] + [[0] * 5] * 4)
    assert pattern.has_zeroed and not pattern.in_flag_family and not pattern.is_full
    for device in ("cpu", "cuda"):
        assert resolve_backend("auto", pattern, False, kernel_ready=True, device_type=device, flex_ready=True) == "dense"
    for name in ("windowed", "kernel", "flex", "flex-eager"):
        with pytest.raises(ValueError, match="zeroes weights after the softmax"):
            resolve_backend(name, pattern, False)
    ids, types, mask, _ = make_batch([2], [5])
    layout = build_segment_layout(ids, mask, types)
    qkv = [torch.randn(layout.positions.shape[0], 1, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="only 'dense'"):
        ATTENTION_FUNCTIONS["flex-eager"](*qkv, layout, pattern, scaling=0.5)


def test_config_keeps_zeroed_and_ablation_builds_it():
    base = [[[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]] for _ in range(2)]
    ablation = Ablation("document -> [SEP]2 and [CLS]", (("doc", "sep2"), ("doc", "cls")), "upper")
    renormalised = ablation.apply(base)
    zero = ablation.apply(base, "zero")
    assert "zeroed" not in renormalised and renormalised["layers"][1][3][4] == 0 and renormalised["layers"][0][3][4] == 1
    assert zero["layers"] == base and zero["zeroed"][1][3][4] == 1 and zero["zeroed"][1][3][0] == 1
    assert sum(cell for m in zero["zeroed"] for row in m for cell in row) == 2  # upper layer only, two cells
    assert Ablation("query -> document", (("query", "doc"),), "all").apply(base, "zero")["zeroed"] == [[[0] * 5] * 5] * 2
    config = SparseCrossEncoderConfig(num_hidden_layers=2, attention_pattern=zero)
    again = SparseCrossEncoderConfig.from_dict(config.to_dict())
    assert again.layer_zeroed() == zero["zeroed"] and again.layer_matrices() == base
    with pytest.raises(ValueError, match="zeroed layer 1, cell"):
        check_attention_pattern({"segments": list(SEGMENT_NAMES), "layers": base,
                                 "zeroed": [zero["zeroed"][0], [[2] * 5] * 5]}, 2)
    with pytest.raises(ValueError, match="mode"):
        ablation.apply(base, "softmax")


def test_analyze_ablate_zero_mode_end_to_end(tmp_path):
    """Through the command: records and summary carry the mode; zeroing a [SEP] sink scores differently from
    taking it out of the softmax, and a direction the model lacks is unchanged in both modes."""
    import json

    from tiny import make_data_folder, make_model_folder

    from sparse_ce.cli import main

    model = make_model_folder(tmp_path / "model", preset="sparse", window=2, seed=3, initializer_range=0.2)
    data = make_data_folder(tmp_path / "data")
    records = {}
    for mode in ("renormalise", "zero"):
        out = tmp_path / mode
        assert main(["analyze", "ablate", "--model", str(model), "--collections", "dl19", "--data", str(data),
                     "--depth", "4", "--output-dir", str(out), "--threads", "1", "--mode", mode]) == 0
        records[mode] = {(r.get("group") or (r["from"], r["to"]), r["layers"]): r
                         for r in json.loads((out / "ablation.json").read_text())}
        assert json.loads((out / "ablation-summary.json").read_text())["mode"] == mode
        assert all(r["mode"] == mode for r in records[mode].values())
        assert records[mode][(("query", "doc"), "all")]["unchanged"]  # off in the paper's pattern
    sink = (("doc", "sep2"), "all")
    assert not records["zero"][sink]["unchanged"] and not records["renormalise"][sink]["unchanged"]
    # the two modes give the model different scores (the nDCG of 8 tiny queries at depth 4 may not move)
    from sparse_ce.analysis.ablate import set_pattern
    from sparse_ce.rank.scoring import PairScorer

    scorer = PairScorer(str(model), progress=False)
    pairs = (["how long is the flea life cycle", "do goldfish grow"], ["a flea can live up to a year", "goldfish grow"])
    base = scorer.model.config.layer_matrices()
    scores = {}
    for mode in ("renormalise", "zero"):
        set_pattern(scorer.model, Ablation("document -> [SEP]2", (("doc", "sep2"),), "all").apply(base, mode))
        scores[mode] = scorer.score(*pairs)[0]
    set_pattern(scorer.model, None)
    assert max(abs(a - b) for a, b in zip(scores["zero"], scores["renormalise"])) > 1e-4
