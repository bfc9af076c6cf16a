"""Teacher scores for distillation: the cross-encoder of Schlatt et al., ECIR 2024 is trained with Margin-MSE
(Hofstätter et al., 2020) on the score margins of a stronger teacher.

Offline, any model that runs here can teach: a sentence-transformers bi-encoder (cosine similarity of query and
document embeddings; e.g. all-MiniLM-L6-v2) or a cross-encoder folder (its logit, e.g. a full-attention model trained
first). Scores are cached in a JSON file keyed by the teacher and the pairs, so every run of an experiment trains on
identical labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

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
        batch_size: Texts (bi-encoder) or rows (cross-encoder) per forward pass.
        device: Torch device; default ``cuda`` when available.
    """

    def __init__(self, model: str | Path, batch_size: int = 64, device: str | None = None) -> None:
        self.name = str(model)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.kind = "bi-encoder" if is_bi_encoder(model) else "cross-encoder"

    def score(self, queries: Sequence[str], documents: Sequence[str]) -> list[float]:
        """Score each pair ``(queries[i], documents[i])``; higher is more relevant."""
        if self.kind == "bi-encoder":
            return self._score_bi_encoder(queries, documents)
        from .scoring import PairScorer

        scorer = PairScorer(self.name, device=self.device, batch_size=self.batch_size)
        return scorer.score(queries, documents)[0]

    def _score_bi_encoder(self, queries: Sequence[str], documents: Sequence[str]) -> list[float]:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(self.name, device=self.device)
        texts = sorted(set(queries) | set(documents))
        vectors = model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=True,
        )
        index = {text: i for i, text in enumerate(texts)}
        q = vectors[[index[text] for text in queries]]
        d = vectors[[index[text] for text in documents]]
        return (q * d).sum(-1).float().cpu().tolist()


def cached_teacher_scores(
    teacher: Teacher, queries: Sequence[str], documents: Sequence[str], cache_dir: str | Path | None
) -> list[float]:
    """:meth:`Teacher.score`, read from / written to ``cache_dir`` (no cache when ``None``).

    The cache file is named by a hash of the teacher name and all pairs, so a changed pair list never reuses stale
    labels.
    """
    if cache_dir is None:
        return teacher.score(queries, documents)
    digest = hashlib.sha256(teacher.name.encode())
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
