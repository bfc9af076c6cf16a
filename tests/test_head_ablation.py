"""Head ablation (``analyze ablate --heads``; issue 26 item 6).

Oracle: removing head h of layer l zeroes its slice of the context vector before ``attention.output.dense``, which is
the same as a copy of the model whose dense weight has columns ``h * head_dim : (h + 1) * head_dim`` set to zero.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import make_config, make_data_folder, make_model_folder, make_tokenizer

from modeling_sparse_ce.modeling_sparse_ce import SparseCrossEncoderForSequenceClassification
from sparse_ce.analysis.head_ablation import ablated_heads, check_heads, parse_head, random_heads
from sparse_ce.cli import main

HEADS = [(0, 1), (1, 0), (1, 3)]


def oracle(model, heads):
    """A copy of ``model`` with the heads' input columns of the output projection zeroed."""
    copied = copy.deepcopy(model)
    dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, head in heads:
            copied.bert.encoder.layer[layer].attention.output.dense.weight[:, head * dim : (head + 1) * dim] = 0
    return copied


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["dense", "windowed", "flex-eager"])
def test_hooked_forward_equals_zeroed_projection_columns(tmp_path, backend):
    tokenizer = make_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = SparseCrossEncoderForSequenceClassification(make_config(tokenizer, "sparse", 2, initializer_range=0.2)).eval()
    inputs = tokenizer(["how long is the flea life cycle", "do goldfish grow"],
                       ["a flea can live up to a year in a house", "goldfish grow fast"], padding=True, return_tensors="pt")
    with torch.no_grad():
        base = model(**inputs, attention_backend=backend).logits
        with ablated_heads(model, HEADS):
            hooked = model(**inputs, attention_backend=backend).logits
        expected = oracle(model, HEADS)(**inputs, attention_backend=backend).logits
        after = model(**inputs, attention_backend=backend).logits
    torch.testing.assert_close(hooked, expected, atol=1e-6, rtol=1e-5)
    assert (hooked - base).abs().max() > 1e-4  # the heads mattered
    torch.testing.assert_close(after, base, atol=0, rtol=0)  # hooks removed
    assert all(not layer.attention.output.dense._forward_pre_hooks for layer in model.bert.encoder.layer)


def test_hooks_are_removed_when_the_forward_fails(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    model = SparseCrossEncoderForSequenceClassification(make_config(tokenizer)).eval()
    with pytest.raises(RuntimeError, match="inside"), ablated_heads(model, [(0, 0)]):
        raise RuntimeError("inside")
    assert all(not layer.attention.output.dense._forward_pre_hooks for layer in model.bert.encoder.layer)


def test_heads_are_validated_naming_the_bad_value():
    import argparse

    assert parse_head("2.9") == (2, 9)
    for text in ("2", "a.b", "2.-1", "1.2.3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="LAYER.HEAD"):
            parse_head(text)
    check_heads([(0, 0), (1, 3)], 2, 4)
    with pytest.raises(ValueError, match=r"--heads 2\.0: layer 2 is out of range; the model has layers 0-1"):
        check_heads([(0, 0), (2, 0)], 2, 4)
    with pytest.raises(ValueError, match=r"--heads 1\.4: head 4 is out of range; the model has heads 0-3"):
        check_heads([(1, 4)], 2, 4)
    with pytest.raises(ValueError, match=r"1\.1 named more than once"):
        check_heads([(1, 1), (1, 1)], 2, 4)


def test_random_heads_match_the_layers_and_avoid_the_named_heads():
    draws = random_heads(HEADS, 4, 50, seed=1)
    assert len(draws) == 50 and draws == random_heads(HEADS, 4, 50, seed=1)
    for draw in draws:
        assert sorted(l for l, _ in draw) == [0, 1, 1] and not set(draw) & set(HEADS) and len(set(draw)) == 3
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="layer 1 has 1 heads besides the named ones; 3 needed"):
        random_heads([(1, 0), (1, 1), (1, 2)], 4, 1)


def test_analyze_ablate_heads_end_to_end(tmp_path, capsys):
    model = make_model_folder(tmp_path / "model", preset="sparse", window=2, seed=3, initializer_range=0.2)
    data = make_data_folder(tmp_path / "data")
    out = tmp_path / "out"
    common = ["analyze", "ablate", "--model", str(model), "--collections", "dl19", "--data", str(data), "--depth", "4",
              "--threads", "1"]
    assert main([*common, "--output-dir", str(out), "--heads", "1.0", "0.1", "--random-heads", "3", "--seed", "2"]) == 0
    assert not (out / "ablation.json").exists()  # --heads alone: no direction sets
    result = json.loads((out / "heads-ablation.json").read_text())
    named, drawn = result["named"], result["random"]
    assert named["heads"] == ["0.1", "1.0"] and len(drawn["draws"]) == 3 and result["seed"] == 2
    for record in (named, *drawn["draws"]):
        assert {"ndcg@10", "delta", "p", "tau_bm25", "tau_base", "per_collection"} <= set(record)
        assert -1 <= record["tau_bm25"] <= 1 and -1 <= record["tau_base"] <= 1
    deltas = [r["delta"] for r in drawn["draws"]]
    assert drawn["delta_min"] == min(deltas) and drawn["delta_max"] == max(deltas)
    assert drawn["delta_mean"] == pytest.approx(sum(deltas) / 3)
    assert named["random_at_least_as_damaging"] == sum(d <= named["delta"] for d in deltas)
    assert named["empirical_p"] == (1 + named["random_at_least_as_damaging"]) / 4
    assert -1 <= result["unablated"]["tau_bm25"] <= 1
    table = (out / "heads-ablation.md").read_text()
    assert "| 0.1, 1.0 |" in table and "random 2:" in table and "empirical p" in table
    assert "heads-ablation.md" in capsys.readouterr().out

    both = tmp_path / "both"
    assert main([*common, "--output-dir", str(both), "--heads", "0.0", "--sets", "directions-all"]) == 0
    assert len(json.loads((both / "ablation.json").read_text())) == 25 and (both / "heads-ablation.json").is_file()

    for bad, message in ((["--heads", "2.0"], "--heads 2.0: layer 2 is out of range"),
                         (["--heads", "0.0", "0.1", "0.2", "0.3", "--sets", "groups", "--random-heads", "1"],
                          "layer 0 has 0 heads besides the named ones; 4 needed"),
                         (["--random-heads", "2"], "give --heads too")):
        assert main([*common, "--output-dir", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: one line, exit status 2
        main([*common, "--output-dir", str(tmp_path / "bad"), "--heads", "0.x"])
    assert exit_.value.code == 2 and "expected LAYER.HEAD" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "ablation.json").exists()  # refused before any scoring
