"""Per-layer five-segment attention patterns ("Understanding Matching Mechanisms in Cross-Encoders", arXiv 2507.14604).

The oracle below is written from the definition in the config's docstring, token by token on padded rows, with the
segments taken from how the test builds each row ([CLS] q [SEP] d [SEP]), not from the package: ``M[a][b] = 1`` lets
segment ``a`` attend to segment ``b``; two tokens that both lie in {doc, sep2} also need positions at most ``w`` apart;
a token that may see no key gets a zero output.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub import run_fresh
from tiny import TINY_MODEL, make_tokenizer
from transformers import AutoConfig

from configuration_sparse_ce import (
    DIRECTION_FLAGS,
    SEGMENT_NAMES,
    SparseCrossEncoderConfig,
    ablate_pattern,
    named_pattern,
    pattern_from_flags,
)
from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from modeling_sparse_ce.attention import resolve_backend
from modeling_sparse_ce.attention_dense import dense_attention
from modeling_sparse_ce.pattern import AttentionPattern
from modeling_sparse_ce.segments import build_segment_layout

CLS, QUERY, SEP1, DOC, SEP2 = range(5)


def make_batch(query_lens, doc_lens, query_ids=None):
    """Right-padded ids/types/mask for rows ``[CLS] q [SEP] d [SEP]`` and each row's segment of every position."""
    batch = len(doc_lens)
    query_ids = query_ids or list(range(batch))
    seq = max(3 + q + d for q, d in zip(query_lens, doc_lens)) + 1
    ids = torch.zeros(batch, seq, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    segments = []
    for b, (q, d) in enumerate(zip(query_lens, doc_lens)):
        gen = torch.Generator().manual_seed(1000 + query_ids[b])
        ids[b, 0], ids[b, 1 + q], ids[b, 2 + q + d] = 2, 3, 3
        ids[b, 1 : 1 + q] = torch.randint(5, 50, (q,), generator=gen)
        ids[b, 2 + q : 2 + q + d] = torch.randint(5, 50, (d,))
        types[b, 2 + q : 3 + q + d] = 1
        mask[b, : 3 + q + d] = 1
        segments.append([CLS] + [QUERY] * q + [SEP1] + [DOC] * d + [SEP2])
    return ids, types, mask, segments


def oracle(q, k, v, layout, segments, matrix, window):
    """Per-token softmax over the keys the five-segment definition allows; packed output like the backends."""
    seq = layout.seq_len
    index = {int(flat): i for i, flat in enumerate(layout.positions)}  # (row * seq + position) -> packed token
    out = (q + k + v) * 0  # zeros in the graph of q, k and v: gradients exist even when no token sees a key
    for b, segs in enumerate(segments):
        for i, si in enumerate(segs):
            if b * seq + i not in index:  # a shared query's tokens are computed in their first row only
                continue
            keys = [
                j for j, sj in enumerate(segs)
                if matrix[si][sj] and not (si in (DOC, SEP2) and sj in (DOC, SEP2) and window is not None and abs(i - j) > window)
            ]
            if not keys:
                continue  # no key: zero output
            packed_keys = [index.get(b * seq + j) for j in keys]
            if None in packed_keys:  # shared query: this row reads the query tokens of the query's first row
                first = int(layout.query_rows[layout.row_to_query[b]])
                packed_keys = [index.get(b * seq + j, index.get(first * seq + j)) for j in keys]
            scores = torch.einsum("hd,khd->hk", q[index[b * seq + i]], k[packed_keys]) / math.sqrt(q.shape[-1])
            out[index[b * seq + i]] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[packed_keys])
    return out


