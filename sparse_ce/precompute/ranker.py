"""Ranking with a MixEncoder from a candidate store: the query encoded once, the candidates' ``E`` read, not computed.

Wang et al.: "Once is Enough: A Lightweight Cross-Attention for Fast Sentence Pair Modeling", Section 3: at query
time only the query goes through the encoder; each candidate's stored context embeddings meet it in the light
interaction layers. Pair rows ``[CLS] q [SEP] d [SEP]`` (``CrossEncoder``, :class:`PairScorer`) are split by the
model itself; both routes give the same scores. :class:`StoreScorer` lets ``sparse-ce rerank --index`` score a first
stage from a store, scoring documents the store lacks on the fly through the pair scorer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import FirstStage
from ..rank.scoring import PairScorer, ScoringStats
from .store import CandidateStore

if TYPE_CHECKING:
    from modeling_mixencoder import QueryStates

logger = logging.getLogger(__name__)

MIXENCODER_TYPE = "sparse_ce_mixencoder"
"""``config.model_type`` of MixEncoder models."""


class StoreRanker:
    """Scores documents of a :class:`CandidateStore` against queries with the MixEncoder that wrote it.

    Args:
        model: The MixEncoder (put in eval mode); its weights must be the store's
            (see :meth:`~.store.StoreManifest.check_model`).
        tokenizer: Its tokenizer.
        store: The candidate store.
        batch_size: Candidates scored per call of the interaction layers.

    Raises:
        ValueError: a store written by another model.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, store: CandidateStore, batch_size: int = 4096
    ) -> None:
        store.manifest.check_model(model, store.folder)
        self.model, self.tokenizer, self.store, self.batch_size = model.eval(), tokenizer, store, batch_size

    @classmethod
    def from_pretrained(cls, model: str, store: str, device: str | None = None, **kwargs) -> StoreRanker:
        """Load the MixEncoder ``model`` (folder or Hub id, remote code) and its tokenizer, and open ``store``."""
        from transformers import AutoModelForSequenceClassification

        from ..rank.scoring import load_tokenizer

        loaded = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=True)
        loaded.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(loaded, load_tokenizer(model), CandidateStore.open(store, loaded), **kwargs)

    @torch.inference_mode()
    def encode_query(self, query: str) -> QueryStates:
        """The query's states for the interaction layers (``[CLS] q [SEP]``).

        Raises:
            ValueError: for a query over ``max_query_length`` tokens ([CLS] and [SEP] included): never cut.
        """
        max_length = self.model.config.max_query_length
        inputs = self.tokenizer(query, return_tensors="pt")
        if inputs["input_ids"].shape[1] > max_length:
            raise ValueError(f"query {query!r}: {inputs['input_ids'].shape[1] - 2} tokens exceed the MixEncoder's "
                             f"max_query_length {max_length} ([CLS] and [SEP] included); queries are never cut")
        inputs = inputs.to(self.model.device)
        return self.model.encode_queries(inputs["input_ids"], inputs["attention_mask"])

    @torch.inference_mode()
    def score(self, query: str, docids: Sequence[str]) -> list[float]:
        """One score (logit) per doc id, in their order.

        Raises:
            KeyError: naming doc ids the store lacks.
        """
        queries = self.encode_query(query)
        scores: list[float] = []
        for start in range(0, len(docids), self.batch_size):
            context = self.store.get(docids[start : start + self.batch_size]).to(self.model.device, self.model.dtype)
            scores += self.model.score_candidates(queries, context)[:, 0].float().cpu().tolist()
        return scores

    def rank(self, query: str, docids: Sequence[str], top_k: int | None = None) -> list[tuple[str, float]]:
        """``(docid, score)`` by descending score (ties in input order), the first ``top_k`` only when given."""
        ranked = sorted(zip(docids, self.score(query, docids)), key=lambda hit: -hit[1])
        return ranked[:top_k]


class StoreScorer:
    """What ``sparse-ce rerank --index`` scores with: :class:`PairScorer`'s ``score`` (as
    :func:`~sparse_ce.rank.shards.score_first_stage` calls it) from a store, for the pairs of ``first_stage``.

    Candidates missing from the store are scored on the fly from their text (one warning gives their count).

    Raises:
        ValueError: a model that is not a MixEncoder, a store of another model, or candidates that are neither in the
            store nor have a text (named).
    """

    maxp = False

    def __init__(self, scorer: PairScorer, store: CandidateStore, first_stage: FirstStage) -> None:
        config = scorer.model.config
        if getattr(config, "model_type", None) != MIXENCODER_TYPE:
            raise ValueError(f"{config.model_type!r} is not a MixEncoder ({MIXENCODER_TYPE}); only those use a store")
        self.ranker = StoreRanker(scorer.model, scorer.tokenizer, store)
        self.scorer, self.model, self.tokenizer = scorer, scorer.model, scorer.tokenizer
        self.store, self.first_stage = store, first_stage
        self.untrained_head = scorer.untrained_head
        self.max_length = config.max_candidate_length
        missing = {c.docid: c.text for hits in first_stage.candidates.values() for c in hits if c.docid not in store}
        textless = [docid for docid, text in missing.items() if text is None]
        if textless:
            raise ValueError(
                f"{len(textless)} candidates are neither in store {store.folder} nor have a text: {textless[:10]}"
            )
        if missing:
            logger.warning("%d of the candidates are not in store %s; they are scored on the fly from their text",
                           len(missing), store.folder)

    def score(
        self, queries: Sequence[str], documents: Sequence[str], query_ids: Sequence[str]
    ) -> tuple[list[float], ScoringStats]:
        """Scores of the pairs of ``first_stage``'s queries ``query_ids``, in :meth:`FirstStage.pairs` order."""
        scores: list[float] = []
        lengths: list[int] = []  # text tokens of each document
        for qid in dict.fromkeys(query_ids):  # pairs come query by query, each query's candidates in first-stage order
            candidates = self.first_stage.candidates[qid]
            query = queries[len(scores)]
            if list(documents[len(scores) : len(scores) + len(candidates)]) != [c.text for c in candidates]:
                raise ValueError(f"query {qid}: the pairs are not this first stage's candidates in order")
            stored = [c.docid for c in candidates if c.docid in self.store]
            by_docid = dict(zip(stored, self.ranker.score(query, stored)))
            on_the_fly = {c.docid: c.text for c in candidates if c.docid not in self.store}
            texts = list(on_the_fly.values())
            if texts:
                by_docid.update(zip(on_the_fly, self.scorer.score([query] * len(texts), texts, [qid] * len(texts))[0]))
            scores += [by_docid[c.docid] for c in candidates]
            lengths += self.store.get(stored, "lengths").tolist()
            if texts:
                lengths += map(len, self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        cut = sum(n > self.max_length - 2 for n in lengths)  # longer than [CLS] d [SEP] may be
        empty = sum(n == 0 for n in lengths)
        return scores, ScoringStats(len(scores), len(scores), cut, empty, maxp=False)
