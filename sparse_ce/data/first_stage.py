"""Readers of first-stage runs, topics, corpora and qrels, and the TREC run writer.

A re-ranker (Schlatt et al., ECIR 2024, evaluate on the BM25 top-100 of TREC DL 2019/2020) needs, per query, the
candidate documents of a first stage in rank order. This module reads them into one structure, :class:`FirstStage`,
from either the TREC DL JSON files (query, hits with passage texts) or a TREC run plus a topics file plus a corpus;
the corpus is streamed and only the documents the run names are kept in memory.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import ftfy
import ir_measures


class Candidate(NamedTuple):
    """A first-stage result: document id, document text (``None`` when unknown: scored from a candidate store) and
    first-stage score."""

    docid: str
    text: str | None
    score: float


@dataclass
class FirstStage:
    """Queries and their first-stage candidates, both in file order.

    Attributes:
        queries: Query id -> query text.
        candidates: Query id -> candidates in first-stage rank order.
    """

    queries: dict[str, str]
    candidates: dict[str, list[Candidate]]

    def __len__(self) -> int:
        return len(self.candidates)

    def ranking(self, scores: Sequence[float] | None = None) -> dict[str, list[tuple[str, float]]]:
        """Query id -> (document id, score) per candidate, for :func:`write_run` or ir_measures.

        Args:
            scores: One score per pair in :meth:`pairs` order (a re-ranker's); ``None`` keeps the first-stage scores.

        Raises:
            ValueError: when ``scores`` does not hold one score per pair.
        """
        if scores is None:
            return {qid: [(c.docid, c.score) for c in hits] for qid, hits in self.candidates.items()}
        total = sum(len(hits) for hits in self.candidates.values())
        if len(scores) != total:
            raise ValueError(f"{len(scores)} scores for {total} (query, document) pairs")
        left = iter(scores)
        return {qid: [(c.docid, next(left)) for c in hits] for qid, hits in self.candidates.items()}

    def pairs(self) -> tuple[list[str], list[str], list[str]]:
        """All (query id, query text, document text) pairs as three parallel lists, query by query."""
        qids, queries, docs = [], [], []
        for qid, candidates in self.candidates.items():
            qids += [qid] * len(candidates)
            queries += [self.queries[qid]] * len(candidates)
            docs += [c.text for c in candidates]
        return qids, queries, docs


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading, gunzipping it when its name ends with ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_dl_json(path: str | Path, fix_text: bool = True, limit: int | None = None) -> FirstStage:
    """Read a TREC DL JSON first stage: a list of ``{"query", "hits": [{"qid", "docid", "rank", "score", "content"}]}``.

    Args:
        path: The JSON file (``.gz`` allowed).
        fix_text: Repair MS MARCO's mojibake (``â€™`` for ``'``) in queries and passages with ``ftfy.fix_text``.
        limit: Keep the first ``limit`` queries only.

    Raises:
        ValueError: for a file that is not JSON or not in this layout, naming the entry and what is wrong.
    """
    with open_text(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{query, hits}} entries, got {type(entries).__name__}")
    fix = ftfy.fix_text if fix_text else str
    queries, candidates = {}, {}
    for number, entry in enumerate(entries[:limit]):
        hits = _dl_hits(path, number, entry)
        qids = {str(hit["qid"]) for hit in hits}
        if len(qids) != 1:
            raise ValueError(f"{path}: query {entry['query']!r} has hits of {len(qids)} query ids, expected 1")
        qid = qids.pop()
        queries[qid] = fix(entry["query"])
        candidates[qid] = [Candidate(str(hit["docid"]), fix(hit["content"]), float(hit["score"])) for hit in hits]
    return FirstStage(queries, candidates)


DL_HIT_FIELDS = ("qid", "docid", "rank", "score", "content")


def _dl_hits(path, number: int, entry) -> list[dict]:
    """The hits of entry ``number`` in rank order, checked for the fields a first stage needs."""
    if not isinstance(entry, dict) or not isinstance(entry.get("query"), str) or not isinstance(entry.get("hits"), list):
        raise ValueError(f"{path}: entry {number} is not {{\"query\": str, \"hits\": [...]}}")
    for hit in entry["hits"]:
        missing = [name for name in DL_HIT_FIELDS if not isinstance(hit, dict) or name not in hit]
        if missing:
            raise ValueError(f"{path}: entry {number} ({entry['query']!r}) has a hit without {', '.join(missing)}")
    return sorted(entry["hits"], key=lambda hit: hit["rank"])


def read_run(path: str | Path, limit: int | None = None) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run (``qid Q0 docid rank score tag``) into query id -> [(docid, score)] in rank order.

    Args:
        path: The run file (``.gz`` allowed).
        limit: Keep the first ``limit`` queries (in file order) only.
    """
    rows: dict[str, list[tuple[int, int, str, float]]] = {}
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 6:
                raise ValueError(f"{path}:{line_no}: expected 'qid Q0 docid rank score tag', got {line.strip()!r}")
            qid, _, docid, rank, score, _ = fields
            if qid not in rows and limit is not None and len(rows) >= limit:
                continue
            rows.setdefault(qid, []).append((int(rank), line_no, docid, float(score)))
    return {qid: [(docid, score) for _, _, docid, score in sorted(hits)] for qid, hits in rows.items()}


