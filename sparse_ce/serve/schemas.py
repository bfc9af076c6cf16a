"""Request bodies of ``POST /rerank`` (text-embeddings-inference) and ``POST /v1/rerank`` (Cohere/Jina style),
checked field by field, and the JSON error every refusal carries.

Errors follow TEI's shape ``{"error": message, "error_type": type}`` and its status codes: 400 for a body that is
not JSON (or not UTF-8) and for empty ``texts``, 413 for limits (request bytes, texts per request, tokens per pair),
422 for missing or wrong-typed fields, 429 when the queue is full, 503 while shutting down or after a timeout.
Unknown fields are ignored (as TEI and Cohere do; clients such as LangChain's send ``model``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


class RequestError(Exception):
    """A refused request: HTTP ``status``, a message naming the field or limit, and TEI's ``error_type``."""

    def __init__(self, status: int, message: str, error_type: str = "Validation", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type
        self.headers = headers or {}

    def body(self) -> dict:
        # "message" too: Cohere-style clients read that key
        return {"error": self.message, "error_type": self.error_type, "message": self.message}


@dataclass
class RerankRequest:
    """One re-ranking request of either API, normalised.

    Attributes:
        query: The query text.
        texts: Document texts (``None`` where the document is given by ``ids``).
        ids: Store ids of documents given as ``{"id": ...}`` (``None`` where given as text).
        raw_scores: Return logits (True) or their sigmoid (False).
        truncate: Cut documents that do not fit (True) or refuse the request (False).
        left: Cut a document's start instead of its end.
        top_n: Keep the best ``top_n`` results (``None``: all).
        return_text: Put each document's text in its result.
        documents_name: The request's name of the documents (``texts`` or ``documents``), for messages.
    """

    query: str
    texts: list[str | None]
    ids: list[str | None] = field(default_factory=list)
    raw_scores: bool = False
    truncate: bool = False
    left: bool = False
    top_n: int | None = None
    return_text: bool = False
    documents_name: str = "texts"


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body (400 for invalid UTF-8 or JSON, 422 for another JSON type)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"body: not valid UTF-8 ({error.reason} at byte {error.start})", "Parse") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"body: not JSON ({error.msg} at line {error.lineno} column {error.colno})",
                           "Parse") from None
    if not isinstance(value, dict):
        raise RequestError(422, f"body: expected a JSON object, got {_type(value)}")
    return value


def parse_tei(body: dict, max_client_batch_size: int) -> RerankRequest:
    """``POST /rerank``: ``query``, ``texts``, ``raw_scores``, ``return_text``, ``truncate``,
    ``truncation_direction`` (``Right`` or ``Left``)."""
    query = _string(body, "query")
    texts = _list(body, "texts", "texts", max_client_batch_size)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"texts[{i}]: expected a string, got {_type(text)}")
    return RerankRequest(
        query=query, texts=list(texts), ids=[None] * len(texts),
        raw_scores=_bool(body, "raw_scores", False), return_text=_bool(body, "return_text", False),
        truncate=_bool(body, "truncate", False), left=_direction(body),
    )


def parse_cohere(body: dict, max_client_batch_size: int, has_index: bool) -> RerankRequest:
    """``POST /v1/rerank``: ``query``, ``documents`` (strings, ``{"text": ...}`` or, with ``--index``,
    ``{"id": ...}``), ``top_n``, ``return_documents``; also TEI's ``truncate``/``truncation_direction``."""
    query = _string(body, "query")
    documents = _list(body, "documents", "documents", max_client_batch_size)
    texts: list[str | None] = []
    ids: list[str | None] = []
    for i, document in enumerate(documents):
        name = f"documents[{i}]"
        if isinstance(document, str):
            texts.append(document), ids.append(None)
        elif isinstance(document, dict) and "text" in document:
            texts.append(_string(document, "text", name=f"{name}.text")), ids.append(None)
        elif isinstance(document, dict) and "id" in document:
            if not has_index:
                raise RequestError(422, f"{name}.id: documents by id need a server started with --index")
            texts.append(None), ids.append(_string(document, "id", name=f"{name}.id", empty_ok=True))
        else:
            raise RequestError(422, f"{name}: expected a string, {{\"text\": ...}} or {{\"id\": ...}}, "
                                    f"got {_type(document)}")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise RequestError(422, f"top_n: expected a positive integer, got {top_n!r}")
    return RerankRequest(
        query=query, texts=texts, ids=ids, raw_scores=False, top_n=top_n,
        return_text=_bool(body, "return_documents", False), documents_name="documents",
        truncate=_bool(body, "truncate", False), left=_direction(body),
    )


def sigmoid(logit: float) -> float:
    """TEI's ``raw_scores=false`` score (saturates at 1.0 in float32 for logits over ~17)."""
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))


def _type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _string(body: dict, key: str, name: str | None = None, empty_ok: bool = False) -> str:
    name = name or key
    if key not in body:
        raise RequestError(422, f"{name}: missing field")
    value = body[key]
    if not isinstance(value, str):
        raise RequestError(422, f"{name}: expected a string, got {_type(value)}")
    if not value.strip() and not empty_ok and key == "query":
        raise RequestError(400, f"{name}: empty", "Empty")
    return value


def _list(body: dict, key: str, name: str, limit: int) -> list:
    if key not in body:
        raise RequestError(422, f"{name}: missing field")
    value = body[key]
    if not isinstance(value, list):
        raise RequestError(422, f"{name}: expected an array, got {_type(value)}")
    if not value:
        raise RequestError(400, f"{name}: cannot be empty", "Empty")
    if len(value) > limit:
        raise RequestError(413, f"{name}: batch size {len(value)} > maximum allowed batch size {limit} "
                                f"(--max-client-batch-size)")
    return value


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(422, f"{key}: expected true or false, got {_type(value)}")
    return value


def _direction(body: dict) -> bool:
    """Whether ``truncation_direction`` is ``Left`` (TEI spells ``Right``/``Left``; any case accepted)."""
    value = body.get("truncation_direction", "Right")
    if value is None:
        return False
    if not isinstance(value, str) or value.lower() not in ("left", "right"):
        raise RequestError(422, f"truncation_direction: expected \"Right\" or \"Left\", got {value!r}")
    return value.lower() == "left"
