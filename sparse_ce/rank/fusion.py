"""Score fusion by z-scored sums: a re-ranker interpolated with its first stage, teachers fused with BM25.

Interpolating a neural re-ranker's scores with the first stage's (BM25) is a standard way to keep lexical evidence
the model misses, e.g. on collections unlike its training data (Wang, Zhuang and Zuccon, "BERT-based dense retrievers
require interpolation with BM25", ICTIR 2021). Scores of different models live on different scales, so each is
standardised per query first (z-score) and then summed with a weight; the training teachers (:mod:`..train.teacher`)
are fused the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..data import FirstStage

Run = dict[str, list[tuple[str, float]]]  # query id -> (document id, score) per candidate


def zscore(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores of one query's candidates standardised to mean 0 and standard deviation 1 (0 when all are equal)."""
    values = list(scores.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {d: (v - mean) / std if std > 0 else 0.0 for d, v in scores.items()}


def check_weight(weight: float, name: str = "first-stage fusion weight") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``weight`` is a finite number >= 0."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {weight}")


def fuse_first_stage(run: Run, first_stage: FirstStage, weight: float) -> Run:
    """``z(run) + weight * z(first stage)`` per query, over the run's candidates of each query.

    Raises:
        ValueError: ``weight`` is negative or not finite, or a run candidate has no first-stage score.
    """
    check_weight(weight)
    fused: Run = {}
    for qid, hits in run.items():
        lexical = {c.docid: c.score for c in first_stage.candidates.get(qid, [])}
        missing = [docid for docid, _ in hits if docid not in lexical]
        if missing:
            raise ValueError(f"query {qid}: {len(missing)} re-ranked documents have no first-stage score, "
                             f"e.g. {missing[0]!r}")
        model = zscore(dict(hits))
        first = zscore({docid: lexical[docid] for docid, _ in hits})
        fused[qid] = [(docid, model[docid] + weight * first[docid]) for docid, _ in hits]
    return fused
