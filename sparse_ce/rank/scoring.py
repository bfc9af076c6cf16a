"""Tokenising and scoring (query, document) pairs with a cross-encoder folder, Hub id or loaded model.

A sparse cross-encoder (Schlatt et al., ECIR 2024) computes a query once for all rows of a forward that share it, so
:class:`PairScorer` forms each forward from whole queries (a query's candidates in as few forwards as the token
budget allows; short queries may share one), rows sorted by length within the query so
that padding stays small.
Pairs are tokenised once, by the tokenizer's own pair encoding (``[CLS] q [SEP] d [SEP]``, right padding); only
documents are cut (``truncation="only_second"``), or, with MaxP, split into overlapping windows and scored by their
best window. A query is never cut: one too long for the model is a :class:`~.limits.QueryError` naming the limit;
a MixEncoder's own query and candidate limits are checked in the same place (:class:`~.limits.PairLimits`), so the
candidate is cut by the tokenizer and counted, never silently inside the model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..runtime import resolve_device, resolve_dtype
from .limits import MIN_DOCUMENT_TOKENS, PairLimits, QueryError

__all__ = ["DEFAULT_BATCH_TOKENS", "DTYPES", "MIN_DOCUMENT_TOKENS", "PairScorer", "QueryError", "Row", "ScoringStats",
           "load_tokenizer"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
"""Padded tokens per forward by device type. On CPU, forwards of ~4k tokens run faster than one of a DL query's whole
100 passages (~15k tokens; measured 1.19 s against 1.41 s per query on 2 cores: the activations stay in cache), and
the query repeated in each of those 3-4 forwards costs ~10 tokens each. GPUs want bigger forwards."""


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
    query: int = 0


class PairScorer:
    """Scores (query, document) pairs with a sequence-classification cross-encoder.

    Args:
        model: Model folder or Hub id (loaded with ``trust_remote_code=True``), or a loaded sequence-classification
            model (then ``tokenizer`` is needed; it is used as it is, on its device, in eval mode while scoring).
        device: Torch device; default ``cuda`` when available, else ``cpu`` (ignored for a loaded model).
        dtype: Model dtype, a ``torch.dtype``, a name in :data:`DTYPES` or ``auto`` (bfloat16 where the device computes
            it natively, else float32); default the checkpoint's float32.
        batch_tokens: Padded tokens (rows x longest row) per forward pass; a query's rows go into as few forwards
            as this allows, and several short queries may share one. Default: :data:`DEFAULT_BATCH_TOKENS` of the
            device type (16,384 for a device not listed).
        max_length: Tokens per row; default the tokenizer's ``model_max_length`` capped by the model's
            ``max_position_embeddings``.
        maxp: Score long documents by the maximum over overlapping windows (stride: half a window) instead of
            cutting them.
        progress: Show a progress bar.
        tokenizer: The tokenizer of a loaded ``model``.
        attention_backend: Passed to every forward (``auto``, ``dense``, ``windowed`` or ``kernel``) for sparse-ce
            models; ``None`` keeps the model's configured backend.

    Raises:
        ValueError: for a ``max_length`` over ``max_position_embeddings`` or a model with more than one logit.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_tokens: int | None = None,
        max_length: int | None = None,
        maxp: bool = False,
        progress: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
        attention_backend: str | None = None,
    ) -> None:
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("tokenizer: needed with a loaded model")
            self.model, self.tokenizer, self.device = model, tokenizer, model.device
            name = type(model).__name__
        else:
            name = str(model)
            self.device = resolve_device(device)
            self.tokenizer = tokenizer or load_tokenizer(model)
            dtype = resolve_dtype(dtype, self.device) if isinstance(dtype, str) else dtype
            # dtype=None would make transformers compute in the stored dtype (float16 weights: slow, lossy on CPU);
            # left out, config.json's dtype (float32 for the shipped models) applies
            options = {"dtype": DTYPES[dtype] if isinstance(dtype, str) else dtype} if dtype is not None else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=True, **options)
            self.model.to(self.device).eval()
        if not self.tokenizer.is_fast:
            raise ValueError(f"{name}: a fast tokenizer is needed (overflowing windows and pair encoding)")
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS.get(self.device.type, 16384)
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens: expected a positive number, got {batch_tokens}")
        config = self.model.config
        model = name
        if config.num_labels != 1:
            raise ValueError(f"{model}: num_labels is {config.num_labels}; a cross-encoder for ranking has one logit")
        self.limits = PairLimits.of(config, self.tokenizer, max_length)
        self.max_length = self.limits.max_length
        # a MixEncoder's own encoders hold [CLS] q [SEP] and [CLS] d [SEP] of at most these many tokens
        self.max_query_length = self.limits.max_query_length
        self.max_candidate_length = self.limits.max_candidate_length
        self.batch_tokens = batch_tokens
        self.forward_options = {"attention_backend": attention_backend} if attention_backend else {}
        if attention_backend and getattr(config, "model_type", None) != "sparse_ce":
            raise ValueError(f"attention_backend: {name} is not a sparse-ce model; only sparse-ce models choose one")
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
            QueryError: as :meth:`document_room`.
        """
        rows, stats = self.encode(queries, documents, query_ids)  # every query checked before the first forward
        scores = self.score_rows(rows, len(queries))
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

    def document_room(self, query: str, name: str | None = None) -> tuple[int, int]:
        """(tokens of ``query``, document tokens a row with it may hold): :meth:`.limits.PairLimits.document_room`."""
        return self.limits.document_room(self.tokenizer, query, name)

    def check_queries(self, queries: Sequence[str], query_ids: Sequence[str] | None = None) -> None:
        """Raise :class:`QueryError` for the first query :meth:`document_room` refuses (each distinct query once)."""
        self.limits.check_queries(self.tokenizer, queries, query_ids)

    def encode(
        self, queries: Sequence[str], documents: Sequence[str], query_ids: Sequence[str] | None = None
    ) -> tuple[list[Row], ScoringStats]:
        """Tokenise pairs into unpadded rows, grouped by query (in order of first appearance), longest first.

        Args:
            queries: Query texts.
            documents: Document texts, as many as queries.
            query_ids: Names of the queries for error messages; default the query texts.

        Raises:
            QueryError: as :meth:`document_room`.
            ValueError: for lists of different lengths.
        """
        if len(queries) != len(documents) or (query_ids is not None and len(query_ids) != len(queries)):
            raise ValueError(f"{len(queries)} queries, {len(documents)} documents and query_ids differ in length")
        names = queries if query_ids is None else query_ids
        groups: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query, []).append(i)
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        rows_by_query: list[list[Row]] = []
        long_docs, empty_docs = 0, 0
        for query, pairs in groups.items():
            query_len, window = self.document_room(query, names[pairs[0]])
            encoded = self.tokenizer(
                [query] * len(pairs),
                [documents[i] for i in pairs],
                truncation="only_second",
                max_length=query_len + specials + window,
                stride=window // 2 if self.maxp else 0,
                return_overflowing_tokens=True,
                return_token_type_ids=True,
            )
            sample = encoded["overflow_to_sample_mapping"]
            group_rows = [
                Row(pairs[s], ids, types, query=len(rows_by_query))
                for j, (s, ids, types) in enumerate(zip(sample, encoded["input_ids"], encoded["token_type_ids"]))
                if self.maxp or j == 0 or sample[j - 1] != s  # without MaxP: each document's first window only
            ]
            long_docs += sum(count > 1 for count in Counter(sample).values())
            empty_docs += sum(len(ids) == query_len + specials for ids in encoded["input_ids"])
            rows_by_query.append(sorted(group_rows, key=lambda row: -len(row.input_ids)))
        rows = [row for group in rows_by_query for row in group]
        return rows, ScoringStats(len(queries), len(rows), long_docs, empty_docs, self.maxp)

    def batches(self, rows: list[Row]) -> list[list[Row]]:
        """Split rows (grouped by query, longest first within a query) into forwards of at most
        :attr:`batch_tokens` padded tokens: whole queries where they fit, never a query's rows across two forwards
        that one could hold."""
        batches: list[list[Row]] = []
        current: list[Row] = []
        for query_rows in _runs_of_one_query(rows):
            if current and _padded_tokens(current + query_rows) > self.batch_tokens:
                batches.append(current)
                current = []
            for row in query_rows:
                if current and _padded_tokens(current + [row]) > self.batch_tokens:
                    batches.append(current)
                    current = []
                current.append(row)
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def score_rows(self, rows: list[Row], num_pairs: int) -> list[float]:
        """Scores of ``num_pairs`` pairs from rows of :meth:`encode`: each pair's maximum over its rows (so that rows
        tokenised once can be scored under several model settings)."""
        scores = torch.full((num_pairs,), float("-inf"))
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=len(rows), unit="row", desc="scoring", disable=not self.progress) as bar:
                for batch in self.batches(rows):
                    inputs = self.tokenizer.pad(
                        {"input_ids": [r.input_ids for r in batch], "token_type_ids": [r.token_type_ids for r in batch]},
                        padding_side="right",
                        return_tensors="pt",
                    ).to(self.device)
                    logits = self.model(**inputs, **self.forward_options).logits[:, 0].float().cpu()
                    pairs = torch.tensor([r.pair for r in batch])
                    scores.scatter_reduce_(0, pairs, logits, reduce="amax")
                    bar.update(len(batch))
        finally:
            self.model.train(was_training)
        return scores.tolist()


def _runs_of_one_query(rows: list[Row]) -> list[list[Row]]:
    """Consecutive rows of the same query (:meth:`PairScorer.encode` keeps a query's rows together)."""
    runs: list[list[Row]] = []
    for row in rows:
        if runs and runs[-1][-1].query == row.query:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _padded_tokens(rows: list[Row]) -> int:
    return len(rows) * max(len(r.input_ids) for r in rows)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or Hub id, without running or prompting for the model's remote code.

    Sparse-ce folders hold a plain BERT tokenizer; their config's ``auto_map`` names only model classes, so
    ``trust_remote_code=False`` is enough and never executes code.
    """
    return AutoTokenizer.from_pretrained(model, trust_remote_code=False)
