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


STORED_WEIGHT_FIELD = "first_stage_fusion_weight"
"""The ``config.json`` field holding a model's recommended out-of-domain fusion weight (``--fuse-first-stage auto``),
chosen on held-out dev queries (docs/evaluation.md)."""


def weight_argument(text: str) -> float | str:
    """An argparse type for ``--fuse-first-stage``: a number, or ``auto`` (the weight stored with the model)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}") from None


def stored_weight(model: str) -> float | None:
    """The fusion weight stored in ``model``'s ``config.json`` (:data:`STORED_WEIGHT_FIELD`), or ``None``."""
    import json
    from pathlib import Path

    folder = Path(model).expanduser()
    if folder.is_dir():
        config = folder / "config.json"
    else:  # a Hub id: its config from the cache (or the Hub when online)
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(model, "config.json"))
    weight = json.loads(config.read_text()).get(STORED_WEIGHT_FIELD) if config.is_file() else None
    return None if weight is None else float(weight)


def resolve_weight(weight: float | str | None, model: str, name: str = "--fuse-first-stage") -> float | None:
    """``weight`` as a number: ``auto`` reads the model's stored weight; raises ``ValueError`` naming ``name`` when
    it has none or the weight is not a finite number >= 0."""
    if weight == "auto":
        try:
            weight = stored_weight(model)
        except Exception as error:  # noqa: BLE001 - unreadable config, Hub id not cached offline
            raise ValueError(f"{name} auto: cannot read {model}'s config ({type(error).__name__}: {error})") from None
        if weight is None:
            raise ValueError(f"{name} auto: {model} stores no {STORED_WEIGHT_FIELD}; pass a number (0: no fusion)")
    if weight is not None:
        check_weight(weight, name)
    return weight


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
