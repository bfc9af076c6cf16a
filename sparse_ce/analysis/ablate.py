"""``sparse-ce analyze ablate``: nDCG@10 with each attention direction (or group) removed, in a layer range.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Table 1: ablating one of the 25 directions
between [CLS] / query / [SEP]1 / document / [SEP]2 shows which information flows the ranking needs. Two modes remove a
direction: ``renormalise`` (the default) takes the attended segment's keys out of the attending segment's softmax (the
row renormalises over what is left; a row left with no key outputs zeros); ``zero`` (the paper's) keeps the softmax
over the model's own pattern and sets the removed weights to 0 after it (dense backend). Each variant is the model's
own per-layer pattern with cells switched off, so a direction the model's pattern already lacks changes nothing (its
scores are reused, marked ``unchanged``). Every variant re-ranks the same candidates; per-query paired t-tests against
the unablated model, Holm-corrected, and the mean per-query Kendall's tau of each variant's ranking against BM25's
order and the unablated model's (:func:`mean_tau`). Head ablation shares the scoring here (:mod:`.head_ablation`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scipy import stats
from tqdm.auto import tqdm

from configuration_sparse_ce import check_attention_pattern

from ..data.collections import Collection
from ..eval.equivalence import detectable_of, paired_p
from ..rank.scoring import PairScorer
from .directions import Ablation, all_ablations
from .report import ablation_heatmap, ablation_markdown

logger = logging.getLogger(__name__)
MEASURE = "nDCG@10"


def require_sparse_ce(model) -> None:
    if getattr(model.config, "model_type", None) != "sparse_ce":
        raise ValueError(f"model: {type(model).__name__} is not a sparse-ce model; convert it with `sparse-ce convert`")


def set_pattern(model, pattern: dict | None) -> None:
    """Give a loaded sparse-ce model another per-layer pattern (``None``: back to its six flags)."""
    require_sparse_ce(model)
    config = model.config
    config.attention_pattern = None if pattern is None else check_attention_pattern(pattern, config.num_hidden_layers)
    wanted = None if pattern is None else (config.attention_pattern["layers"],
                                             _nonzero(config.attention_pattern.get("zeroed")))
    if pattern is not None and _matrices(model) != wanted:
        raise ValueError(
            f"model: its remote code ({type(model).__module__}) predates per-layer attention patterns (or zeroing "
            "weights after the softmax) and would ignore the ablation; save it again with the installed sparse-ce "
            "(`sparse-ce convert MODEL NEW_FOLDER`)"
        )


def _matrices(model) -> tuple | None:
    """The per-layer matrices and zeroed matrices (``None`` when nothing is zeroed) the model's own code will use, or
    ``None`` when its code knows no explicit patterns."""
    encoder = getattr(model, "bert", model)
    try:
        patterns = encoder.layer_patterns()
        matrices = [p.matrix for p in patterns]
    except AttributeError:  # remote code from before explicit patterns
        return None
    zeroed = [getattr(p, "zeroed", None) for p in patterns]  # code from before zeroing has no such field
    return matrices, _nonzero([[[int(c) for c in row] for row in z] if z else [[0] * 5 for _ in range(5)] for z in zeroed])


def _nonzero(zeroed: list | None) -> list | None:
    """``zeroed`` matrices, or ``None`` when no cell is set."""
    return zeroed if zeroed and any(cell for matrix in zeroed for row in matrix for cell in row) else None


@dataclass
class Scored:
    """One collection scored under one model setting.

    Attributes:
        ndcg: Judged query id -> nDCG@10.
        scores: Query id -> the scores of its candidates, in first-stage order.
    """

    ndcg: dict[str, float]
    scores: dict[str, list[float]]


def collection_scorer(scorer: PairScorer, collections: list[Collection]) -> Callable[[], dict[str, Scored]]:
    """Tokenise every collection once; returns ``score() -> {collection: Scored}`` under the current model setting."""
    from ..eval.evaluate import measure_run

    encoded = []
    for collection in collections:
        qids, queries, docs = collection.first_stage.pairs()
        rows, _ = scorer.encode(queries, docs, qids)
        encoded.append((collection, rows, len(qids)))

    def score() -> dict[str, Scored]:
        out = {}
        for collection, rows, n in encoded:
            run = collection.first_stage.ranking(scorer.score_rows(rows, n))
            out[collection.name] = Scored(measure_run(collection, run)["per_query"],
                                          {qid: [s for _, s in hits] for qid, hits in run.items()})
        return out

    return score


def mean_tau(result: dict[str, Scored], reference: dict[str, Scored] | None = None) -> float | None:
    """Mean over queries of Kendall's tau-b between each query's candidate scores in ``result`` and in ``reference``
    (``None``: the first-stage order, its top candidate highest).

    A query with one candidate has no order and is left out (``None`` when none has two); one whose scores are all
    equal ranks nothing and counts 0.
    """
    taus = []
    for name in sorted(result):
        for qid, values in sorted(result[name].scores.items()):
            if len(values) < 2:
                continue
            other = reference[name].scores[qid] if reference is not None else list(range(len(values), 0, -1))
            tau = float(stats.kendalltau(values, other).statistic)
            taus.append(0.0 if math.isnan(tau) else tau)
    return _mean(taus) if taus else None


def measure_variant(result: dict[str, Scored], base: dict[str, Scored]) -> dict:
    """``ndcg@10``, ``delta`` and paired ``p`` against the unablated ``base``, ``detectable_at_80`` (the true Δ that test
    finds with 80% power), ``tau_bm25``, ``tau_base`` (see :func:`mean_tau`) and ``per_collection`` nDCG@10 of one
    variant."""
    values, base_values = _pooled(result), _pooled(base)
    return {
        "ndcg@10": _mean(values),
        "delta": _mean(values) - _mean(base_values),
        "p": paired_p(values, base_values),
        "detectable_at_80": detectable_of([a - b for a, b in zip(values, base_values)]),
        "tau_bm25": mean_tau(result),
        "tau_base": mean_tau(result, base),
        "per_collection": {name: _mean(list(scored.ndcg.values())) for name, scored in result.items()},
    }


def base_summary(base: dict[str, Scored], collections: list[Collection]) -> dict:
    """The unablated model: ``measure``, ``ndcg@10``, ``tau_bm25``, ``queries``, ``per_collection``, ``depth``,
    ``collections``."""
    values = _pooled(base)
    return {
        "measure": MEASURE, "ndcg@10": _mean(values), "tau_bm25": mean_tau(base), "queries": len(values),
        "per_collection": {name: _mean(list(scored.ndcg.values())) for name, scored in base.items()},
        "depth": max(len(c) for col in collections for c in col.first_stage.candidates.values()),
        "collections": [c.name for c in collections],
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def run_ablation(
    scorer: PairScorer, collections: list[Collection], output_dir: Path, ablations: list[Ablation] | None = None,
    mode: str = "renormalise",
) -> list[dict]:
    """Score the unablated model and every ablation; write ``ablation.json``, ``ablation.md`` and ``ablation.png``.

    Args:
        mode: ``renormalise`` (the removed keys leave the softmax) or ``zero`` (the paper's post-softmax zeroing);
            see :meth:`Ablation.apply`.
        ablations: What to run (default :func:`.directions.all_ablations`: the 25 directions and the groups in all,
            the lower and the upper layers).

    Returns:
        The records of ``ablation.json``: ``from``, ``to`` (``group`` too for a group), ``layers``, ``mode``, the
        fields of :func:`measure_variant`, ``p_holm`` and ``unchanged``.
    """
    model = scorer.model
    require_sparse_ce(model)
    base_layers = model.config.layer_matrices()
    original = model.config.attention_pattern
    score = collection_scorer(scorer, collections)
    started = time.perf_counter()
    base = score()
    records, ablations = [], ablations or all_ablations()
    try:
        for ablation in tqdm(ablations, desc="ablations", unit="variant"):
            pattern = ablation.apply(base_layers, mode)
            unchanged = pattern["layers"] == base_layers and _nonzero(pattern.get("zeroed")) is None
            if unchanged:
                result = base
            else:
                set_pattern(model, pattern)
                result = score()
            records.append({**ablation.record(), "mode": mode, **measure_variant(result, base), "unchanged": unchanged})
    finally:
        model.config.attention_pattern = original
    for record, adjusted in zip(records, holm([r["p"] for r in records])):
        record["p_holm"] = adjusted
    seconds = time.perf_counter() - started
    summary = {**base_summary(base, collections), "seconds": seconds, "num_layers": len(base_layers), "mode": mode}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.json").write_text(json.dumps(records, indent=1) + "\n")
    (output_dir / "ablation-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output_dir / "ablation.md").write_text(ablation_markdown(records, summary) + "\n")
    ablation_heatmap(records, summary, output_dir / "ablation.png")
    logger.info("ablation: %d variants in %.0f s; results in %s", len(records), seconds, output_dir)
    return records


def _pooled(result: dict[str, Scored]) -> list[float]:
    """Per-query nDCG@10 of all collections in one fixed order (collection, then query id)."""
    return [result[name].ndcg[qid] for name in sorted(result) for qid in sorted(result[name].ndcg)]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)
