"""Ranking quality of a MixEncoder against the dual encoder with the same weights, with a paired test and its power.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Table 2 compares each
MixEncoder with Dual-BERT. Here both score the BM25 top-100 of TREC DL19 and DL20 (test sets, never trained on) from
the same encoder weights: the MixEncoder from its context embeddings E (exactly what a candidate store holds; the
store route equals this within 1e-5, tests), the dual encoder by the cosine of the mean-pooled query and candidate.
Per-query nDCG@10 differences get a two-sided paired t-test, the smallest true difference it would detect with 80%
power, and a TOST equivalence test within ±``bound`` (:mod:`sparse_ce.eval.equivalence`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.collections import load_collection
from ..eval.equivalence import detectable_of, equivalence_summary, paired_p

COLLECTIONS = ("dl19", "dl20")


@torch.inference_mode()
def candidate_vectors(model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Context embeddings ``[n, k, hidden]`` (as a store holds them) and dual-encoder vectors ``[n, hidden]`` (mean of
    the encoder's final states) of ``texts``, cut to ``max_candidate_length`` as a store cuts them. The C-strategy
    shares one encoder pass; the S-strategy (special tokens in the input) needs a second, plain one."""
    from modeling_mixencoder.modeling_mixencoder import masked_mean

    context, dual = [], []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                           max_length=model.config.max_candidate_length, return_tensors="pt").to(model.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        states = model.bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids)).last_hidden_state
        dual.append(masked_mean(states, mask).float())
        if model.config.context_strategy == "C":
            context.append(model.context.pool(states, mask).float())
        else:
            context.append(model.encode_candidates(ids, mask).float())
    return torch.cat(context), torch.cat(dual)


@torch.inference_mode()
def per_query_quality(model, tokenizer, data: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{system: {collection: {qid: nDCG@10}}}`` for ``mixencoder`` and ``dual-encoder`` on DL19 and DL20 (judged
    queries, BM25 top-100)."""
    from ..eval.evaluate import measure_run

    model.eval()
    out: dict[str, dict[str, dict[str, float]]] = {"mixencoder": {}, "dual-encoder": {}}
    for name in COLLECTIONS:
        collection = load_collection(name, data, data)  # TREC DL brings its BM25 top-100: the cache is not used
        judged = {q.query_id for q in collection.qrels}
        stage = collection.first_stage
        hits_of = {qid: hits for qid, hits in stage.candidates.items() if qid in judged}
        corpus = {c.docid: c.text for hits in hits_of.values() for c in hits}
        docids = list(corpus)
        context, dual = candidate_vectors(model, tokenizer, [corpus[d] for d in docids])
        row = {d: i for i, d in enumerate(docids)}
        runs: dict[str, dict[str, list]] = {"mixencoder": {}, "dual-encoder": {}}
        for qid, hits in hits_of.items():
            inputs = tokenizer(stage.queries[qid], return_tensors="pt").to(model.device)
            queries = model.encode_queries(inputs["input_ids"], inputs["attention_mask"])
            index = torch.tensor([row[c.docid] for c in hits])
            mix = model.score_candidates(queries, context[index].to(model.device, model.dtype))[:, 0].float().cpu()
            cos = torch.nn.functional.cosine_similarity(dual[index], queries.pooled.float().cpu(), dim=-1)
            for system, scores in (("mixencoder", mix), ("dual-encoder", cos)):
                runs[system][qid] = [(c.docid, float(s)) for c, s in zip(hits, scores)]
        for system, run in runs.items():
            out[system][name] = measure_run(collection, run)["per_query"]
    return out


def paired_comparison(system: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
                      bound: float = 0.02) -> dict:
    """Mean nDCG@10 of both, the mean difference, its paired t-test p, the difference detectable with 80% power, and
    a TOST within ±``bound`` (per-query values of every collection pooled)."""
    keys = [(c, q) for c in sorted(baseline) for q in sorted(baseline[c])]
    a = [system[c][q] for c, q in keys]
    b = [baseline[c][q] for c, q in keys]
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    summary = equivalence_summary(differences, bound)
    return {"queries": n, "system": sum(a) / n, "baseline": sum(b) / n, "delta": sum(differences) / n,
            "p": paired_p(a, b), "detectable_at_80": detectable_of(differences), "tost_bound": bound,
            "tost_p": summary["tost_p"], "tost_power_at_zero": summary.get("power_at_zero"),
            "per_collection": {c: {"system": sum(system[c].values()) / len(system[c]),
                                   "baseline": sum(baseline[c].values()) / len(baseline[c])} for c in baseline}}
