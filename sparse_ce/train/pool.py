"""Training queries, their pooled first-stage candidates, judged grades and the held-out dev split.

Schlatt et al. (ECIR 2024) fine-tune on MS MARCO; offline the training queries are TREC DL 2021/2022 (never DL
2019/2020, the test sets), whose candidates from several first stages (BM25, BM25+RM3, SPLADE++) are pooled per
query. Part of the judged DL21 queries is held out as a dev set for learning curves and model selection.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..data import Candidate, FirstStage, read_dl_json, read_qrels, read_topics
from ..data.collections import bm25_run

logger = logging.getLogger(__name__)


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
    sources = list(sources)
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


def retrieved_queries(
    topic_files: Iterable[str | Path],
    pool: Mapping[str, TrainingQuery],
    depth: int,
    held_out: Iterable[str] = (),
    excluded_texts: Iterable[str] = (),
) -> dict[str, TrainingQuery]:
    """Queries without a first stage of their own, with their BM25 top-``depth`` over the pool's passages.

    The DL21/DL22 topic files list some 850 queries that were never judged and have no candidates here; retrieving
    for them from the training queries' passages gives them candidates a teacher can score. Over the DL21/22 pools
    those are mostly partial matches from other topics, and training on them lowered dev nDCG@10
    (docs/training.md, section 11); with a real corpus they are a first stage. Queries already pooled are skipped.

    Args:
        topic_files: TSV ``qid<TAB>query`` (or TREC) topic files.
        pool: The pooled training queries; their passages are the corpus.
        depth: Candidates retrieved per query.
        held_out: Query ids whose passages stay out of the corpus (the dev queries).
        excluded_texts: Query texts never to train on (the test collections' queries), compared case- and
            space-insensitively.
    """
    held_out = set(held_out)
    excluded = {_normalised(text) for text in excluded_texts}
    topics: dict[str, str] = {}
    skipped = 0
    for path in topic_files:
        for qid, text in read_topics(path).items():
            if qid in pool or _normalised(text) in excluded:
                skipped += 1
            else:
                topics.setdefault(qid, text)
    corpus = {docid: text for qid, entry in pool.items() if qid not in held_out for docid, text in entry.documents.items()}
    run = bm25_run(topics, corpus, depth) if topics and corpus else {}
    retrieved = {qid: TrainingQuery(topics[qid], {d: corpus[d] for d, _ in hits}) for qid, hits in run.items() if hits}
    logger.info("retrieved queries: %d with candidates (BM25 top-%d over %d passages); %d topics skipped as pooled or "
                "excluded", len(retrieved), depth, len(corpus), skipped)
    return retrieved


def _normalised(text: str) -> str:
    """Lower case, runs of white space as one space: how query texts are compared."""
    return " ".join(text.lower().split())


def _read_irds(source: str) -> FirstStage:
    """A :class:`~sparse_ce.data.FirstStage` from an ir_datasets id (network or a filled ir_datasets cache)."""
    try:
        import ir_datasets
    except ImportError as error:
        raise ImportError(f"{source}: install ir_datasets to read ir_datasets collections") from error

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


def dev_split(
    pool: Mapping[str, TrainingQuery], grades: Mapping[str, Mapping[str, int]], count: int, seed: int = 0
) -> list[str]:
    """``count`` judged queries (a grade >= 2 among their judgements) drawn with ``seed``: the held-out dev set.

    The draw depends only on the sorted judged query ids and the seed, so every run of an experiment holds out the
    same queries whatever its other settings.
    """
    judged = sorted(qid for qid in pool if any(g >= 2 for g in grades.get(qid, {}).values()))
    if count > len(judged):
        raise ValueError(f"dev queries: {count} asked, but only {len(judged)} training queries are judged")
    return sorted(random.Random(seed).sample(judged, count))
