"""``sparse-ce analyze ablate``: nDCG@10 with each attention direction (or group) removed, in a layer range.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Table 1: ablating one of the 25 directions
between [CLS] / query / [SEP]1 / document / [SEP]2 shows which information flows the ranking needs. A removed direction
takes the attended segment's keys out of the attending segment's softmax (the row renormalises over what is left; a
row left with no key outputs zeros). Each variant is the model's own per-layer pattern with cells switched off, so a
direction the model's pattern already lacks changes nothing (its scores are reused, marked ``unchanged``). Every
variant re-ranks the same candidates; per-query paired t-tests against the unablated model, Holm-corrected.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from scipy import stats
from tqdm.auto import tqdm

from configuration_sparse_ce import check_attention_pattern

from ..data.collections import Collection
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


def collection_scorer(scorer: PairScorer, collections: list[Collection]):
    """Tokenise every collection once; returns ``score() -> {collection: {qid: nDCG@10}}`` under the current pattern."""
    from ..eval.evaluate import measure_run

    encoded = []
    for collection in collections:
        qids, queries, docs = collection.first_stage.pairs()
        rows, _ = scorer.encode(queries, docs, qids)
        encoded.append((collection, rows, len(qids)))

    def score() -> dict[str, dict[str, float]]:
        out = {}
        for collection, rows, n in encoded:
            run = collection.first_stage.ranking(scorer.score_rows(rows, n))
            out[collection.name] = measure_run(collection, run)["per_query"]
        return out

    return score


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_p(values: list[float], base: list[float]) -> float:
    """Two-sided paired t-test p-value; 1.0 when the two are identical, 0.0 for a constant non-zero difference."""
    differences = [a - b for a, b in zip(values, base)]
    if all(d == 0 for d in differences):
        return 1.0
    if len(set(differences)) == 1:
        return 0.0
    return float(stats.ttest_rel(values, base).pvalue)


def run_ablation(
    scorer: PairScorer, collections: list[Collection], output_dir: Path, ablations: list[Ablation] | None = None,
    mode: str = "renormalise",
) -> list[dict]:
    """Score the unablated model and every ablation; write ``ablation.json``, ``ablation.md`` and ``ablation.png``.

    Args:
        mode: ``renormalise`` (the removed keys leave the softmax) or ``zero`` (the paper's post-softmax zeroing);
            see :meth:`Ablation.apply`.

    Returns:
        The records of ``ablation.json``: ``from``, ``to`` (``group`` too for a group), ``layers``, ``mode``,
        ``ndcg@10``, ``delta``, ``p``, ``p_holm``, per-collection means and ``unchanged``.
    """
    model = scorer.model
    require_sparse_ce(model)
    base_layers = model.config.layer_matrices()
    original = model.config.attention_pattern
    score = collection_scorer(scorer, collections)
    started = time.perf_counter()
    base = score()
    base_values = _pooled(base)
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
            values = _pooled(result)
            records.append({
                **ablation.record(),
                "mode": mode,
                "ndcg@10": _mean(values),
                "delta": _mean(values) - _mean(base_values),
                "p": paired_p(values, base_values),
                "per_collection": {name: _mean(list(per.values())) for name, per in result.items()},
                "unchanged": unchanged,
            })
    finally:
        model.config.attention_pattern = original
    for record, adjusted in zip(records, holm([r["p"] for r in records])):
        record["p_holm"] = adjusted
    seconds = time.perf_counter() - started
    summary = {
        "measure": MEASURE, "ndcg@10": _mean(base_values), "queries": len(base_values),
        "per_collection": {name: _mean(list(per.values())) for name, per in base.items()},
        "depth": max(len(c) for col in collections for c in col.first_stage.candidates.values()),
        "collections": [c.name for c in collections], "seconds": seconds,
        "num_layers": len(base_layers), "mode": mode,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.json").write_text(json.dumps(records, indent=1) + "\n")
    (output_dir / "ablation-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output_dir / "ablation.md").write_text(ablation_markdown(records, summary) + "\n")
    ablation_heatmap(records, summary, output_dir / "ablation.png")
    logger.info("ablation: %d variants in %.0f s; results in %s", len(records), seconds, output_dir)
    return records


def _pooled(result: dict[str, dict[str, float]]) -> list[float]:
    """Per-query values of all collections in one fixed order (collection, then query id)."""
    return [result[name][qid] for name in sorted(result) for qid in sorted(result[name])]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)
