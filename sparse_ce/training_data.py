"""Training sets for fine-tuning (sparse) cross-encoders with sentence-transformers' ``CrossEncoderTrainer``.

Schlatt et al. (ECIR 2024) fine-tune on MS MARCO with Margin-MSE against teacher margins. Offline, the training
queries are TREC DL 2021/2022 (never DL 2019/2020, the test sets): their candidates from several first stages are
pooled per query, scored by a teacher (:mod:`sparse_ce.teacher`), and turned into the column layout each loss wants:

- ``margin-mse``: ``query, positive, negative, label`` with label = teacher(positive) - teacher(negative);
- ``bce``: ``query, document, label`` with the judged grade scaled to [0, 1] (qrels needed);
- ``lambda``: ``query, docs, labels`` lists of judged grades per query (qrels needed).

Online, ``irds:<id>`` reads any ir_datasets collection with scored documents (e.g.
``irds:msmarco-passage-v2/trec-dl-2021/judged``) instead of the JSON files.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from .data import read_dl_json, read_qrels

logger = logging.getLogger(__name__)

LOSS_COLUMNS = {
    "margin-mse": ("query", "positive", "negative", "label"),
    "bce": ("query", "document", "label"),
    "lambda": ("query", "docs", "labels"),
}
"""Loss name -> the dataset columns it is trained on."""


@dataclass
class TrainingQuery:
    """A training query: its text and its pooled candidates (document id -> text), in first-seen order."""

    text: str
    documents: dict[str, str] = field(default_factory=dict)


def read_training_pool(sources: Iterable[str], limit_per_source: int | None = None) -> dict[str, TrainingQuery]:
    """Pool the candidates of several first-stage sources per query id.

    Args:
        sources: TREC DL JSON files (``{"query", "hits": [...]}``), or ``irds:<dataset id>`` for an ir_datasets
            collection with queries, scored documents and a document store.
        limit_per_source: Keep at most this many candidates per query from each source.

    Raises:
        ValueError: when one query id carries two different query texts.
    """
    pool: dict[str, TrainingQuery] = {}
    for source in sources:
        stage = _read_irds(source) if source.startswith("irds:") else read_dl_json(source)
        for qid, candidates in stage.candidates.items():
            entry = pool.setdefault(qid, TrainingQuery(stage.queries[qid]))
            if entry.text != stage.queries[qid]:
                raise ValueError(f"{source}: query {qid} reads {stage.queries[qid]!r}, elsewhere {entry.text!r}")
            for candidate in candidates[:limit_per_source]:
                entry.documents.setdefault(candidate.docid, candidate.text)
    logger.info(
        "training pool: %d queries, %d candidates from %s",
        len(pool), sum(len(q.documents) for q in pool.values()), ", ".join(map(str, sources)),
    )
    return pool


def _read_irds(source: str):
    """A :class:`~sparse_ce.data.FirstStage` from an ir_datasets id (network or a filled ir_datasets cache)."""
    try:
        import ir_datasets
    except ImportError as error:
        raise ImportError(f"{source}: install ir_datasets to read ir_datasets collections") from error
    from .data import Candidate, FirstStage

    dataset = ir_datasets.load(source.removeprefix("irds:"))
    if not dataset.has_scoreddocs():
        raise ValueError(f"{source}: the collection has no scored documents (a first stage) to train on")
    queries = {q.query_id: q.text for q in dataset.queries_iter()}
    ranked: dict[str, list[tuple[float, str]]] = {}
    for hit in dataset.scoreddocs_iter():
        ranked.setdefault(hit.query_id, []).append((hit.score, hit.doc_id))
    store = dataset.docs_store()
    candidates = {}
    for qid, hits in ranked.items():
        hits.sort(reverse=True)
        docs = store.get_many([docid for _, docid in hits])
        candidates[qid] = [Candidate(d, docs[d].default_text(), s) for s, d in hits if d in docs]
    return FirstStage({qid: queries[qid] for qid in candidates}, candidates)


def read_grades(paths: Iterable[str | Path]) -> dict[str, dict[str, int]]:
    """Judged grades, query id -> document id -> grade, from TREC qrels files."""
    grades: dict[str, dict[str, int]] = {}
    for path in paths:
        for qrel in read_qrels(path):
            grades.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
    return grades


def flatten(pool: Mapping[str, TrainingQuery]) -> tuple[list[str], list[str], list[str]]:
    """Query ids, query texts and document ids of all pooled pairs, query by query."""
    qids, texts, docids = [], [], []
    for qid, entry in pool.items():
        qids += [qid] * len(entry.documents)
        texts += [entry.text] * len(entry.documents)
        docids += list(entry.documents)
    return qids, texts, docids


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


def reranking_samples(
    pool: Mapping[str, TrainingQuery], grades: Mapping[str, Mapping[str, int]], depth: int, min_grade: int = 2
) -> list[dict]:
    """Samples for ``CrossEncoderRerankingEvaluator``: per judged query its first ``depth`` pooled documents and the
    ones graded ``min_grade`` or more among them (queries without such a document are skipped)."""
    samples = []
    for qid, entry in pool.items():
        docids = list(entry.documents)[:depth]
        judged = grades.get(qid, {})
        positives = [entry.documents[d] for d in docids if judged.get(d, 0) >= min_grade]
        if positives:
            samples.append(
                {"query": entry.text, "positive": positives, "documents": [entry.documents[d] for d in docids]}
            )
    return samples
