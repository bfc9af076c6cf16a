"""``sparse-ce analyze`` end to end on a tiny model and a miniature of the offline data (no timings asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_data_folder, make_model_folder

from configuration_sparse_ce import SEGMENT_NAMES, ablate_pattern
from sparse_ce.analysis.ablate import holm, paired_p, set_pattern
from sparse_ce.analysis.directions import GROUPS, all_ablations
from sparse_ce.analysis.heads import segment_masks
from sparse_ce.analysis.svd import head_alignment
from sparse_ce.cli import main
from sparse_ce.rank.scoring import PairScorer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model = make_model_folder(root / "model", preset="sparse", window=2, seed=3)
    return model, make_data_folder(root / "data"), root


def test_ablate_writes_every_direction_and_group(setup):
    model, data, root = setup
    out = root / "ablate"
    assert main(["analyze", "ablate", "--model", str(model), "--collections", "dl19", "dl20", "--data", str(data), "--depth", "6",
                 "--output-dir", str(out), "--threads", "1"]) == 0
    records = json.loads((out / "ablation.json").read_text())
    assert len(records) == 3 * (25 + len(GROUPS)) == len(all_ablations())
    for record in records:
        assert {"from", "to", "layers", "ndcg@10", "delta", "p_holm"} <= set(record)
        assert record["layers"] in ("all", "lower", "upper") and 0 <= record["p_holm"] <= 1
    singles = {(r["from"], r["to"], r["layers"]): r for r in records if "group" not in r}
    assert {(a, b) for a, b, _ in singles} == {(a, b) for a in SEGMENT_NAMES for b in SEGMENT_NAMES}
    # the sparse pattern already has query -> document off: nothing changes
    off = singles[("query", "doc", "all")]
    assert off["unchanged"] and off["delta"] == 0 and off["p"] == 1.0
    # removing every direction out of documents and [CLS] changes the ranking of a random model
    assert not singles[("doc", "doc", "all")]["unchanged"]
    group = next(r for r in records if r.get("group") == "every cross-segment direction" and r["layers"] == "all")
    assert len(group["from"]) == len(group["to"]) == 20 and "query" in group["from"]
    assert all(-1 <= r["tau_bm25"] <= 1 and -1 <= r["tau_base"] <= 1 for r in records)
    assert off["tau_base"] == 1.0 and off["tau_bm25"] == json.loads((out / "ablation-summary.json").read_text())["tau_bm25"]
    assert all(r["detectable_at_80"] > 0 for r in records if r["p"] < 1)  # the power of each paired test
    assert off["detectable_at_80"] is None  # no spread: no power to speak of
    closed = next(r for r in records if r.get("group") == "query/document cut with the [CLS] bridge closed"
                  and r["layers"] == "all")
    assert len(closed["from"]) == 12 and not closed["unchanged"]
    summary = json.loads((out / "ablation-summary.json").read_text())
    assert summary["queries"] == 8 and summary["depth"] == 6 and -1 <= summary["tau_bm25"] <= 1
    table = (out / "ablation.md").read_text()
    assert "| [CLS] |" in table and "every direction into a [SEP]" in table and "(off)" in table
    assert "| τ vs BM25 | τ vs unablated |" in table and "| query side and document side attend to each other | upper |" in table
    assert (out / "ablation.png").stat().st_size > 10_000


def test_the_new_groups_and_the_sets():
    each_other = set(GROUPS["query side and document side attend to each other"])
    assert each_other == set(GROUPS["query side attends to document side"]) | set(GROUPS["document side attends to query side"])
    assert len(each_other) == 8
    closed = set(GROUPS["query/document cut with the [CLS] bridge closed"])
    assert closed - each_other == {("cls", b) for b in ("query", "sep1", "doc", "sep2")}
    # [CLS] attends to itself only; every segment still attends to [CLS] and to its own side's [SEP]
    kept = {(a, b) for a in SEGMENT_NAMES for b in SEGMENT_NAMES} - closed
    assert {b for a, b in kept if a == "cls"} == {"cls"}
    assert all(("cls" != a and (a, "cls") in kept) for a in SEGMENT_NAMES if a != "cls")
    assert {("query", "sep1"), ("doc", "sep2"), ("sep1", "query"), ("sep2", "doc")} <= kept
    assert len(all_ablations(["directions-all"])) == 25 and {a.layers for a in all_ablations(["directions-all"])} == {"all"}
    assert len(all_ablations(["groups"])) == 3 * len(GROUPS) and all(a.group for a in all_ablations(["groups"]))
    assert all_ablations(["directions", "directions-all"]) == all_ablations(["directions"])  # each once
    with pytest.raises(ValueError, match="sets"):
        all_ablations(["heads"])


def test_ablate_sets_groups_only_in_zero_mode(setup):
    model, data, root = setup
    out = root / "groups-zero"
    assert main(["analyze", "ablate", "--model", str(model), "--collections", "dl19", "--data", str(data), "--depth", "4",
                 "--output-dir", str(out), "--threads", "1", "--sets", "groups", "--mode", "zero"]) == 0
    records = json.loads((out / "ablation.json").read_text())
    assert len(records) == 3 * len(GROUPS) and all(r["mode"] == "zero" and "group" in r for r in records)
    closed = next(r for r in records if r["group"] == "query/document cut with the [CLS] bridge closed")
    assert not closed["unchanged"]
    assert not (out / "ablation.png").exists() and "attends to →" not in (out / "ablation.md").read_text()


def test_mean_tau_against_a_hand_computed_case():
    from sparse_ce.analysis.ablate import Scored, mean_tau

    # q1 in first-stage order: model 0.3 0.1 0.2 0.0 -> pairs (1,2) discordant, the other 5 concordant: tau 4/6;
    # q2: every score equal -> counts 0; q3: one candidate -> left out
    result = {"c": Scored({}, {"q1": [0.3, 0.1, 0.2, 0.0], "q2": [1.0, 1.0, 1.0], "q3": [5.0]})}
    assert mean_tau(result) == pytest.approx((2 / 3 + 0) / 2)
    # against another model's scores: q1 identical order -> 1; q2 still constant -> 0
    other = {"c": Scored({}, {"q1": [3.0, 1.0, 2.0, -1.0], "q2": [0.1, 0.2, 0.3], "q3": [1.0]})}
    assert mean_tau(result, other) == pytest.approx(0.5)
    # ties: [1, 1, 0] vs first-stage 3 2 1: tau-b = 2 / sqrt(2 * 3)
    assert mean_tau({"c": Scored({}, {"q": [1.0, 1.0, 0.0]})}) == pytest.approx(2 / 6**0.5)
    assert mean_tau({"c": Scored({}, {"q": [1.0]})}) is None


def test_ablating_a_direction_the_pattern_lacks_leaves_every_score_unchanged(setup):
    model, _, _ = setup
    scorer = PairScorer(str(model), progress=False)
    queries = ["how long is the flea life cycle", "do goldfish grow", "do goldfish grow"]
    docs = ["a flea can live up to a year", "goldfish grow fast in water", "the dog and the cat"]
    base, _ = scorer.score(queries, docs)
    layers = scorer.model.config.layer_matrices()
    explicit = {"segments": list(SEGMENT_NAMES), "layers": layers}
    for src, dst in (("query", "doc"), ("query", "cls"), ("sep1", "sep2"), (["query", "sep1"], ["doc", "sep2", "cls"])):
        set_pattern(scorer.model, ablate_pattern(explicit, src, dst))
        assert scorer.score(queries, docs)[0] == base  # computed again, identical
    set_pattern(scorer.model, ablate_pattern(explicit, "doc", "query"))
    assert scorer.score(queries, docs)[0] != base
    set_pattern(scorer.model, None)
    assert scorer.score(queries, docs)[0] == base


def test_holm_and_paired_p():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert paired_p([0.5, 0.4], [0.5, 0.4]) == 1.0
    assert paired_p([0.6, 0.5], [0.5, 0.4]) == 0.0
    assert 0 < paired_p([0.6, 0.5, 0.2], [0.5, 0.4, 0.3]) < 1


def test_heads_and_svd_end_to_end(setup, capsys):
    model, data, root = setup
    out = root / "heads"
    assert main(["analyze", "heads", "--model", str(model), "--collections", "dl19", "--data", str(data), "--per-class", "2",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "heads.json").read_text())
    assert result["layers"] == 2 and result["heads"] == 4 and all(result["pairs"][c] > 0 for c in ("relevant", "hard", "easy"))
    query_to_doc = result["statistics"]["query attends to document"]
    doc_to_query = result["statistics"]["document attends to query"]
    # the sparse pattern: query tokens never see the document, document tokens do see the query
    assert all(v == 0 for c in query_to_doc["mass"].values() for row in c for v in row)
    assert all(0 < v <= 1 for row in doc_to_query["mass"]["relevant"] for v in row)
    ranking = result["ranking"]["document attends to query"]
    assert len(ranking) == 8 and ranking[0]["relevant_minus_easy"] >= ranking[-1]["relevant_minus_easy"]
    assert (out / "heads-document-to-query.png").is_file() and (out / "heads-query-to-document.png").is_file()
    # relevant − hard: the difference of the stored class means, heads ranked by it
    hard_ranking = result["ranking_hard"]["document attends to query"]
    means = doc_to_query["max"]
    assert [r["relevant_minus_hard"] for r in hard_ranking] == sorted((r["relevant_minus_hard"] for r in hard_ranking), reverse=True)
    assert {(r["layer"], r["head"]) for r in hard_ranking} == {(l, h) for l in range(2) for h in range(4)}
    for r in hard_ranking:
        l, h = r["layer"], r["head"]
        assert r["relevant_minus_hard"] == pytest.approx(means["relevant"][l][h] - means["hard"][l][h], abs=1e-6)
        assert r["relevant"] == pytest.approx(means["relevant"][l][h]) and r["hard"] == pytest.approx(means["hard"][l][h])
    for stat in ("mass", "max"):
        stats = doc_to_query[stat]
        got = result["difference_hard"]["document attends to query"][stat]
        assert [v for row in got for v in row] == pytest.approx(
            [r - h for rr, hh in zip(stats["relevant"], stats["hard"]) for r, h in zip(rr, hh)], abs=1e-6)
    assert len({r["relevant_minus_hard"] for r in hard_ranking}) > 1  # not all equal: the order is tested
    assert (out / "heads-document-to-query-hard.png").is_file()
    printed = capsys.readouterr().out
    assert "relevant − hard max attention" in printed and "relevant − easy max attention" in printed

    assert main(["analyze", "svd", "--model", str(model), "--heads", str(out / "heads.json"), "--output-dir", str(out)]) == 0
    svd = json.loads((out / "svd.json").read_text())
    assert len(svd["alignment"]) == 2 and all(-1 <= a <= 1 for row in svd["alignment"] for a in row)
    assert svd["correlation"]["query attends to document"]["constant_score"]
    assert -1 <= svd["correlation"]["document attends to query"]["spearman"] <= 1
    assert (out / "svd.png").is_file()


def test_alignment_is_one_for_a_symmetric_head_and_low_for_a_rotating_one():
    torch.manual_seed(0)
    w = torch.randn(8, 8)
    assert head_alignment(w, w, 2) == pytest.approx([1.0, 1.0])
    swap = torch.cat([w[4:], -w[:4]])  # head 0 keys from head 1's rows and vice versa: unrelated directions
    assert all(abs(a) < 0.6 for a in head_alignment(w, swap, 2))


def test_segment_masks_exclude_special_tokens():
    ids = torch.tensor([[2, 10, 11, 3, 20, 21, 22, 3, 0], [2, 10, 3, 20, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    query, doc = segment_masks(ids, mask, sep_id=3)
    assert query[0].nonzero().flatten().tolist() == [1, 2] and doc[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert query[1].nonzero().flatten().tolist() == [1] and doc[1].nonzero().flatten().tolist() == [3]


def test_heads_and_svd_of_a_plain_bert_cross_encoder_and_ablate_refuses_it(setup, tmp_path):
    from tiny import TINY_MODEL, make_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    _, data, _ = setup
    tokenizer = make_tokenizer(tmp_path / "bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), num_labels=1, **TINY_MODEL)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    assert main(["analyze", "heads", "--model", str(tmp_path / "bert"), "--collections", "dl19", "--data", str(data),
                 "--per-class", "1", "--output-dir", str(out)]) == 0
    result = json.loads((out / "heads.json").read_text())
    assert all(0 < v <= 1 for row in result["statistics"]["query attends to document"]["mass"]["relevant"] for v in row)
    assert main(["analyze", "svd", "--model", str(tmp_path / "bert"), "--output-dir", str(out)]) == 0
    assert main(["analyze", "ablate", "--model", str(tmp_path / "bert"), "--collections", "dl19", "--data", str(data),
                 "--output-dir", str(out)]) == 2  # one line: not a sparse-ce model, convert it


def test_a_model_whose_code_ignores_patterns_is_refused_not_silently_unablated(setup, monkeypatch):
    model, _, _ = setup
    scorer = PairScorer(str(model), progress=False)
    old_style = [type("OldPattern", (), {})() for _ in range(2)]  # remote code from before attention_pattern
    monkeypatch.setattr(scorer.model.bert, "layer_patterns", lambda: old_style)
    explicit = {"segments": list(SEGMENT_NAMES), "layers": scorer.model.config.layer_matrices()}
    with pytest.raises(ValueError, match="predates per-layer attention patterns"):
        set_pattern(scorer.model, ablate_pattern(explicit, "doc", "query"))


def test_model_card_of_a_config_from_older_code():
    from types import SimpleNamespace

    from configuration_sparse_ce import PRESETS
    from sparse_ce.convert.command import render_model_card

    flags = {k: v for k, v in PRESETS["sparse"].items() if k.endswith("_attention")}
    old = SimpleNamespace(attention_window_size=4, max_position_embeddings=128, pattern_flags=flags, preset_name="sparse")
    card = render_model_card(old, "src", None, "m", [], "cmd")  # a config class of remote code from before the field
    assert "| `doc_query_attention` | on |" in card and "`sparse`" in card


def test_analyze_leaves_logging_levels_as_it_found_them(setup):
    import logging

    model, _, root = setup
    before = [logging.getLogger(name).level for name in ("modeling_sparse_ce", "transformers_modules")]
    assert main(["analyze", "svd", "--model", str(model), "--output-dir", str(root / "svd-only")]) == 0
    assert [logging.getLogger(name).level for name in ("modeling_sparse_ce", "transformers_modules")] == before
