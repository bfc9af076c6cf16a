"""Training sets for fine-tuning (sparse) cross-encoders with sentence-transformers' ``CrossEncoderTrainer``.

Schlatt et al. (ECIR 2024) fine-tune with Margin-MSE against teacher margins (Hofstätter et al., 2020). The pooled
candidates of the training queries (:mod:`.pool`), scored by a teacher (:mod:`.teacher`), become the column layout
each loss wants:

- ``listwise``: ``query, docs, labels``: one query's list of candidates (the teacher's hard top plus random ones)
  labelled with teacher scores, judged grades mixed in (distillation through :mod:`.losses`);
- ``margin-mse``: ``query, positive, negative, label`` with label = teacher(positive) - teacher(negative);
- ``bce``: ``query, document, label`` with the judged grade scaled to [0, 1] (qrels needed);
- ``lambda``: ``query, docs, labels`` lists of judged grades per query (qrels needed);
- ``mnrl``: ``query, positive`` pairs for in-batch negatives (MultipleNegativesRankingLoss, as MixEncoder trains).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

from datasets import Dataset

from .pool import TrainingQuery

logger = logging.getLogger(__name__)

LOSS_COLUMNS = {
    "listwise": ("query", "docs", "labels"),
    "margin-mse": ("query", "positive", "negative", "label"),
    "bce": ("query", "document", "label"),
    "lambda": ("query", "docs", "labels"),
    "mnrl": ("query", "positive"),
}
"""Loss name -> the dataset columns it is trained on."""


def listwise_dataset(
    pool: Mapping[str, TrainingQuery],
    teacher: Mapping[str, Mapping[str, float]],
    list_size: int,
    lists_per_query: int,
    hard: int,
    hard_depth: int = 30,
    grades: Mapping[str, Mapping[str, int]] | None = None,
    grade_weight: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Lists of one query's candidates labelled with teacher scores, for listwise distillation.

    Each list holds ``hard`` documents drawn from the teacher's top ``hard_depth`` and ``list_size - hard`` drawn
    from the rest of the pool, so the student learns both the order at the top and to push clear non-matches down
    (a re-ranker sees the whole first-stage depth). The label of a judged document is its teacher score plus
    ``grade_weight * grade``: the judgements move what the teacher got wrong.

    Args:
        pool: Training queries and candidates.
        teacher: Query id -> document id -> teacher score (z-scored per query, see :mod:`.teacher`).
        list_size: Documents per list (capped by the pool size of the query).
        lists_per_query: Lists drawn per query.
        hard: Documents per list drawn from the teacher's top ``hard_depth``.
        hard_depth: How deep the teacher's top reaches.
        grades: Judged grades, optional.
        grade_weight: Weight of a judged grade in the label (in teacher z-units).
        seed: Random seed of the sampling.
    """
    if not 0 <= hard <= list_size:
        raise ValueError(f"hard: {hard} documents of a list of {list_size}")
    rng = random.Random(seed)
    rows: dict[str, list] = {name: [] for name in LOSS_COLUMNS["listwise"]}
    for qid, entry in pool.items():
        scores = teacher[qid]
        ranked = sorted(entry.documents, key=lambda d: -scores[d])
        judged = (grades or {}).get(qid, {})
        top, rest = ranked[:hard_depth], ranked[hard_depth:]
        for _ in range(lists_per_query):
            picked = rng.sample(top, min(hard, len(top)))
            others = [d for d in ranked if d not in picked] if len(rest) < list_size - len(picked) else rest
            picked += rng.sample(others, min(list_size - len(picked), len(others)))
            rows["query"].append(entry.text)
            rows["docs"].append([entry.documents[d] for d in picked])
            rows["labels"].append([scores[d] + grade_weight * max(judged.get(d, 0), 0) for d in picked])
    return Dataset.from_dict(rows).shuffle(seed=seed)


