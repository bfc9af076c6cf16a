"""MixEncoder quality against the dual encoder (sparse_ce/precompute/quality.py): the vectors equal what a store holds
and plain mean pooling, and the paired comparison's numbers equal their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from tiny import make_mixencoder_folder
from transformers import AutoTokenizer

from modeling_mixencoder import MixEncoderForSequenceClassification
from modeling_mixencoder.modeling_mixencoder import masked_mean
from sparse_ce.eval.equivalence import detectable_difference
from sparse_ce.precompute.quality import candidate_vectors, paired_comparison

TEXTS = ["a flea can live up to a year", "goldfish grow", "sparse attention " * 30, "x"]


@pytest.mark.parametrize("strategy", ["C", "S"])
def test_candidate_vectors_are_the_stores_and_the_dual_encoders(tmp_path, strategy):
    folder = make_mixencoder_folder(tmp_path / "mix", k=2, strategy=strategy)
    model = MixEncoderForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context, dual = candidate_vectors(model, tokenizer, TEXTS, batch_size=3)
    with torch.no_grad():
        for i, text in enumerate(TEXTS):
            one = tokenizer(text, truncation=True, max_length=model.config.max_candidate_length, return_tensors="pt")
            torch.testing.assert_close(context[i], model.encode_candidates(one["input_ids"], one["attention_mask"])[0])
            states = model.bert(input_ids=one["input_ids"]).last_hidden_state
            torch.testing.assert_close(dual[i], masked_mean(states, one["attention_mask"].bool())[0])


def test_paired_comparison_follows_its_definitions():
    system = {"dl19": {"1": 0.5, "2": 0.7, "3": 0.2}, "dl20": {"9": 0.4}}
    baseline = {"dl19": {"1": 0.4, "2": 0.7, "3": 0.3}, "dl20": {"9": 0.1}}
    result = paired_comparison(system, baseline, bound=0.05)
    a, b = [0.5, 0.7, 0.2, 0.4], [0.4, 0.7, 0.3, 0.1]
    assert result["queries"] == 4 and result["delta"] == pytest.approx(sum(a) / 4 - sum(b) / 4)
    assert result["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert result["per_collection"]["dl20"] == {"system": 0.4, "baseline": 0.1}
    sd = stats.tstd([x - y for x, y in zip(a, b)])
    assert result["detectable_at_80"] == pytest.approx(detectable_difference(sd, 4))


def test_detectable_difference_is_where_the_power_reaches_80_percent():
    sd, n = 0.12, 97
    delta = detectable_difference(sd, n)
    critical = stats.t.ppf(0.975, n - 1)
    ncp = delta / (sd / math.sqrt(n))
    assert stats.nct.sf(critical, n - 1, ncp) + stats.nct.cdf(-critical, n - 1, ncp) == pytest.approx(0.8, abs=1e-6)
    assert delta == pytest.approx((1.96 + 0.84) * sd / math.sqrt(n), rel=0.03)  # the normal approximation


@pytest.mark.parametrize("block", ["authors", "light"])
@pytest.mark.parametrize("k", [1, 3])
def test_interaction_macs_equal_the_counted_flops(tmp_path, block, k):
    """The analytic count behind docs/precompute.md's floor equals torch's FLOP counter on score_candidates."""
    from torch.utils.flop_counter import FlopCounterMode

    from sparse_ce.precompute.timing import interaction_macs
    from tiny import TINY_MODEL

    from modeling_mixencoder import MixEncoderConfig

    config = MixEncoderConfig(**{**TINY_MODEL, "vocab_size": 100}, num_context=k, interaction_layers=[0, 1],
                              interaction_block=block)
    model = MixEncoderForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (1, 7))
    with torch.no_grad():
        queries = model.encode_queries(ids, torch.ones_like(ids))
        context = torch.randn(11, k, config.hidden_size)
        with FlopCounterMode(display=False) as counter:
            model.score_candidates(queries, context)
    assert counter.get_total_flops() == 2 * 11 * interaction_macs(config, 7)
