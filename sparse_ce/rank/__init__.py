"""Scoring (query, document) pairs with a cross-encoder (:mod:`.scoring`) and the ``sparse-ce rerank`` command
(:mod:`.rerank`), sharded over processes under ``torchrun`` (:mod:`.shards`)."""

from .scoring import DEFAULT_BATCH_TOKENS, DTYPES, MIN_DOCUMENT_TOKENS, PairScorer, ScoringStats, load_tokenizer

__all__ = ["DEFAULT_BATCH_TOKENS", "DTYPES", "MIN_DOCUMENT_TOKENS", "PairScorer", "ScoringStats", "load_tokenizer"]