def margin_mse_dataset(
    pool: Mapping[str, TrainingQuery],
    teacher: Mapping[str, Mapping[str, float]],
    triples_per_query: int,
    grades: Mapping[str, Mapping[str, int]] | None = None,
    top_k: int = 10,
    seed: int = 0,
) -> Dataset:
    """Margin-MSE triples ``(query, positive, negative)`` labelled with the teacher's score margin.

    Positives are drawn from the teacher's top ``top_k`` and, where judged, the passages graded 2 or more; negatives
    from the rest of the pool. The label is always the teacher's margin, so the student learns the teacher's scale.

    Args:
        pool: Training queries and candidates.
        teacher: Query id -> document id -> teacher score, for every pooled pair.
        triples_per_query: Triples drawn per query (with replacement across triples).
        grades: Judged grades, optional.
        top_k: The teacher's top-k counted as positives.
        seed: Random seed of the sampling.
    """
    rng = random.Random(seed)
    rows: dict[str, list] = {name: [] for name in LOSS_COLUMNS["margin-mse"]}
    for qid, entry in pool.items():
        scores = teacher[qid]
        ranked = sorted(entry.documents, key=lambda d: -scores[d])
        judged = (grades or {}).get(qid, {})
        positives = list(dict.fromkeys(ranked[:top_k] + [d for d in ranked if judged.get(d, 0) >= 2]))
        for _ in range(triples_per_query):
            positive = rng.choice(positives)
            negative = rng.choice([d for d in ranked if d != positive])
            rows["query"].append(entry.text)
            rows["positive"].append(entry.documents[positive])
            rows["negative"].append(entry.documents[negative])
            rows["label"].append(scores[positive] - scores[negative])
    return Dataset.from_dict(rows).shuffle(seed=seed)


def bce_dataset(pool: Mapping[str, TrainingQuery], grades: Mapping[str, Mapping[str, int]], seed: int = 0) -> Dataset:
    """Pointwise ``(query, document, label)`` rows of the judged pooled pairs, label = grade / max grade.

    Raises:
        ValueError: when no pooled pair is judged.
    """
    top = max((g for judged in grades.values() for g in judged.values()), default=0)
    rows: dict[str, list] = {name: [] for name in LOSS_COLUMNS["bce"]}
    for qid, entry in pool.items():
        for docid, grade in grades.get(qid, {}).items():
            if docid in entry.documents:
                rows["query"].append(entry.text)
                rows["document"].append(entry.documents[docid])
                rows["label"].append(max(grade, 0) / max(top, 1))
    if not rows["query"]:
        raise ValueError("bce: no pooled (query, document) pair is judged; pass qrels of the training queries")
    return Dataset.from_dict(rows).shuffle(seed=seed)


def lambda_dataset(
    pool: Mapping[str, TrainingQuery],
    grades: Mapping[str, Mapping[str, int]],
    list_size: int,
    lists_per_query: int = 1,
    seed: int = 0,
) -> Dataset:
    """Listwise ``(query, docs, labels)`` rows: ``list_size`` judged pooled documents per list, labels = grades.

    Lists hold at least one document graded above 0; queries without one are skipped.

    Raises:
        ValueError: when no query has a judged relevant pooled document.
    """
    rng = random.Random(seed)
    rows: dict[str, list] = {name: [] for name in LOSS_COLUMNS["lambda"]}
    for qid, entry in pool.items():
        judged = {d: max(g, 0) for d, g in grades.get(qid, {}).items() if d in entry.documents}
        relevant = [d for d, g in judged.items() if g > 0]
        if not relevant:
            continue
        for _ in range(lists_per_query):
            first = rng.choice(relevant)
            rest = rng.sample([d for d in judged if d != first], min(list_size - 1, len(judged) - 1))
            docs = [first, *rest]
            rows["query"].append(entry.text)
            rows["docs"].append([entry.documents[d] for d in docs])
            rows["labels"].append([float(judged[d]) for d in docs])
    if not rows["query"]:
        raise ValueError("lambda: no training query has a judged relevant pooled document; pass qrels")
    return Dataset.from_dict(rows).shuffle(seed=seed)


def mnrl_dataset(
    pool: Mapping[str, TrainingQuery],
    teacher: Mapping[str, Mapping[str, float]],
    grades: Mapping[str, Mapping[str, int]] | None = None,
    top_k: int = 3,
    seed: int = 0,
) -> Dataset:
    """``(query, positive)`` pairs for in-batch negatives: the other queries' positives are each query's negatives.

    Positives are the teacher's top ``top_k`` and, where judged, the passages graded 2 or more (Wang et al. train
    MixEncoder on MS MARCO's judged positives with in-batch negatives).

    Args:
        pool: Training queries and candidates.
        teacher: Query id -> document id -> teacher score, for every pooled pair.
        grades: Judged grades, optional.
        top_k: The teacher's top-k counted as positives.
        seed: Random seed of the shuffle.
    """
    rows: dict[str, list] = {name: [] for name in LOSS_COLUMNS["mnrl"]}
    for qid, entry in pool.items():
        scores = teacher[qid]
        ranked = sorted(entry.documents, key=lambda d: -scores[d])
        judged = (grades or {}).get(qid, {})
        relevant = [d for d in ranked if judged.get(d, 0) >= 2]
        for positive in dict.fromkeys(ranked[:top_k] + relevant):
            rows["query"].append(entry.text)
            rows["positive"].append(entry.documents[positive])
    return Dataset.from_dict(rows).shuffle(seed=seed)
