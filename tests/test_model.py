"""The models against Hugging Face BERT and against themselves across backends, query sharing and segmentation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from modeling_sparse_ce import (
    SegmentationError,
    SparseCrossEncoderConfig,
    SparseCrossEncoderForSequenceClassification,
    SparseCrossEncoderModel,
)
from tiny import TINY_MODEL, make_config

INIT = 0.2
"""initializer_range of the models here. At the default 0.02 logits are ~0.002 and differ by ~1e-4 across rows, so a
window off by one moves them by ~4e-8 and an all-zero output passes a 5e-2 tolerance (issue 23); at 0.2 a window
off by one moves hidden states by ~1 and logits by ~1e-2."""

QUERIES = ["how long is the life cycle of a flea", "do goldfish grow", "what is wifi vs bluetooth"]
DOCS = [
    "the flea life cycle can last a year",
    "goldfish grow",
    "wifi and bluetooth are both wireless, one is for a network and the other for a short link between devices",
    "a",
    "the cat and the dog",
]


def pairs_batch(tokenizer, pairs):
    return tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")


def ragged_pairs():
    return [(QUERIES[i % 2], DOCS[i % len(DOCS)]) for i in range(7)] + [(QUERIES[2], DOCS[2])]


@pytest.fixture
def bert_and_sparse(tiny_tokenizer):
    """A random BertForSequenceClassification and the same weights in the sparse class with the ``full`` preset."""
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=len(tiny_tokenizer), num_labels=1, initializer_range=INIT, **TINY_MODEL)).eval()
    sparse = SparseCrossEncoderForSequenceClassification(make_config(tiny_tokenizer, "full", None)).eval()
    result = sparse.load_state_dict(bert.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return bert, sparse


@pytest.mark.parametrize("backend", ["auto", "dense", "windowed"])
def test_full_preset_equals_bert(bert_and_sparse, tiny_tokenizer, backend):
    bert, sparse = bert_and_sparse
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    assert not batch["attention_mask"].all()  # padded, ragged
    with torch.no_grad():
        expected = bert(**batch).logits
        logits = sparse(**batch, attention_backend=backend).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_full_preset_hidden_states_equal_bert(tiny_tokenizer):
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), initializer_range=INIT, **TINY_MODEL)).eval()
    sparse = SparseCrossEncoderModel(make_config(tiny_tokenizer, "full", None)).eval()
    sparse.load_state_dict(bert.state_dict(), strict=True)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with torch.no_grad():
        expected = bert(**batch, output_hidden_states=True)
        out = sparse(**batch, output_hidden_states=True)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[valid], expected.last_hidden_state[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    for mine, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine[valid], theirs[valid], atol=1e-5, rtol=0)


def sparse_model(tokenizer, window=2, seed=0, **overrides):
    torch.manual_seed(seed)
    config = make_config(tokenizer, "sparse", window, **{"initializer_range": INIT, **overrides})
    return SparseCrossEncoderForSequenceClassification(config).eval()


def valid_hidden_states(output, mask) -> torch.Tensor:
    """Every layer's hidden states at the real tokens, flattened (padding rows hold nothing to compare)."""
    return torch.cat([states[mask.bool()].flatten() for states in output.hidden_states])


