"""Tokenising a request's pairs into model rows, with TEI's ``truncate`` and ``truncation_direction``.

Rows are what :meth:`~sparse_ce.rank.scoring.PairScorer.encode` makes (the tokenizer's own pair template,
``[CLS] q [SEP] d [SEP]`` for BERT), so pairs that fit get the ids ``CrossEncoder.predict`` gives them. The query is
tokenised once per request and never cut (as in ``rerank``); a document that does not fit is cut at its end
(``Right``) or start (``Left``) when ``truncate`` is true, and refused (413, naming the limit) when it is false. The
server works on its own copy of the fast tokenizer's backend, so no other caller's truncation settings leak in.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from ..rank.limits import PairLimits, QueryError
from ..rank.scoring import Row
from .schemas import RequestError, RerankRequest


class PairEncoder:
    """Rows of (query, text) pairs for a tokenizer and a maximum row length.

    Args:
        tokenizer: A fast tokenizer (its backend is copied).
        limits: The scorer's :class:`PairLimits` with ``max_length`` = ``--max-input-length``: the query and document
            room are checked there, as in ``rerank`` (a MixEncoder's query and candidate limits included).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: PairLimits) -> None:
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        if self.backend.post_processor is None:
            raise ValueError("the tokenizer has no pair template (post-processor); a cross-encoder needs one")
        self.limits = limits
        self.max_length = limits.max_length
        self.specials = self.backend.num_special_tokens_to_add(True)

    def encode(self, request: RerankRequest) -> tuple[list[Row], int, int]:
        """Rows of the request's text documents (``Row.pair``: the document's position), longest first, the number
        of documents cut and the tokens of all rows.

        Raises:
            RequestError: 422 for a query that leaves under :data:`MIN_DOCUMENT_TOKENS` document tokens, 413 for a
                pair longer than ``max_length`` when ``truncate`` is false.
        """
        query = self.backend.encode(request.query, add_special_tokens=False)
        if not query.ids:
            raise RequestError(400, "query: no tokens", "Empty")
        try:
            room = self.limits.room(len(query.ids), "query")
        except QueryError as error:  # too long for the model (or a MixEncoder's query limit): never cut
            raise RequestError(422, str(error).replace("query 'query': ", "query: ")) from None
        positions = [i for i, text in enumerate(request.texts) if text is not None]
        documents = self.backend.encode_batch([request.texts[i] for i in positions], add_special_tokens=False)
        rows, cut, tokens = [], 0, 0
        for position, document in zip(positions, documents):
            if len(document.ids) > room:
                if not request.truncate:
                    length = len(query.ids) + len(document.ids) + self.specials
                    raise RequestError(413, f"{request.documents_name}[{position}]: the pair has {length} tokens, "
                                            f"more than the maximum input length {self.max_length}; shorten it or "
                                            f"pass truncate=true")
                document.truncate(room, direction="left" if request.left else "right")
                cut += 1
            pair = self.backend.post_processor.process(query, document, True)
            rows.append(Row(position, pair.ids, pair.type_ids))
            tokens += len(pair.ids)
        rows.sort(key=lambda row: -len(row.input_ids))
        return rows, cut, tokens