matrices = st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=5, max_size=5)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    matrix=matrices,
    window=st.sampled_from([None, 0, 1, 2, 4, 16]),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    dim=st.sampled_from([2, 4]),
)
def test_dense_matches_the_five_segment_oracle(data, matrix, window, batch, heads, dim):
    query_lens = data.draw(st.lists(st.integers(1, 5), min_size=batch, max_size=batch))
    doc_lens = data.draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch))
    pattern = AttentionPattern.from_matrix(matrix, window)
    share = pattern.query_is_independent and data.draw(st.booleans())
    query_ids = [0] * batch if share else None
    if share:
        query_lens = [query_lens[0]] * batch
    ids, types, mask, segments = make_batch(query_lens, doc_lens, query_ids)
    layout = build_segment_layout(ids, mask, types, share_query=share)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    tokens = layout.positions.shape[0]
    qkv = [torch.randn(tokens, heads, dim, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]
    weight = torch.randn(tokens, heads, dim, generator=gen, dtype=torch.float64)

    got = dense_attention(*qkv, layout, pattern, scaling=dim**-0.5)[0]
    expected = oracle(*qkv, layout, segments, matrix, window)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    grads_got = torch.autograd.grad((got * weight).sum(), qkv)
    grads_expected = torch.autograd.grad((expected * weight).sum(), qkv)
    for name, a, b in zip("qkv", grads_got, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
        assert torch.isfinite(a).all()


def test_a_row_without_keys_gets_zero_output_and_weights():
    matrix = [[1] * 5 for _ in range(5)]
    matrix[DOC] = [0] * 5  # document tokens attend to nothing
    ids, types, mask, _ = make_batch([2], [3])
    layout = build_segment_layout(ids, mask, types, share_query=False)
    qkv = [torch.randn(layout.positions.shape[0], 2, 4) for _ in range(3)]
    out, weights = dense_attention(*qkv, layout, AttentionPattern.from_matrix(matrix, None), scaling=0.5, output_attentions=True)
    doc_tokens = slice(layout.batch_size + layout.num_query_tokens, layout.batch_size + layout.num_query_tokens + 3)
    assert torch.all(out[doc_tokens] == 0) and torch.all(weights[0, :, 4:7] == 0)
    assert torch.isfinite(out).all() and not torch.all(out[: doc_tokens.start] == 0)


# --- config ---------------------------------------------------------------------------------------------------------


INIT = 0.2
"""initializer_range of the models here: at the default 0.02 logits differ by ~1e-4 across rows and windows 3 and 4
gave logits within the 1e-5 tolerance (issue 23)."""


def config_with(pattern=None, window=2, **fields):
    tokenizer = make_tokenizer_cached()
    base = dict(TINY_MODEL, vocab_size=len(tokenizer), pad_token_id=0, sep_token_id=3, cls_token_id=2,
                initializer_range=fields.pop("initializer_range", INIT))
    return SparseCrossEncoderConfig(attention_window_size=window, attention_pattern=pattern, **base, **fields)


_TOKENIZER = {}


def make_tokenizer_cached():
    if "tok" not in _TOKENIZER:
        import tempfile
        from pathlib import Path

        _TOKENIZER["tok"] = make_tokenizer(Path(tempfile.mkdtemp()))
    return _TOKENIZER["tok"]


def test_pattern_serialises_in_the_documented_form_and_drops_the_flags(tmp_path):
    pattern = ablate_pattern(named_pattern("sparse", 2), "doc", "query", layers=[1])
    config = config_with(pattern)
    assert all(getattr(config, flag) is None for flag in DIRECTION_FLAGS)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attention_pattern"] == {"segments": list(SEGMENT_NAMES), "layers": pattern["layers"]}
    assert all(saved.get(flag) is None for flag in DIRECTION_FLAGS)
    loaded = SparseCrossEncoderConfig.from_pretrained(tmp_path)
    assert loaded.attention_pattern == pattern and loaded.layer_matrices() == pattern["layers"]
    assert loaded.layer_matrices()[0][DOC][QUERY] == 1 and loaded.layer_matrices()[1][DOC][QUERY] == 0


def test_flags_contradicting_an_explicit_pattern_warn_once(caplog):
    pattern = named_pattern("sparse", 2)
    with caplog.at_level(logging.WARNING):
        config_with(pattern, query_doc_attention=False, doc_query_attention=True)  # agree with it: no warning
    assert "contradict" not in caplog.text
    with caplog.at_level(logging.WARNING):
        config = config_with(pattern, query_doc_attention=True, doc_cls_attention=False)
    lines = [r for r in caplog.records if "contradict" in r.getMessage()]
    assert len(lines) == 1 and "query_doc_attention" in lines[0].getMessage() and "doc_cls_attention" in lines[0].getMessage()
    assert config.query_doc_attention is None and config.layer_matrices() == pattern["layers"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["layers"].pop(), "one 5x5 matrix per layer \\(2 layers\\), got 1"),
        (lambda p: p["layers"][1].pop(), "layer 1 is not a list of 5 rows"),
        (lambda p: p["layers"][1][3].append(1), "layer 1, row 3 \\(doc\\) is not a list of 5 cells"),
        (lambda p: p["layers"][0][1].__setitem__(3, 2), "layer 0, cell \\[1\\]\\[3\\] \\(query attends to doc\\) must be 0 or 1, got 2"),
        (lambda p: p["layers"][1][4].__setitem__(0, 0.5), "layer 1, cell \\[4\\]\\[0\\] \\(sep2 attends to cls\\) must be 0 or 1"),
        (lambda p: p.__setitem__("segments", ["cls", "query", "doc"]), "segments must be"),
        (lambda p: p.__setitem__("extra", 1), "expected \\{'segments'"),
    ],
)
def test_a_wrong_pattern_names_the_layer_and_cell(mutate, message):
    pattern = named_pattern("full", 2)
    mutate(pattern)
    with pytest.raises(ValueError, match=message):
        config_with(pattern)


