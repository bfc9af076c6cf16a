"""Test collections for re-ranking: a first stage (queries, candidates with texts) plus qrels.

Schlatt et al. (ECIR 2024, Table 1) re-rank the BM25 top-100 of TREC DL 2019 and 2020. The offline copies live in
``../shared/data`` (see its README); Vaswani and SciFact have no shipped run, so their BM25 top-100 is retrieved with
``bm25s`` (English stop words, Snowball stemming) and cached as a TREC run. Online, ``irds:<id>`` loads any
ir_datasets collection with queries, documents and qrels and retrieves its BM25 top-100 the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ir_measures

from .first_stage import Candidate, FirstStage, iter_corpus, read_dl_json, read_qrels, read_run, read_topics, write_run

logger = logging.getLogger(__name__)


def measure_label(measure: ir_measures.Measure) -> str:
    """The name of ``measure`` with the relevance threshold of a binary measure always written out: ir_measures
    prints ``RR@10`` for ``rel=1`` and ``RR(rel=2)@10`` for 2, so one label would otherwise hide which cut it used
    (``RR(rel=1)@10``); graded nDCG is left as it is."""
    text = str(measure)
    if "rel" not in measure.SUPPORTED_PARAMS or measure.NAME == "nDCG" or "rel=" in text:
        return text
    rel = f"rel={measure.params.get('rel', 1)}"
    rest = text[len(measure.NAME):]
    return measure.NAME + (f"({rel}, {rest[1:]}" if rest.startswith("(") else f"({rel}){rest}")


@dataclass
class Collection:
    """A re-ranking test collection.

    Attributes:
        name: Short name (``dl19``).
        first_stage: Queries and candidates in rank order.
        qrels: Judgements.
        relevant_grade: The lowest grade counted as relevant by binary measures (2 on TREC DL passages).
        text_repair: Whether the texts were repaired with ftfy (the TREC DL JSON files carry mojibake).
    """

    name: str
    first_stage: FirstStage
    qrels: list[ir_measures.Qrel]
    relevant_grade: int = 1
    text_repair: bool = False

    def measures(self) -> list[ir_measures.Measure]:
        """nDCG@10 (graded), RR@10, R@10 and R@100 (binary at :attr:`relevant_grade`)."""
        rel = self.relevant_grade
        return [
            ir_measures.parse_measure(m) for m in ("nDCG@10", f"RR(rel={rel})@10", f"R(rel={rel})@10", f"R(rel={rel})@100")
        ]


def _dl(year: int) -> Callable[[Path, Path, int], Collection]:
    def load(data: Path, cache: Path, depth: int) -> Collection:
        folder = data / "trec-dl"
        stage = read_dl_json(folder / f"bm25_top100_dl{year}.json")
        return Collection(f"dl{year}", stage, read_qrels(folder / f"qrels.dl{year}-passage.txt"), relevant_grade=2,
                          text_repair=True)  # read_dl_json repairs by default

    return load


def _vaswani(data: Path, cache: Path, depth: int) -> Collection:
    folder = data / "vaswani"
    return _bm25_collection(
        "vaswani", read_topics(folder / "query-text.trec"), folder / "doc-text.trec",
        read_qrels(folder / "qrels"), cache, depth,
    )


def _scifact(data: Path, cache: Path, depth: int) -> Collection:
    folder = data / "scifact"
    return _bm25_collection(
        "scifact", read_topics(folder / "topics.test.tsv.gz"), folder / "corpus.jsonl",
        read_qrels(folder / "qrels.test.txt"), cache, depth,
    )


COLLECTIONS: dict[str, Callable[[Path, Path, int], Collection]] = {
    "dl19": _dl(19),
    "dl20": _dl(20),
    "vaswani": _vaswani,
    "scifact": _scifact,
}
"""Offline collection name -> loader(data folder, cache folder, first-stage depth)."""


def load_collection(name: str, data: str | Path, cache: str | Path, depth: int = 100) -> Collection:
    """Load a collection by name (:data:`COLLECTIONS`) or ir_datasets id (``irds:beir/scifact/test``).

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: when the offline files are missing.
    """
    if name.startswith("irds:"):
        return _irds(name, Path(cache), depth)
    if name not in COLLECTIONS:
        raise ValueError(f"collection: unknown {name!r}; choose from {', '.join(COLLECTIONS)} or irds:<id>")
    return COLLECTIONS[name](Path(data), Path(cache), depth)


def _bm25_collection(name, topics, corpus, qrels, cache: Path, depth: int) -> Collection:
    """A collection whose first stage is the BM25 top-``depth`` of its judged queries (cached as a TREC run).

    ``corpus`` is a corpus file (:func:`~sparse_ce.data.iter_corpus`) or a dict docid -> text.
    """
    judged = {q.query_id for q in qrels}
    topics = {qid: text for qid, text in topics.items() if qid in judged}
    docs = dict(corpus) if isinstance(corpus, dict) else dict(iter_corpus(corpus))
    run_path = cache / "bm25" / f"{name}-top{depth}-{bm25_cache_key(topics, docs)}.run"
    if run_path.is_file():
        run = read_run(run_path)
    else:
        run = bm25_run(topics, docs, depth)
        run_path.parent.mkdir(parents=True, exist_ok=True)
        write_run(run_path, run, tag="bm25s")
        logger.info("%s: BM25 top-%d written to %s", name, depth, run_path)
    candidates = {qid: [Candidate(d, docs[d], s) for d, s in run[qid]] for qid in topics if qid in run}
    return Collection(name, FirstStage({qid: topics[qid] for qid in candidates}, candidates), qrels)


BM25_SETTINGS = "bm25s lucene k1=1.5 b=0.75 stopwords=en stemmer=snowball-english"
"""Everything about the retrieval besides its inputs that the cached run depends on."""


def bm25_cache_key(topics: dict[str, str], docs: dict[str, str]) -> str:
    """A hash of the queries, the documents, the BM25 settings and the bm25s version: a cached run is reused only when
    all of them are unchanged."""
    import bm25s

    digest = hashlib.sha256(f"{BM25_SETTINGS} bm25s={bm25s.__version__}".encode())
    for qid in sorted(topics):
        digest.update(f"q\0{qid}\0{topics[qid]}\1".encode())
    for docid in sorted(docs):
        digest.update(f"d\0{docid}\0{docs[docid]}\1".encode())
    return digest.hexdigest()[:16]


class BM25Index:
    """A bm25s index of ``docs`` with :data:`BM25_SETTINGS` (Lucene scoring, English stop words, Snowball stemming):
    the one place that tokenises and indexes for BM25, used by the test collections' first stage and the BM25
    teacher of :mod:`sparse_ce.train.teacher`."""

    def __init__(self, docs: dict[str, str]) -> None:
        import bm25s
        import Stemmer

        self._bm25s = bm25s
        self.stemmer = Stemmer.Stemmer("english")
        self.docids = list(docs)
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize([docs[d] for d in self.docids]), show_progress=False)

    def _tokenize(self, texts: list[str], return_ids: bool = True):
        return self._bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False,
                                    return_ids=return_ids)

    def retrieve(self, topics: dict[str, str], depth: int) -> dict[str, list[tuple[str, float]]]:
        """The top-``depth`` documents with a positive score per query, best first."""
        qids = list(topics)
        hits, scores = self.retriever.retrieve(self._tokenize([topics[q] for q in qids]),
                                               k=min(depth, len(self.docids)), show_progress=False)
        return {
            qid: [(self.docids[int(i)], float(s)) for i, s in zip(hits[row], scores[row]) if s > 0]
            for row, qid in enumerate(qids)
        }

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query``, in the order of ``docids``."""
        return self.retriever.get_scores(self._tokenize([query], return_ids=False)[0]).tolist()


def bm25_run(topics: dict[str, str], docs: dict[str, str], depth: int) -> dict[str, list[tuple[str, float]]]:
    """BM25 top-``depth`` per query (:class:`BM25Index`)."""
    return BM25Index(docs).retrieve(topics, depth)


def _irds(name: str, cache: Path, depth: int) -> Collection:
    try:
        import ir_datasets
    except ImportError as error:
        raise ImportError(f"{name}: install ir_datasets to load ir_datasets collections") from error
    dataset = ir_datasets.load(name.removeprefix("irds:"))
    topics = {q.query_id: q.default_text() for q in dataset.queries_iter()}
    docs = {d.doc_id: d.default_text() for d in dataset.docs_iter()}
    qrels = [ir_measures.Qrel(q.query_id, q.doc_id, q.relevance) for q in dataset.qrels_iter()]
    safe = name.removeprefix("irds:").replace("/", "_")
    return _bm25_collection(safe, topics, docs, qrels, cache, depth)