def read_topics(path: str | Path) -> dict[str, str]:
    """Read topics: TSV ``qid<TAB>query`` lines, or TREC ``<top><num>..<title>..</top>`` blocks (``.gz`` allowed)."""
    with open_text(path) as f:
        content = f.read()
    if content.lstrip().startswith("<top>"):
        topics = {}
        for block in re.findall(r"<top>(.*?)</top>", content, re.S):
            num = re.search(r"<num>\s*(?:Number:\s*)?([^<\s]+)", block)
            title = re.search(r"<title>(.*?)(?=</title>|<desc>|<narr>|$)", block, re.S)
            if num is None or title is None:
                raise ValueError(f"{path}: a <top> block lacks <num> or <title>: {block.strip()[:80]!r}")
            topics[num.group(1)] = " ".join(title.group(1).split())
        return topics
    topics = {}
    for line_no, line in enumerate(content.splitlines(), 1):
        if line.strip():
            qid, sep, text = line.rstrip("\r\n").partition("\t")
            if not sep:
                raise ValueError(f"{path}:{line_no}: expected 'qid<TAB>query', got {line.strip()!r}")
            topics[qid.strip()] = text.strip()
    return topics


def _iter_jsonl(f: IO[str]) -> Iterator[tuple[str, str]]:
    for line in f:
        if line.strip():
            doc = json.loads(line)
            yield str(doc["_id"]), f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def _iter_tsv(f: IO[str]) -> Iterator[tuple[str, str]]:
    for line in f:
        if line.strip():
            docid, _, text = line.rstrip("\r\n").partition("\t")
            yield docid.strip(), text.strip()


def _iter_trec(f: IO[str]) -> Iterator[tuple[str, str]]:
    buffer = ""
    for line in f:
        buffer += line
        if "</DOC>" not in line:
            continue
        *docs, buffer = buffer.split("</DOC>")
        for doc in docs:
            docno = re.search(r"<DOCNO>\s*(.*?)\s*</DOCNO>", doc, re.S)
            if docno is None:
                raise ValueError(f"TREC corpus: a <DOC> without <DOCNO>: {doc.strip()[:80]!r}")
            body = re.sub(r"</?[A-Z][A-Z0-9]*>", " ", doc[docno.end() :])  # SGML tags such as <TEXT>
            yield docno.group(1), " ".join(body.split())


def iter_corpus(path: str | Path) -> Iterator[tuple[str, str]]:
    """Stream (docid, text) from a corpus, its format sniffed from the first non-empty line.

    Formats: BEIR jsonl (``{"_id", "title", "text"}``; text = title + " " + text), TREC
    (``<DOC><DOCNO>id</DOCNO>text</DOC>``) or TSV (``docid<TAB>text``); ``.gz`` allowed.
    """
    with open_text(path) as f:
        first = ""
        while not first.strip():
            first = f.readline()
            if not first:
                return
        f.seek(0)
        head = first.lstrip()
        reader = _iter_jsonl if head.startswith("{") else _iter_trec if head.startswith("<DOC") else _iter_tsv
        yield from reader(f)


def read_corpus(path: str | Path, docids: set[str]) -> dict[str, str]:
    """Texts of the documents ``docids`` only, streaming ``path`` and stopping once all are found.

    Raises:
        ValueError: when some documents are not in the corpus.
    """
    texts = {}
    for docid, text in iter_corpus(path):
        if docid in docids:
            texts[docid] = text
            if len(texts) == len(docids):
                break
    missing = docids - texts.keys()
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} documents of the run are not in the corpus, e.g. {sorted(missing)[:5]}"
        )
    return texts


def read_run_first_stage(
    run: str | Path, topics: str | Path, corpus: str | Path | None, fix_text: bool = False, limit: int | None = None
) -> FirstStage:
    """Read a first stage from a TREC run, a topics file and a corpus (see :func:`iter_corpus`).

    Args:
        run: TREC run file.
        topics: Topics file (see :func:`read_topics`).
        corpus: Corpus file; only the documents the (limited) run names are kept. ``None``: candidates without text
            (for a MixEncoder candidate store, which holds them encoded).
        fix_text: Repair mojibake in queries and documents with ``ftfy.fix_text``.
        limit: Keep the first ``limit`` queries of the run only.
    """
    ranking = read_run(run, limit)
    all_topics = read_topics(topics)
    missing = [qid for qid in ranking if qid not in all_topics]
    if missing:
        raise ValueError(f"{topics}: {len(missing)} queries of the run have no topic, e.g. {missing[:5]}")
    fix = ftfy.fix_text if fix_text else str
    texts: dict[str, str] = {}
    if corpus is not None:
        texts = read_corpus(corpus, {docid for hits in ranking.values() for docid, _ in hits})
        texts = {docid: fix(text) for docid, text in texts.items()}
    return FirstStage(
        queries={qid: fix(all_topics[qid]) for qid in ranking},
        candidates={
            qid: [Candidate(docid, texts.get(docid), score) for docid, score in hits] for qid, hits in ranking.items()
        },
    )


def read_qrels(path: str | Path) -> list[ir_measures.Qrel]:
    """Read TREC qrels (``qid 0 docid grade``, ``.gz`` allowed) with ir_measures' reader."""
    return list(ir_measures.read_trec_qrels(str(path)))


def write_run(path: str | Path, ranking: Mapping[str, Sequence[tuple[str, float]]], tag: str = "sparse-ce") -> None:
    """Write a TREC run, each query's documents by descending score.

    Ties are ordered by descending docid, as trec_eval orders them, so the written ranks agree with any evaluator.
    Scores are written at full precision (``repr``), so that reading the run back gives the same floats.

    Args:
        path: Output file; parent folders are created.
        ranking: Query id -> [(docid, score)], queries written in this order.
        tag: Run tag (no whitespace).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # renamed when complete: a reader never sees half a run
    with partial.open("w", encoding="utf-8") as f:
        for qid, hits in ranking.items():
            ordered = sorted(((float(score), docid) for docid, score in hits), reverse=True)
            for rank, (score, docid) in enumerate(ordered, 1):
                f.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")
    partial.replace(path)