def test_helpers_build_the_six_flag_matrices():
    sparse = pattern_from_flags(3, query_cls_attention=False, query_doc_attention=False)
    assert sparse == named_pattern("sparse", 3)
    m = sparse["layers"][0]
    assert m[QUERY] == [0, 1, 1, 0, 0] and m[SEP1] == [0, 1, 1, 0, 0]  # [SEP]1 behaves as a query token
    assert m[DOC] == [1, 1, 1, 1, 1] and m[SEP2] == m[DOC]  # [SEP]2 as a document token
    ablated = ablate_pattern(sparse, ["doc", "sep2"], ["query", "sep1"], layers=range(1, 3))
    assert ablated["layers"][0] == m and ablated["layers"][2][DOC] == [1, 0, 0, 1, 1]
    assert sparse["layers"][2][DOC] == [1, 1, 1, 1, 1]  # the input is not modified
    with pytest.raises(ValueError, match="unknown 'title'"):
        ablate_pattern(sparse, "title", "doc")


# --- the model ------------------------------------------------------------------------------------------------------


def logits_of(config, backend, seed=0, query_lens=(3, 3, 2, 4), doc_lens=(5, 1, 40, 9), query_ids=(0, 0, 1, 2)):
    """The logits followed by every layer's hidden states at the real tokens, flattened (a difference in the
    documents' states shows even where the logits barely move)."""
    torch.manual_seed(seed)
    model = SparseCrossEncoderForSequenceClassification(config).eval()
    ids, types, mask, _ = make_batch(list(query_lens), list(doc_lens), list(query_ids))
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, token_type_ids=types, attention_backend=backend,
                       output_hidden_states=True)
    return torch.cat([output.logits.flatten(), *(states[mask.bool()].flatten() for states in output.hidden_states)])


@pytest.mark.parametrize("preset, window", [("sparse", 4), ("sparse", None), ("full", None), ("longformer", 1)])
def test_six_flag_configs_give_identical_logits_with_the_equivalent_explicit_pattern(preset, window):
    flags = SparseCrossEncoderConfig.from_preset(preset).pattern_flags
    by_flags = config_with(None, window, **flags)
    explicit = config_with(named_pattern(preset, 2), window)
    for backend in ("auto", "dense", "windowed"):
        torch.testing.assert_close(logits_of(by_flags, backend), logits_of(explicit, backend), rtol=0, atol=0)


def test_per_layer_flag_patterns_keep_the_fast_path_and_match_dense(caplog):
    pattern = {"segments": list(SEGMENT_NAMES), "layers": [
        named_pattern("sparse", 1)["layers"][0], pattern_from_flags(1, doc_query_attention=False, cls_doc_attention=False)["layers"][0],
    ]}
    config = config_with(pattern, 3)
    model = SparseCrossEncoderForSequenceClassification(config)
    patterns = model.bert.layer_patterns()
    assert patterns[0] != patterns[1] and all(p.in_flag_family for p in patterns)
    dense = logits_of(config, "dense")
    assert (logits_of(config_with(pattern, 4), "dense") - dense).abs().max() > 1e-2  # windows 3 and 4 told apart
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(logits_of(config, "windowed"), dense, atol=1e-5, rtol=1e-5)
        logits_of(config, "auto")
    assert "outside the six-flag family" not in caplog.text