@pytest.mark.parametrize("window", [None, 4, 1, 0])
def test_sparse_backends_agree_with_gradients(tiny_tokenizer, window):
    model = sparse_model(tiny_tokenizer, window)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    grads, logits, hidden = {}, {}, {}
    for backend in ["dense", "windowed"]:
        model.zero_grad()
        output = model(**batch, attention_backend=backend, output_hidden_states=True)
        output.logits.sum().backward()
        logits[backend], hidden[backend] = output.logits.detach(), valid_hidden_states(output, batch["attention_mask"])
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(logits["windowed"], logits["dense"], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden["windowed"], hidden["dense"], atol=1e-5, rtol=0)
    if window is not None:  # the comparison sees the window: the same weights one token wider differ 100x the tolerance
        with torch.no_grad():
            wider = sparse_model(tiny_tokenizer, window + 1)(**batch, attention_backend="dense", output_hidden_states=True)
        assert (valid_hidden_states(wider, batch["attention_mask"]) - hidden["dense"]).abs().max() > 1e-3
        assert (wider.logits - logits["dense"]).abs().max() > 1e-3
    assert grads["dense"].keys() == grads["windowed"].keys()
    for name in grads["dense"]:
        torch.testing.assert_close(grads["windowed"][name], grads["dense"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_query_computed_once_gives_same_scores(tiny_tokenizer):
    shared = sparse_model(tiny_tokenizer)
    unshared = copy.deepcopy(shared)
    unshared.config.share_query = False
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with torch.no_grad():
        hidden, layout, _, _ = shared.bert.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        _, layout_unshared, _, _ = unshared.bert.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        torch.testing.assert_close(shared(**batch).logits, unshared(**batch).logits, atol=1e-5, rtol=0)
    assert layout.num_queries == 3 and layout_unshared.num_queries == len(ragged_pairs())
    assert hidden.shape[0] < layout_unshared.positions.shape[0]


def test_query_not_shared_when_it_attends_to_the_document(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer, query_doc_attention=True)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    _, layout, _, _ = model.bert.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert layout.num_queries == len(ragged_pairs())


def test_segments_from_sep_equal_token_type_ids(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with torch.no_grad():
        expected = model(**batch).logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_padded_ids_without_mask_use_the_pad_token(tiny_tokenizer):
    """Padding is not document text: without attention_mask (and token types), [PAD] runs are found by pad_token_id."""
    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        expected = model(**batch).logits
        ids_only = model(input_ids=batch["input_ids"]).logits
        ids_and_types = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(ids_only, expected, atol=0, rtol=0)
    torch.testing.assert_close(ids_and_types, expected, atol=0, rtol=0)


def test_padding_without_mask_or_pad_id_blames_the_mask(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer, pad_token_id=None)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with pytest.raises(SegmentationError, match="attention_mask: row .* looks right-padded"):
        model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])


def test_rows_must_start_with_cls(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    batch["input_ids"][1, 0] = tiny_tokenizer.sep_token_id
    with pytest.raises(SegmentationError, match=r"row 1 starts with id 3, not \[CLS\]"):
        model(**batch)


def test_literal_sep_in_the_query_is_not_a_split_point(tiny_tokenizer):
    """Without token types a third [SEP] makes the split ambiguous: an error, never a query cut short."""
    model = sparse_model(tiny_tokenizer)
    query, doc = "do goldfish [SEP] grow", "goldfish grow"
    batch = tiny_tokenizer([query], [doc], return_tensors="pt")
    assert int((batch["input_ids"] == tiny_tokenizer.sep_token_id).sum()) == 3
    with pytest.raises(SegmentationError, match="3 \\[SEP\\] tokens"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():  # token types say where the query ends: scored as given
        assert model(**batch).logits.shape == (1, 1)


def test_dense_mask_is_built_once_per_forward(tiny_tokenizer, monkeypatch):
    from modeling_sparse_ce.pattern import AttentionPattern

    calls = []
    original = AttentionPattern.dense_mask
    monkeypatch.setattr(AttentionPattern, "dense_mask", lambda self, ids: calls.append(1) or original(self, ids))
    model = sparse_model(tiny_tokenizer)
    with torch.no_grad():
        model(**pairs_batch(tiny_tokenizer, ragged_pairs()), attention_backend="dense")
    assert len(calls) == 1 and TINY_MODEL["num_hidden_layers"] > 1


@pytest.mark.parametrize("head", ["cosine", "cls-cosine"])
def test_cosine_head_is_scaled_cosine_of_segment_means(tiny_tokenizer, head):
    model = sparse_model(tiny_tokenizer, score_head=head, cosine_scale=7.0)
    assert model.bert.pooler is None and set(dict(model.classifier.named_parameters())) == {"scale", "bias"}
    with torch.no_grad():
        model.classifier.bias.fill_(0.25)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.bert(**batch).last_hidden_state  # [batch, seq, hidden], zeros on padding
    types, mask = batch["token_type_ids"], batch["attention_mask"].bool()
    for row in range(len(logits)):
        query = hidden[row][(types[row] == 0) & mask[row]][1:].mean(0)  # after [CLS], [SEP] included
        doc = hidden[row][(types[row] == 1) & mask[row]].mean(0) if head == "cosine" else hidden[row, 0]  # [CLS]
        expected = 7.0 * torch.cosine_similarity(query, doc, dim=0) + 0.25
        assert float(logits[row, 0]) == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="score_head"):
        make_config(tiny_tokenizer, score_head="mean")


def test_cpu_training_with_gradient_checkpointing(tiny_tokenizer):
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    labels = torch.full((len(ragged_pairs()),), 2.0)
    grads = []
    for checkpointing in (False, True):
        model = sparse_model(tiny_tokenizer, window=1).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_attention_weights_follow_the_pattern(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer, window=1)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs()[:2])
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert len(out.attentions) == TINY_MODEL["num_hidden_layers"]
    weights = out.attentions[0][0, 0]  # row 0, head 0: [seq, seq]
    query_end = int((batch["token_type_ids"][0] == 0).sum())
    assert torch.all(weights[1:query_end, query_end:] == 0)  # query never sees the document
    assert torch.all(weights[1:query_end, 0] == 0)  # nor [CLS]
    doc = weights[query_end:, query_end:]
    band = torch.ones_like(doc, dtype=torch.bool).triu(-1).tril(1)
    assert torch.all(doc[~band] == 0)


def test_bf16_forward_close_to_fp32(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True)
        output = copy.deepcopy(model).to(torch.bfloat16)(**batch, output_hidden_states=True)
    assert output.logits.dtype == torch.bfloat16
    # measured errors: logits 6e-3, hidden states 6e-2 (of values up to 3.5); a zero or constant output is off by
    # more than 4x the tolerance (checked here, so that the comparison can fail)
    atol = 2e-2
    assert (expected.logits - expected.logits.mean()).abs().max() > 4 * atol
    torch.testing.assert_close(output.logits.float(), expected.logits, atol=atol, rtol=0)
    mask = batch["attention_mask"]
    torch.testing.assert_close(valid_hidden_states(output, mask).float(), valid_hidden_states(expected, mask),
                               atol=0.15, rtol=0.05)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda b: b.update(attention_mask=b["attention_mask"].flip(1)), SegmentationError, "left padding"),
        (lambda b: b.update(token_type_ids=torch.zeros_like(b["token_type_ids"])), SegmentationError, "no document"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), TypeError, "input_ids"),
        (lambda b: b.update(token_type_ids=1 - b["token_type_ids"]), SegmentationError, "token_type_ids"),
        (lambda b: b.update(token_type_ids=None, input_ids=b["input_ids"].masked_fill(b["input_ids"] == 3, 7)),
         SegmentationError, r"no \[SEP\]"),
        (lambda b: b.update(inputs_embeds=torch.zeros(1)), ValueError, "inputs_embeds"),
    ],
)
def test_bad_input_raises_clear_error(tiny_tokenizer, mutate, error, match):
    model = sparse_model(tiny_tokenizer)
    batch = dict(pairs_batch(tiny_tokenizer, ragged_pairs()))
    mutate(batch)
    with pytest.raises(error, match=match):
        model(**batch)


