"""MixEncoder (Wang et al., "Once is Enough"): the interaction layers against an oracle written from Eqs. 1-2, the
dual encoder at initialisation, pair rows against separate encoding, the query encoded once, Hub round trips,
conversion and a training smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hub import run_fresh
from tiny import TINY_MODEL, make_bert_folder, make_mixencoder_folder, make_tokenizer
from transformers import AutoModelForSequenceClassification, BertModel, BertTokenizerFast

from modeling_mixencoder import MixEncoderConfig, MixEncoderForSequenceClassification
from modeling_mixencoder.modeling_mixencoder import AUTO_MAP, remote_code_files

QUERIES = ["how long is the flea life cycle", "do goldfish grow"]
DOCS = ["the flea life cycle can last a year", "a dog", "goldfish grow fast in heat and water slow in cold",
        "what is the life cycle of a cat and a dog and a goldfish", "search"]


def tiny_config(tokenizer, **fields) -> MixEncoderConfig:
    return MixEncoderConfig(**{**TINY_MODEL, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                               "sep_token_id": tokenizer.sep_token_id, "cls_token_id": tokenizer.cls_token_id, **fields})


def random_model(tokenizer, seed=0, noise=0.1, **fields) -> MixEncoderForSequenceClassification:
    torch.manual_seed(seed)
    model = MixEncoderForSequenceClassification(tiny_config(tokenizer, **fields)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def oracle(model, query: str, doc: str, tokenizer) -> float:
    """One (query, candidate) score written from the paper's definitions, one head and one candidate at a time."""
    cfg = model.config
    q = tokenizer(query, truncation=True, max_length=cfg.max_query_length, return_tensors="pt")
    d = tokenizer(doc, truncation=True, max_length=cfg.max_candidate_length, return_tensors="pt")
    bert = model.bert
    query_states = bert(**q, output_hidden_states=True)
    h0 = query_states.last_hidden_state[0].mean(0)
    if cfg.context_strategy == "C":
        states = bert(**d).last_hidden_state[0]  # [len, hidden]
        weights = torch.softmax(model.context.vectors @ states.T / cfg.hidden_size**0.5, dim=-1)  # [k, len]
        context = weights @ states
    else:
        embeds = torch.cat([model.context.vectors, bert.embeddings.word_embeddings(d["input_ids"][0, 1:])])
        context = bert(inputs_embeds=embeds[None]).last_hidden_state[0, : cfg.num_context]
    state = h0 if cfg.dual_encoder_start else torch.zeros_like(h0)
    first = context
    heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def attention(query_vectors, keys, values):  # [m, hidden], [t, hidden], [t, hidden] -> [m, hidden]
        out = []
        for h in range(heads):
            s = slice(h * dim, (h + 1) * dim)
            p = torch.softmax(query_vectors[:, s] @ keys[:, s].T / dim**0.5, dim=-1)
            out.append(p @ values[:, s])
        return torch.cat(out, -1)

    for index, layer in zip(cfg.interaction_layer_indices(), model.interaction):
        source = bert.encoder.layer[index].attention.self
        x = query_states.hidden_states[index][0]
        key_q, value_q = source.key(x), source.value(x)
        keys = torch.cat([layer.candidate_key(context), key_q])  # Eq. 1: [K'; K]
        values = torch.cat([layer.candidate_value(context), value_q])
        mixed = attention(layer.candidate_query(context), keys, values)
        pooled = context.mean(0)
        summary = attention(layer.compress_query(pooled)[None], key_q, value_q)[0]  # Eq. 2's Attn(Q*, K, V)
        if cfg.interaction_block == "light":
            new_context = context + layer.candidate_output(mixed)
            delta = layer.query_output(summary)
            gate = torch.sigmoid(layer.gate(torch.cat([pooled, delta, state])))
            context, state = new_context, state + gate * delta
            continue
        # the authors' block (ysngki/MixEncoder DecoderLayerChunk + MyLSTMBlock), written out
        def ffn(x):
            inner = torch.nn.functional.gelu(x @ layer.intermediate.weight.T + layer.intermediate.bias)
            return layer_norm(inner @ layer.ffn_output.weight.T + layer.ffn_output.bias + x, layer.ffn_norm)

        def dense(x):
            return x @ layer.output_dense.weight.T + layer.output_dense.bias

        new_context = ffn(layer_norm(dense(mixed) + context, layer.output_norm))
        update = dense(summary)
        weight = torch.sigmoid(torch.cat([pooled, update, state]) @ layer.gate.weight.T + layer.gate.bias)
        new_state = ffn(layer_norm(weight * update + (1 - weight) * state, layer.output_norm))
        if cfg.dual_encoder_start:
            a_e, a_h = layer.blend
            new_context, new_state = context + a_e * (new_context - context), state + a_h * (new_state - state)
        context, state = new_context, new_state
    e = (first if cfg.ablation == "without_E" else context).mean(0)
    if cfg.ablation == "without_H":
        state = h0
    if cfg.score_head == "cosine":
        return float(model.classifier.scale * torch.cosine_similarity(e, state, dim=0) + model.classifier.bias)
    return float(model.classifier.linear(torch.cat([e, state])))


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LayerNorm from its definition (biased variance over the last dimension)."""
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 3), strategy=st.sampled_from(["S", "C"]), layers=st.sampled_from([[1], [0], [0, 1], [-1, 0]]),
    head=st.sampled_from(["cosine", "classifier"]), seed=st.integers(0, 10_000),
    rows=st.lists(st.tuples(st.sampled_from(QUERIES), st.sampled_from(DOCS)), min_size=1, max_size=6),
    max_candidate_length=st.sampled_from([6, 64]),
    block=st.sampled_from([("authors", True), ("authors", False), ("light", True)]),
    ablation=st.sampled_from([None, "without_H", "without_E"]),
)
def test_scores_match_the_oracle_of_eqs_1_and_2(tokenizer, k, strategy, layers, head, seed, rows, max_candidate_length,
                                                block, ablation):
    model = random_model(tokenizer, seed, num_context=k, context_strategy=strategy, interaction_layers=layers,
                         score_head=head, max_candidate_length=max_candidate_length, interaction_block=block[0],
                         dual_encoder_start=block[1], ablation=ablation).double()
    pairs = tokenizer([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**pairs).logits[:, 0]
        expected = torch.tensor([oracle(model, q, d, tokenizer) for q, d in rows], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, atol=1e-9, rtol=1e-9)  # float64; LayerNorms amplify rounding


def test_untrained_c_strategy_is_the_dual_encoder(tmp_path, tokenizer):
    """Converted from a BERT encoder, the model scores as the mean-pooled bi-encoder (exactly with zero codes)."""
    source = make_bert_folder(tmp_path / "bert")
    from sparse_ce.precompute.convert import convert_mixencoder

    folder = convert_mixencoder(source, tmp_path / "mix", num_context=2, interaction_layers=[0, 1])
    model = MixEncoderForSequenceClassification.from_pretrained(folder).eval()
    bert = BertModel.from_pretrained(source).eval()
    model.context.vectors.data.zero_()

    def pooled(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        states = bert(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return (states * mask).sum(1) / mask.sum(1)

    rows = [(q, d) for q in QUERIES for d in DOCS]
    with torch.no_grad():
        expected = 20 * torch.cosine_similarity(pooled([q for q, _ in rows]), pooled([d for _, d in rows]))
        logits = model(**tokenizer([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")).logits[:, 0]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert model.config.cosine_scale == 20.0


def test_pair_rows_equal_separate_encoding_and_are_batch_invariant(tokenizer):
    model = random_model(tokenizer, 3, num_context=2, context_strategy="C", interaction_layers=[0, 1],
                         max_query_length=5, max_candidate_length=8)  # long queries and documents are cut
    rows = [(q, d) for q in QUERIES for d in DOCS]
    with torch.no_grad():
        together = model(**tokenizer([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([q], [d], return_tensors="pt")).logits for q, d in rows])
        separate = []
        for q in QUERIES:
            queries = model.encode_queries(**tokenizer([q], truncation=True, max_length=5, return_tensors="pt"))
            docs = tokenizer(DOCS, truncation=True, max_length=8, padding=True, return_tensors="pt")
            separate.append(model.score_candidates(queries, model.encode_candidates(docs["input_ids"], docs["attention_mask"])))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)


def test_a_query_is_encoded_once_for_all_its_candidates(tokenizer):
    model = random_model(tokenizer, 1)
    sizes = []
    hook = model.bert.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]), with_kwargs=True)
    with torch.no_grad():
        model(**tokenizer([QUERIES[0]] * 5 + [QUERIES[1]] * 2, DOCS + DOCS[:2], padding=True, return_tensors="pt"))
    hook.remove()
    assert sorted(sizes) == [2, 7]  # two distinct queries in one forward, seven candidates in another


def test_config_rejects_bad_settings_by_name(tokenizer):
    for fields, message in (
        ({"num_context": 0}, "num_context"), ({"context_strategy": "X"}, "context_strategy"),
        ({"interaction_layers": [2]}, "interaction_layers"), ({"interaction_layers": [1, -1]}, "names a layer twice"),
        ({"score_head": "dot"}, "score_head"), ({"max_candidate_length": 2}, "max_candidate_length"),
        ({"interaction_block": "heavy"}, "interaction_block"), ({"ablation": "without_Q"}, "ablation"),
        ({"dual_encoder_start": "yes"}, "dual_encoder_start"),
        ({"interaction_block": "light", "dual_encoder_start": False}, "light block starts from the dual encoder"),
    ):
        with pytest.raises(ValueError, match=message):
            tiny_config(tokenizer, **fields)


@pytest.mark.slow
def test_hub_folder_round_trip_in_a_fresh_process(tmp_path):
    folder = make_mixencoder_folder(tmp_path / "mix", k=2, strategy="S")
    assert {p.name for p in folder.glob("*.py")} == {p.name for p in remote_code_files()}
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    rows = [(q, d) for q in QUERIES for d in DOCS]
    model = MixEncoderForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**tokenizer([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")).logits[:, 0]
    torch.save({"rows": rows, "expected": expected}, tmp_path / "expected.pt")
    run_fresh("""
        sys.modules["modeling_mixencoder"] = None
        from sentence_transformers import CrossEncoder
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder, data = sys.argv[1], torch.load(sys.argv[2])
        rows, expected = data["rows"], data["expected"]
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tok = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            logits = model(**tok([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")).logits[:, 0]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        ce = CrossEncoder(folder, trust_remote_code=True, activation_fn=torch.nn.Identity())
        torch.testing.assert_close(torch.tensor(ce.predict(rows)), expected, atol=1e-5, rtol=1e-5)
        model.save_pretrained(sys.argv[3])  # saving again keeps a loadable flat folder
        again = AutoModelForSequenceClassification.from_pretrained(sys.argv[3], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(**tok([q for q, _ in rows], [d for _, d in rows], padding=True, return_tensors="pt")).logits[:, 0], expected)
    """, tmp_path, folder, tmp_path / "expected.pt", tmp_path / "saved-again")


def test_push_to_hub_uploads_the_complete_folder(tokenizer, tmp_path, monkeypatch):
    """``save_pretrained(push_to_hub=True)`` pushes only after the code files and auto_map are written."""
    model, pushed = random_model(tokenizer), []

    def fake_push(repo_id, **kwargs):  # stands in for the network upload; records the folder as it is then
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        pushed.append((repo_id, kwargs, sorted(p.name for p in (tmp_path / "out").iterdir()), config["auto_map"]))

    monkeypatch.setattr(model, "push_to_hub", fake_push)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/mix", private=True)
    assert len(pushed) == 1
    repo_id, kwargs, files, auto_map = pushed[0]
    assert repo_id == "me/mix" and kwargs == {"private": True} and auto_map == AUTO_MAP
    assert {p.name for p in remote_code_files()} <= set(files) and "model.safetensors" in files


def test_convert_command_and_its_errors(tmp_path, capsys):
    from sparse_ce.cli import main

    source = make_bert_folder(tmp_path / "bert")
    assert main(["convert", str(source), str(tmp_path / "mix"), "--arch", "mixencoder", "--k", "3", "--strategy", "S",
                 "--interaction-layers", "0", "1"]) == 0
    config = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert (config["model_type"], config["num_context"], config["context_strategy"], config["interaction_layers"]) == (
        "sparse_ce_mixencoder", 3, "S", [0, 1])
    assert "--arch mixencoder" in (tmp_path / "mix" / "README.md").read_text()
    assert main(["convert", str(source), str(tmp_path / "other"), "--arch", "mixencoder", "--window", "4"]) == 2
    assert "--window: options of sparse cross-encoders" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        main(["convert", str(source), str(tmp_path / "mix"), "--arch", "mixencoder"])


@pytest.mark.slow
def test_train_st_mixencoder_with_in_batch_negatives_and_distillation(tmp_path):
    from test_training import make_data_folder

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import train_st

    data = make_data_folder(tmp_path / "data")
    init = make_bert_folder(tmp_path / "bert")
    out = tmp_path / "trained"
    argv = ["--arch", "mixencoder", "--output", str(out), "--init", str(init), "--k", "2", "--interaction-layers", "0",
            "1", "--loss", "listwise+mnrl", "--freeze-encoder", "--teacher", "bm25", "--data", str(data),
            "--max-steps", "4", "--batch-size", "2", "--mnrl-negatives", "1", "--list-size", "3", "--lists-per-query",
            "2", "--dev-queries", "0", "--lr", "1e-2", "--new-parts-lr", "5e-2", "--cache-dir", str(tmp_path / "cache")]
    assert train_st.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["arch"] == "mixencoder" and record["steps"] == 4 and record["loss"] == "listwise+mnrl"
    assert record["mixencoder"]["num_context"] == 2 and record["mixencoder"]["freeze_encoder"] is True
    assert record["new_parts_lr"] == 5e-2 and record["mixencoder"]["interaction_block"] == "authors"
    before = MixEncoderForSequenceClassification.from_pretrained(init).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).state_dict()
    assert torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"], after["bert.encoder.layer.0.attention.self.query.weight"])
    assert after["interaction.1.blend"].abs().sum() > 0  # the zero-initialised blend of the authors' block learned
    assert "## Training" in (out / "README.md").read_text()


def test_a_folder_saved_before_the_authors_block_loads_as_the_light_block(tmp_path, tokenizer):
    """Configs written before ``interaction_block`` existed hold light-block weights: they load as such, same scores."""
    model = random_model(tokenizer, 5, interaction_block="light", interaction_layers=[0, 1])
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["interaction_block"], config["dual_encoder_start"], config["ablation"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = MixEncoderForSequenceClassification.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.interaction_block == "light"
    pairs = tokenizer(QUERIES, DOCS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**pairs).logits, model(**pairs).logits)