def test_auto_runs_other_patterns_dense_with_one_line_and_explicit_fast_backends_raise(caplog):
    import transformers

    pattern = ablate_pattern(named_pattern("sparse", 2), "sep1", "query", layers=[1])  # [SEP]1 no longer a query token
    config = config_with(pattern, 2)
    # warning_once remembers messages per process: an earlier test may have logged this one already
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            auto = logits_of(config, "auto")
            logits_of(config, "auto")
    finally:
        transformers.logging.disable_propagation()
    assert sum("outside the six-flag family" in r.getMessage() for r in caplog.records) == 1
    assert "layers [1]" in caplog.text
    torch.testing.assert_close(auto, logits_of(config, "dense"), rtol=1e-5, atol=1e-5)  # layer 0: the fast path
    for backend in ("windowed", "kernel"):
        with pytest.raises((ValueError, RuntimeError), match="six-flag family|no kernel"):
            logits_of(config, backend)
    with pytest.raises(ValueError, match="attention_backend='windowed': layer 1: the pattern"):
        logits_of(config, "windowed")


def test_query_sharing_only_when_no_layer_lets_query_rows_see_outside_the_query():
    independent = named_pattern("sparse", 2)
    leaky = ablate_pattern(independent, "doc", "sep2")  # still independent: documents are not the query's business
    leaky["layers"][1][SEP1][DOC] = 1  # [SEP]1 sees the document in layer 1
    ids, types, mask, _ = make_batch([3, 3], [4, 6], [0, 0])
    for pattern, shared in ((independent, True), (leaky, False)):
        model = SparseCrossEncoderForSequenceClassification(config_with(pattern, 2)).eval()
        _, layout, _, _ = model.bert.encode(ids, mask, types)
        assert layout.shares_queries is shared
        unshared = SparseCrossEncoderForSequenceClassification(config_with(pattern, 2, share_query=False)).eval()
        unshared.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask, types).logits, unshared(ids, mask, types).logits, atol=1e-5, rtol=1e-5)


def test_auto_does_not_pick_the_cuda_op_for_long_rows():
    def pick(device, window, **flags):
        pattern = AttentionPattern.from_flags({f: flags.get(f, True) for f in DIRECTION_FLAGS}, window)
        return resolve_backend("auto", pattern, False, kernel_ready=True, device_type=device)

    short = dict(cls_doc_attention=False, query_doc_attention=False, query_cls_attention=False)
    assert pick("cuda", 4, **short) == "kernel" and pick("cuda", 31, **short) == "kernel"
    assert pick("cuda", 32, **short) == "windowed" and pick("cuda", None, **short) == "windowed"
    assert pick("cuda", 4, **(short | {"cls_doc_attention": True})) == "windowed"  # the paper's sparse preset
    assert pick("cuda", 4, **(short | {"query_doc_attention": True})) == "windowed"
    assert pick("cpu", 4, **(short | {"cls_doc_attention": True})) == "kernel"  # the CPU op has no such limit


LOAD = """
from sentence_transformers import CrossEncoder
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

folder, out = sys.argv[1:3]
pairs = [("how long is the flea life cycle", "a flea can live up to a year"), ("do goldfish grow", "the dog")]
result = {"pattern": AutoConfig.from_pretrained(folder, trust_remote_code=True).attention_pattern}
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
result["auto_model"] = type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__
result["scores"] = CrossEncoder(folder, trust_remote_code=True).predict(pairs).tolist()
json.dump(result, open(out, "w"))
"""


def test_explicit_patterns_round_trip_through_the_auto_classes_and_cross_encoder(tmp_path):
    from sentence_transformers import CrossEncoder

    tokenizer = make_tokenizer(tmp_path / "model")
    pattern = ablate_pattern(named_pattern("sparse", 2), "cls", ["doc", "sep2"], layers=[0])
    config = config_with(pattern, 2)
    torch.manual_seed(0)
    SparseCrossEncoderForSequenceClassification(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run_fresh(LOAD, tmp_path, tmp_path / "model", tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["pattern"] == pattern and result["auto_model"] == "SparseCrossEncoderModel"
    pairs = [("how long is the flea life cycle", "a flea can live up to a year"), ("do goldfish grow", "the dog")]
    here = CrossEncoder(str(tmp_path / "model"), trust_remote_code=True).predict(pairs).tolist()
    assert result["scores"] == pytest.approx(here, abs=1e-6)
    assert AutoConfig.from_pretrained(tmp_path / "model", trust_remote_code=True).attention_pattern == pattern
