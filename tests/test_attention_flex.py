"""The FlexAttention backends against the five-segment definition (arXiv 2507.14604; Schlatt et al., ECIR 2024).

``flex-eager`` (uncompiled FlexAttention) on random 5x5 patterns, windows, ragged rows, empty documents, long queries
and shared queries against the token-by-token oracle of test_layer_patterns.py (written from the definition, no code
shared with the package), with the default 128-token blocks and with 16-token blocks (so that one sequence spans
several blocks and the none/partial/full block classification matters); that classification against FlexAttention's
own ``create_block_mask``; compiled ``flex`` on a subset (one compile per process, few recompiles); whole models
against the oracle and through AutoModel and CrossEncoder; the clear CPU backward error; ``auto``'s rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import run_fresh
from test_layer_patterns import make_batch, oracle
from tiny import make_config, make_model_folder

import modeling_sparse_ce.attention_flex as flex_module
from configuration_sparse_ce import DIRECTION_FLAGS, SEGMENT_NAMES
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce.attention import ATTENTION_FUNCTIONS, register_attention_backend, resolve_backend
from modeling_sparse_ce.attention_flex import FlexBackwardOnCPU, flex_available, flex_block_mask, key_ranges
from modeling_sparse_ce.pattern import AttentionPattern
from modeling_sparse_ce.segments import build_segment_layout

pytestmark = pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")

matrices = st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=5, max_size=5)
WINDOWS = [None, 0, 1, 2, 4, 16]


def random_case(data, matrix, window, batch, max_query=30, max_doc=40):
    """A layout of ragged rows (shared queries when the pattern allows and hypothesis says so) and its segments."""
    pattern = AttentionPattern.from_matrix(matrix, window)
    query_lens = data.draw(st.lists(st.integers(1, max_query), min_size=batch, max_size=batch))
    doc_lens = data.draw(st.lists(st.integers(0, max_doc), min_size=batch, max_size=batch))  # 0: [SEP] only
    share = pattern.query_is_independent and data.draw(st.booleans())
    if share:
        query_lens = [query_lens[0]] * batch
    ids, types, mask, segments = make_batch(query_lens, doc_lens, [0] * batch if share else None)
    layout = build_segment_layout(ids, mask, types, share_query=share)
    assert layout.shares_queries == (share and batch > 1)
    return pattern, layout, segments


def qkv_of(layout, heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.positions.shape[0], heads, dim, generator=gen) for _ in range(3)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), matrix=matrices, window=st.sampled_from(WINDOWS), batch=st.integers(1, 4),
       heads=st.integers(1, 3), dim=st.sampled_from([2, 4, 8]), block=st.sampled_from([16, 128]))
def test_flex_eager_matches_the_five_segment_oracle(monkeypatch, data, matrix, window, batch, heads, dim, block):
    monkeypatch.setattr(flex_module, "CPU_BLOCK_SIZE", block)
    pattern, layout, segments = random_case(data, matrix, window, batch)
    qkv = qkv_of(layout, heads, dim, data.draw(st.integers(0, 1000)))
    got = ATTENTION_FUNCTIONS["flex-eager"](*qkv, layout, pattern, scaling=dim**-0.5)[0]
    expected = oracle(*[x.double() for x in qkv], layout, segments, matrix, window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), matrix=matrices, window=st.sampled_from(WINDOWS), batch=st.integers(1, 6))
def test_block_classification_equals_create_block_mask(data, matrix, window, batch):
    """Counting keys from the ranges gives FlexAttention's own none / partial / full blocks of the same mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    pattern, layout, _ = random_case(data, matrix, window, batch, max_doc=60)
    chunk = data.draw(st.sampled_from([16 * 16, flex_module.CLASSIFY_CHUNK]))  # one or several q blocks per chunk
    flex_module.CLASSIFY_CHUNK, default = chunk, flex_module.CLASSIFY_CHUNK
    try:
        ours = flex_block_mask(layout, pattern, torch.device("cpu"), block=16)
    finally:
        flex_module.CLASSIFY_CHUNK = default
    padded = ours.seq_lengths[0]
    theirs = create_block_mask(ours.mask_mod, None, None, padded, padded, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # blocks with any key
    full = lambda m: m.full_kv_num_blocks[0, 0]  # noqa: E731
    assert torch.equal(full(ours), full(theirs))


def test_key_ranges_of_the_papers_pattern():
    """[CLS] sees the query and the whole document, the query only itself, the document [CLS], query and +-w."""
    flags = {f: True for f in DIRECTION_FLAGS} | {"query_cls_attention": False, "query_doc_attention": False}
    ids, types, mask, _ = make_batch([2], [6])  # [CLS] q q [SEP] d*6 [SEP]: packed cls 0 | query 1-3 | doc 4-10
    layout = build_segment_layout(ids, mask, types)
    lo, hi = key_ranges(layout, AttentionPattern.from_flags(flags, 1))
    ranges = lambda i: [(int(a), int(b)) for a, b in zip(lo[i], hi[i]) if b > a]  # noqa: E731
    assert ranges(0) == [(0, 1), (1, 3), (3, 4), (4, 10), (10, 11)]
    assert ranges(1) == [(1, 3), (3, 4)]
    assert ranges(6) == [(0, 1), (1, 3), (3, 4), (5, 8)]  # document token 2 of 6: positions 1-3
    assert ranges(10) == [(0, 1), (1, 3), (3, 4), (9, 10), (10, 11)]  # [SEP]2 sees the last document token


def test_compiled_flex_matches_the_oracle_with_few_recompiles():
    """torch.compile(flex_attention, dynamic=True) on CPU: layouts of new lengths reuse the compiled graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    cases = [([3, 5], [40, 7], [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], 4),
             ([9], [300], [[1, 1, 0, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 0, 1, 1, 1], [1, 1, 1, 0, 1]], None),
             ([4, 4, 2], [150, 0, 220], [[1] * 5, [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1] * 5, [1] * 5], 0),
             ([6, 1], [90, 400], [[0] * 5, [0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 1, 1]], 16),
             ([2, 2], [60, 61], [[1] * 5, [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1] * 5, [1] * 5], 1)]
    for query_lens, doc_lens, matrix, window in cases:
        ids, types, mask, segments = make_batch(query_lens, doc_lens)
        layout = build_segment_layout(ids, mask, types, share_query=False)
        qkv = qkv_of(layout, 2, 8, seed=len(doc_lens))
        pattern = AttentionPattern.from_matrix(matrix, window)
        got = ATTENTION_FUNCTIONS["flex"](*qkv, layout, pattern, scaling=8**-0.5)[0]
        expected = oracle(*[x.double() for x in qkv], layout, segments, matrix, window)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=str((query_lens, doc_lens)))
    assert 1 <= counters["stats"]["unique_graphs"] - graphs_before <= 3  # sizes 1 and >1 of a dimension specialise, lengths do not


def test_backward_on_cpu_raises_one_clear_error():
    ids, types, mask, _ = make_batch([3], [10])
    layout = build_segment_layout(ids, mask, types)
    qkv = [x.requires_grad_() for x in qkv_of(layout, 2, 4, seed=0)]
    pattern = AttentionPattern.from_flags({f: True for f in DIRECTION_FLAGS}, 2)
    out = ATTENTION_FUNCTIONS["flex-eager"](*qkv, layout, pattern, scaling=0.5)[0]  # the forward runs
    with pytest.raises(FlexBackwardOnCPU, match="no backward on CPU.*'windowed', 'kernel' or 'dense'"):
        out.sum().backward()


def test_dropout_and_weights_are_refused():
    ids, types, mask, _ = make_batch([3], [10])
    layout = build_segment_layout(ids, mask, types)
    pattern = AttentionPattern.from_flags({f: True for f in DIRECTION_FLAGS}, 2)
    qkv = qkv_of(layout, 2, 4, seed=0)
    with pytest.raises(ValueError, match="no attention dropout"):
        ATTENTION_FUNCTIONS["flex-eager"](*qkv, layout, pattern, scaling=0.5, dropout=0.1)
    with pytest.raises(ValueError, match="output_attentions"):
        ATTENTION_FUNCTIONS["flex-eager"](*qkv, layout, pattern, scaling=0.5, output_attentions=True)


def test_auto_picks_flex_on_cuda_only():
    def pick(device, matrix, window=4, **kwargs):
        return resolve_backend("auto", AttentionPattern.from_matrix(matrix, window), False, kernel_ready=True,
                               device_type=device, flex_ready=True, **kwargs)

    paper = AttentionPattern.from_flags({f: True for f in DIRECTION_FLAGS} | {
        "query_cls_attention": False, "query_doc_attention": False}, 4).matrix
    odd = [row[:] for row in paper]
    odd[2][3] = 1  # [SEP]1 sees the document: outside the six-flag family
    assert pick("cuda", paper) == "flex" and pick("cuda", odd) == "flex"
    assert pick("cuda", [[1] * 5] * 5, window=None) == "dense"  # plain BERT: one SDPA call
    assert pick("cuda", paper, dropout=True) == "windowed"  # flex has no attention dropout
    assert pick("cpu", paper) == "kernel" and pick("cpu", odd) == "dense"  # CPU keeps its measured choice


# --- whole models -------------------------------------------------------------------------------------------------


def random_layer_patterns(seed: int, layers: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    matrices = (torch.rand(layers, 5, 5, generator=gen) < 0.6).int()
    matrices[:, 1:3, 3:] = 0  # query and [SEP]1 independent of the document in every layer: queries are shared
    matrices[:, 1:3, 0] = 0
    return {"segments": list(SEGMENT_NAMES), "layers": matrices.tolist()}


@pytest.mark.parametrize("backend", ["flex-eager", "flex"])
def test_model_with_per_layer_patterns_matches_the_oracle(tiny_tokenizer, backend):
    """Hidden states of every layer, weights large enough (initializer_range 0.2) that a wrong key would show."""
    pattern = random_layer_patterns(seed=3, layers=3)
    config = make_config(tiny_tokenizer, window=3, num_hidden_layers=3, initializer_range=0.2, attention_pattern=pattern)
    torch.manual_seed(0)
    model = SparseCrossEncoderForSequenceClassification(config).eval()
    ids, types, mask, segments = make_batch([4, 4, 4, 7], [30, 2, 0, 45], [0, 0, 0, 1])

    def oracle_backend(q, k, v, layout, layer_pattern, *, scaling, dropout=0.0, output_attentions=False):
        return oracle(q, k, v, layout, segments, layer_pattern.matrix, layer_pattern.window), None

    register_attention_backend("oracle", oracle_backend)
    try:
        with torch.no_grad():
            want = model(ids, mask, types, attention_backend="oracle", output_hidden_states=True)
            got = model(ids, mask, types, attention_backend=backend, output_hidden_states=True)
    finally:
        del ATTENTION_FUNCTIONS["oracle"]
    for layer, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"layer {layer}")
    assert want.logits.std() > 1e-3 and want.hidden_states[-1].std() > 0.1  # differences would be visible


CROSS_ENCODER = """
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification

folder, out = sys.argv[1:3]
pairs = [("how long do fleas live", "the flea life cycle is long in a warm year"),
         ("how long do fleas live", "dog"), ("what is wifi", "wifi and bluetooth are a fast search of light")]
result = {}
for backend in ("dense", "flex-eager", "flex"):
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, attention_backend=backend)
    assert type(model).__name__ == "SparseCrossEncoderForSequenceClassification", type(model)
    cross_encoder = CrossEncoder(folder, trust_remote_code=True, config_kwargs={"attention_backend": backend})
    assert cross_encoder.model.config.attention_backend == backend
    result[backend] = cross_encoder.predict(pairs, activation_fn=torch.nn.Identity()).tolist()
    assert CrossEncoder(folder, trust_remote_code=True).model.config.attention_backend == "auto"
json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_cross_encoder_scores_with_flex_equal_dense(tmp_path):
    folder = make_model_folder(tmp_path / "model", window=2, initializer_range=0.2)
    run_fresh(CROSS_ENCODER, tmp_path, folder, tmp_path / "scores.json")
    import json

    scores = json.loads((tmp_path / "scores.json").read_text())
    assert max(abs(a - b) for a, b in zip(scores["dense"], scores["dense"][1:])) > 1e-3  # rows differ visibly
    for backend in ("flex-eager", "flex"):
        assert scores[backend] == pytest.approx(scores["dense"], abs=1e-4), backend
    assert not math.isnan(sum(scores["flex"]))