def test_too_long_input_names_the_limit(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer)
    ids = torch.full((1, TINY_MODEL["max_position_embeddings"] + 1), 9)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=ids)


def test_backend_argument_is_validated(tiny_tokenizer):
    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, ragged_pairs())
    with pytest.raises(ValueError, match="attention_backend"):
        model(**batch, attention_backend="flash")
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch, attention_backend="windowed", output_attentions=True)


def test_config_checks_every_field():
    for field, value in [
        ("attention_window_size", -1),
        ("attention_window_size", 2.5),
        ("cls_doc_attention", "yes"),
        ("attention_backend", "flash"),
        ("share_query", 1),
    ]:
        with pytest.raises(ValueError, match=field):
            SparseCrossEncoderConfig(**{field: value})
    with pytest.raises(ValueError, match="preset"):
        SparseCrossEncoderConfig.from_preset("bigbird")


def test_presets_and_legacy_config():
    sparse = SparseCrossEncoderConfig.from_preset("sparse")
    assert sparse.attention_window_size == 4 and not sparse.query_doc_attention and not sparse.query_cls_attention
    assert sparse.preset_name == "sparse" and sparse.num_labels == 1
    assert SparseCrossEncoderConfig.from_preset("longformer", window=16).preset_name == "longformer"
    assert SparseCrossEncoderConfig.from_preset("full").preset_name == "full"
    legacy = {"model_type": "bert", "hidden_size": 384, "attention_window_size": 4, "query_doc_attention": False,
              "query_cls_attention": False, "architectures": ["BertForSequenceClassification"], "legacy_extra": 1}
    config = SparseCrossEncoderConfig.from_legacy_dict(legacy)
    assert config.model_type == "sparse_ce" and config.attention_window_size == 4 and not config.query_doc_attention
    with pytest.raises(ValueError, match="model_type"):
        SparseCrossEncoderConfig.from_legacy_dict({"model_type": "roberta"})
    round_trip = SparseCrossEncoderConfig.from_dict(config.to_dict())
    assert round_trip.pattern_flags == config.pattern_flags


def test_empty_document_is_scored_with_a_warning(tiny_tokenizer, caplog):
    import transformers

    model = sparse_model(tiny_tokenizer)
    batch = pairs_batch(tiny_tokenizer, [(QUERIES[0], DOCS[0]), (QUERIES[1], "")])
    transformers.utils.logging.warning_once.cache_clear()  # once per process: an earlier test may have logged it
    transformers.logging.enable_propagation()
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        transformers.logging.disable_propagation()
    assert torch.isfinite(logits).all() and logits.shape == (2, 1)
    assert "empty document" in caplog.text
