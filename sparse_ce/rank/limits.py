"""How long a pair row may be, and the one place that checks a query against it (issue 23: no silent cut).

A row is ``[CLS] q [SEP] d [SEP]`` of at most ``max_length`` tokens. A query is never cut: an empty one, or one that
leaves fewer than :data:`MIN_DOCUMENT_TOKENS` document tokens, is a :class:`QueryError`. A MixEncoder
(``max_query_length`` / ``max_candidate_length`` in its config) encodes ``[CLS] q [SEP]`` and ``[CLS] d [SEP]`` apart
and would cut each to its own limit inside the model; here its query limit is checked too, and the document room
is capped at ``max_candidate_length - 2``, so the only cut left is the tokenizer's, which the scorer counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedTokenizerBase

MIN_DOCUMENT_TOKENS = 8
"""The fewest document tokens a query must leave room for within the maximum length."""


class QueryError(ValueError):
    """A query the model cannot score whole: empty, or longer than the model's limit (queries are never cut)."""


@dataclass(frozen=True)
class PairLimits:
    """Token limits of a model's pair rows.

    Attributes:
        max_length: Tokens per row.
        max_query_length: A MixEncoder's ``[CLS] q [SEP]`` limit (``None``: no separate limit).
        max_candidate_length: A MixEncoder's ``[CLS] d [SEP]`` limit (``None``: no separate limit).
        specials: Special tokens of a pair row (3 for BERT).
    """

    max_length: int
    max_query_length: int | None
    max_candidate_length: int | None
    specials: int

    @classmethod
    def of(cls, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        """The limits of a model: ``max_length`` (default the tokenizer's, capped by ``max_position_embeddings``,
        plus ``max_candidate_length`` for a MixEncoder, which splits pairs).

        Raises:
            ValueError: for a ``max_length`` over that cap.
        """
        candidate = getattr(config, "max_candidate_length", None)
        limit = config.max_position_embeddings + (candidate or 0)
        if max_length is not None and max_length > limit:
            raise ValueError(f"max_length: {max_length} exceeds the model's max_position_embeddings {limit}")
        return cls(max_length or min(tokenizer.model_max_length, limit), getattr(config, "max_query_length", None),
                   candidate, tokenizer.num_special_tokens_to_add(pair=True))

    def document_room(self, tokenizer: PreTrainedTokenizerBase, query: str, name: str | None = None) -> tuple[int, int]:
        """(tokens of ``query``, document tokens a row with it may hold).

        Raises:
            QueryError: for an empty query, a query over a MixEncoder's ``max_query_length - 2`` tokens, or one
                that leaves fewer than :data:`MIN_DOCUMENT_TOKENS` document tokens.
        """
        name = query if name is None else name
        query_len = len(tokenizer(query, add_special_tokens=False, verbose=False)["input_ids"])
        return query_len, self.room(query_len, name)

    def room(self, query_len: int, name: str) -> int:
        """Document tokens a row with a query of ``query_len`` tokens may hold; raises :class:`QueryError` as
        :meth:`document_room` says (the one check, for callers that tokenise themselves, e.g. the server)."""
        if query_len == 0:
            raise QueryError(f"query {name!r}: empty query")
        if self.max_query_length is not None and query_len + 2 > self.max_query_length:
            raise QueryError(
                f"query {name!r}: {query_len} tokens exceed the MixEncoder's max_query_length {self.max_query_length} "
                "([CLS] and [SEP] included); queries are never cut: shorten the query"
            )
        window = self.max_length - self.specials - query_len
        if self.max_candidate_length is not None:
            window = min(window, self.max_candidate_length - 2)
        if window < MIN_DOCUMENT_TOKENS:
            raise QueryError(
                f"query {name!r}: {query_len} tokens leave {window} of max_length {self.max_length} for the "
                f"document (at least {MIN_DOCUMENT_TOKENS} needed); shorten the query or raise max_length"
            )
        return window

    def check_queries(self, tokenizer: PreTrainedTokenizerBase, queries: Sequence[str],
                      query_ids: Sequence[str] | None = None) -> None:
        """Raise :class:`QueryError` for the first query :meth:`document_room` refuses (each distinct query once)."""
        names = queries if query_ids is None else query_ids
        for query, name in dict(zip(queries, names)).items():
            self.document_room(tokenizer, query, name)


def model_limits(model: str, max_length: int | None = None) -> tuple[PairLimits, PreTrainedTokenizerBase]:
    """The limits and tokenizer of a model folder or Hub id from its config and tokenizer alone (no weights loaded:
    a caller checks its queries before any work)."""
    from transformers import AutoConfig

    from .scoring import load_tokenizer

    tokenizer = load_tokenizer(model)
    config = AutoConfig.from_pretrained(model, trust_remote_code=True)
    return PairLimits.of(config, tokenizer, max_length), tokenizer
