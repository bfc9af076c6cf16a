"""Tokenising and scoring (query, document) pairs with a cross-encoder folder or Hub id.

A sparse cross-encoder (Schlatt et al., ECIR 2024) computes a query once for all rows of a batch that share it, so
:class:`PairScorer` batches the rows of one query together, sorted by length within the query. Pairs are encoded by
the tokenizer's own pair encoding (``[CLS] q [SEP] d [SEP]``, right padding); only documents are cut
(``truncation="only_second"``), or, with MaxP, split into overlapping windows and scored by their best window.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

logger = logging.getLogger(__name__)

MIN_DOCUMENT_TOKENS = 8
"""The fewest document tokens a query must leave room for within the maximum length."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ScoringStats:
    """What happened to the documents of a :meth:`PairScorer.score` call.

    Attributes:
        pairs: Pairs scored.
        rows: Model input rows (more than ``pairs`` when MaxP splits documents into windows).
        long_documents: Documents longer than the room their query leaves: cut, or split into windows with MaxP.
        empty_documents: Documents with no tokens (scored as ``[CLS] q [SEP] [SEP]``).
        maxp: Whether long documents were scored by MaxP windows.
    """

    pairs: int
    rows: int
    long_documents: int
    empty_documents: int
    maxp: bool

    @property
    def truncated(self) -> int:
        """Documents cut to fit (their tail never seen by the model)."""
        return 0 if self.maxp else self.long_documents


@dataclass
class Row:
    """One model input row: ``[CLS] q [SEP] d [SEP]`` (or a MaxP window of ``d``) of pair number ``pair``."""

    pair: int
    input_ids: list[int]
    token_type_ids: list[int]


class PairScorer:
    """Scores (query, document) pairs with a sequence-classification cross-encoder.

    Args:
        model: Model folder or Hub id (loaded with ``trust_remote_code=True``).
        device: Torch device; default ``cuda`` when available, else ``cpu``.
        dtype: Model dtype, a ``torch.dtype`` or a name in :data:`DTYPES`; default the checkpoint's float32.
        batch_size: Rows per forward pass.
        max_length: Tokens per row; default the tokenizer's ``model_max_length`` capped by the model's
            ``max_position_embeddings``.
        maxp: Score long documents by the maximum over overlapping windows (stride: half a window) instead of
            cutting them.
        progress: Show a progress bar.

    Raises:
        ValueError: for a ``max_length`` over ``max_position_embeddings`` or a model with more than one logit.
    """

    def __init__(
        self,
        model: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        maxp: bool = False,
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model}: a fast tokenizer is needed (overflowing windows and pair encoding)")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device).eval()
        config = self.model.config
        if config.num_labels != 1:
            raise ValueError(f"{model}: num_labels is {config.num_labels}; a cross-encoder for ranking has one logit")
        limit = config.max_position_embeddings
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length: {max_length} exceeds the model's max_position_embeddings {limit}")
        self.max_length = max_length or min(self.tokenizer.model_max_length, limit)
        self.batch_size = batch_size
        self.maxp = maxp
        self.progress = progress
        self.untrained_head = bool(getattr(config, "sparse_ce_untrained_head", False))
        if self.untrained_head:
            logger.warning(
                "%s: the classifier head is untrained (sparse_ce_untrained_head in config.json); "
                "scores from an untrained classifier head mean nothing. Fine-tune the model first.",
                model,
            )

    def score(
        self, queries: Sequence[str], documents: Sequence[str], query_ids: Sequence[str] | None = None
    ) -> tuple[list[float], ScoringStats]:
        """Score each pair ``(queries[i], documents[i])``.

        Args:
            queries: Query texts.
            documents: Document texts, as many as queries.
            query_ids: Names of the queries for error messages; default the query texts.

        Returns:
            The scores (logits) in input order, and what happened to the documents.

        Raises:
            ValueError: for an empty query, or a query too long to leave :data:`MIN_DOCUMENT_TOKENS` document tokens.
        """
        rows, stats = self.encode(queries, documents, query_ids)
        scores = self._run(rows, len(queries))
        if stats.empty_documents:
            logger.warning(
                "%d of %d documents are empty; they are scored on the query alone", stats.empty_documents, stats.pairs
            )
        if stats.long_documents:
            action = "split into MaxP windows" if self.maxp else "cut to fit (pass maxp to score all windows)"
            logger.warning(
                "%d of %d documents were longer than max_length %d allows and were %s",
                stats.long_documents,
                stats.pairs,
                self.max_length,
                action,
            )
        return scores, stats

    def encode(
        self, queries: Sequence[str], documents: Sequence[str], query_ids: Sequence[str] | None = None
    ) -> tuple[list[Row], ScoringStats]:
        """Tokenise pairs into unpadded rows, grouped by query (in order of first appearance), longest first.

        Args:
            queries: Query texts.
            documents: Document texts, as many as queries.
            query_ids: Names of the queries for error messages; default the query texts.

        Raises:
            ValueError: as :meth:`score`, or for lists of different lengths.
        """
        if len(queries) != len(documents) or (query_ids is not None and len(query_ids) != len(queries)):
            raise ValueError(f"{len(queries)} queries, {len(documents)} documents and query_ids differ in length")
        names = queries if query_ids is None else query_ids
        groups: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query, []).append(i)
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        rows, long_docs, empty_docs = [], 0, 0
        for query, pairs in groups.items():
            name = names[pairs[0]]
            query_len = len(self.tokenizer(query, add_special_tokens=False)["input_ids"])
            if query_len == 0:
                raise ValueError(f"query {name!r}: empty query")
            window = self.max_length - specials - query_len
            if window < MIN_DOCUMENT_TOKENS:
                raise ValueError(
                    f"query {name!r}: {query_len} tokens leave {window} of max_length {self.max_length} for the "
                    f"document (at least {MIN_DOCUMENT_TOKENS} needed); shorten the query or raise max_length"
                )
            encoded = self.tokenizer(
                [query] * len(pairs),
                [documents[i] for i in pairs],
                truncation="only_second",
                max_length=self.max_length,
                stride=window // 2 if self.maxp else 0,
                return_overflowing_tokens=True,
                return_token_type_ids=True,
            )
            sample = encoded["overflow_to_sample_mapping"]
            group_rows = [
                Row(pairs[s], ids, types)
                for j, (s, ids, types) in enumerate(zip(sample, encoded["input_ids"], encoded["token_type_ids"]))
                if self.maxp or j == 0 or sample[j - 1] != s  # without MaxP: each document's first window only
            ]
            long_docs += sum(count > 1 for count in Counter(sample).values())
            empty_docs += sum(len(ids) == query_len + specials for ids in encoded["input_ids"])
            rows += sorted(group_rows, key=lambda row: -len(row.input_ids))
        return rows, ScoringStats(len(queries), len(rows), long_docs, empty_docs, self.maxp)

    @torch.inference_mode()
    def _run(self, rows: list[Row], num_pairs: int) -> list[float]:
        """Scores of the pairs: each pair's maximum over its rows."""
        scores = torch.full((num_pairs,), float("-inf"))
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        with tqdm(total=len(rows), unit="row", desc="scoring", disable=not self.progress) as bar:
            for batch in batches:
                inputs = self.tokenizer.pad(
                    {"input_ids": [r.input_ids for r in batch], "token_type_ids": [r.token_type_ids for r in batch]},
                    padding_side="right",
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**inputs).logits[:, 0].float().cpu()
                pairs = torch.tensor([r.pair for r in batch])
                scores.scatter_reduce_(0, pairs, logits, reduce="amax")
                bar.update(len(batch))
        return scores.tolist()
