"""The ASGI application (Starlette): TEI's ``/rerank``, ``/health``, ``/info``, ``/metrics`` and the Cohere/Jina-style
``/v1/rerank``, over one :class:`~.batcher.Batcher`.

Starlette rather than FastAPI: the bodies are checked by hand (:mod:`.schemas`) so that every refusal has TEI's error
shape and status and names its field, the byte limit applies while the body is read, and invalid UTF-8 is its own
error; FastAPI's pydantic layer would add a second error format and nothing the server uses. Both are served by
uvicorn. A request is read (at most ``payload_limit`` bytes), parsed, tokenised in a worker thread, queued, and
answered with exactly its own scores in its own order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
import uuid
from dataclasses import asdict, dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..rank.scoring import PairScorer, Row
from .batcher import Batcher, QueueFull
from .encoding import PairEncoder
from .metrics import ServeMetrics
from .schemas import RequestError, RerankRequest, parse_cohere, parse_json, parse_tei, sigmoid

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    """The server's limits and names, as ``/info`` shows them."""

    model_id: str
    model_dtype: str
    backend: str
    device: str
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int = 32
    max_client_batch_size: int = 1000
    queue_size: int = 64
    timeout: float = 60.0
    payload_limit: int = 2_000_000
    index: str | None = None


class RerankService:
    """The endpoints' logic over a scorer (and, with ``--index``, a store ranker).

    Args:
        scorer: The :class:`PairScorer` that ``rerank`` would use (its model, tokenizer, ``max_length``).
        limits: Limits and names.
        api_key: Bearer token every endpoint but ``/health`` requires (``None``: open).
        store_ranker: A :class:`~sparse_ce.precompute.ranker.StoreRanker` for documents given by id.
        on_worker_start: Called in the batcher's thread before its first forward.
    """

    def __init__(self, scorer: PairScorer, limits: Limits, api_key: str | None = None, store_ranker=None,
                 on_worker_start=None) -> None:
        self.scorer, self.limits, self.api_key, self.store_ranker = scorer, limits, api_key, store_ranker
        self.encoder = PairEncoder(scorer.tokenizer, dataclasses.replace(scorer.limits, max_length=limits.max_input_length))
        self.metrics = ServeMetrics()
        self.draining = False
        self.batcher = Batcher(self._forward, limits.max_batch_tokens, limits.max_batch_requests, limits.queue_size,
                               store_score=store_ranker.score if store_ranker else None, metrics=self.metrics,
                               on_start=on_worker_start)

    def _forward(self, rows: list[Row]) -> list[float]:
        """One forward through the same scoring code as ``rerank`` (``PairScorer.score_rows``)."""
        numbered = [Row(k, row.input_ids, row.token_type_ids) for k, row in enumerate(rows)]
        return self.scorer.score_rows(numbered, len(numbered))

    # endpoints

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        return await self._guarded(request, "/info", lambda: JSONResponse(self._info()))

    async def metrics_endpoint(self, request: Request) -> Response:
        return await self._guarded(
            request, "/metrics", lambda: Response(self.metrics.render(), media_type=self.metrics.content_type))

    async def rerank(self, request: Request) -> Response:
        return await self._score(request, "/rerank")

    async def cohere_rerank(self, request: Request) -> Response:
        return await self._score(request, "/v1/rerank")

    # helpers

    def _info(self) -> dict:
        config = self.scorer.model.config
        labels = dict(getattr(config, "id2label", None) or {0: "LABEL_0"})
        return {
            **asdict(self.limits),
            "model_type": {"reranker": {"id2label": {str(k): v for k, v in labels.items()},
                                        "label2id": {v: k for k, v in labels.items()}}},
            "model_architecture": getattr(config, "model_type", None),
            "auto_truncate": False,
            "max_concurrent_requests": self.limits.queue_size,
            "score": "raw_scores=false: sigmoid(logit); raw_scores=true: the logit",
        }

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            reason = "missing" if not given else "wrong"
            raise RequestError(401, f"Authorization: {reason} API key (expected 'Authorization: Bearer KEY')",
                               "Unauthorized", {"WWW-Authenticate": "Bearer"})

    async def _guarded(self, request: Request, endpoint: str, answer) -> Response:
        try:
            self._authorize(request)
            response = answer()
        except RequestError as error:
            response = _error(error)
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.payload_limit
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"body: {declared} bytes, more than the limit of {limit} (--payload-limit)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body: more than the limit of {limit} bytes (--payload-limit)")
        return bytes(body)

    async def _score(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            response = await self._answer(request, endpoint)
        except RequestError as error:
            response = _error(error)
        except Exception as error:  # never a traceback to the client; the server goes on
            logger.exception("%s failed", endpoint)
            response = _error(RequestError(500, f"internal error: {type(error).__name__}: {error}", "Backend"))
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _answer(self, request: Request, endpoint: str) -> Response:
        self._authorize(request)
        if self.draining:
            raise RequestError(503, "the server is shutting down", "Unhealthy", {"Retry-After": "1"})
        body = parse_json(await self._read_body(request))
        limit = self.limits.max_client_batch_size
        if endpoint == "/rerank":
            parsed = parse_tei(body, limit)
        else:
            parsed = parse_cohere(body, limit, self.store_ranker is not None)
        stored = [(i, docid) for i, docid in enumerate(parsed.ids) if docid is not None]
        if stored:
            missing = [f"documents[{i}].id {docid!r}" for i, docid in stored if docid not in self.store_ranker.store]
            if missing:
                raise RequestError(422, f"{', '.join(missing[:5])}: not in the store (--index {self.limits.index})")
        rows, cut, tokens = await run_in_threadpool(self.encoder.encode, parsed)
        try:
            future = self.batcher.submit(parsed.query, rows, len(parsed.texts), stored)
        except QueueFull:
            self.metrics.overloaded.inc()
            raise RequestError(429, f"queue: {self.limits.queue_size} requests are waiting (--queue-size); retry "
                                    f"later", "Overloaded", {"Retry-After": "1"}) from None
        self.metrics.truncated.inc(cut)
        try:
            logits = await asyncio.wait_for(future, self.limits.timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"not scored within {self.limits.timeout:g} s (--timeout)", "Timeout",
                               {"Retry-After": "1"}) from None
        except Exception as error:
            raise RequestError(500, f"the model failed on this request: {type(error).__name__}: {error}",
                               "Backend") from None
        if endpoint == "/rerank":
            return JSONResponse(_tei_results(parsed, logits))
        return JSONResponse(self._cohere_results(parsed, logits, tokens))

    def _cohere_results(self, parsed: RerankRequest, logits: list[float], tokens: int) -> dict:
        results = []
        for i in _order(logits)[: parsed.top_n]:
            result = {"index": i, "relevance_score": sigmoid(logits[i])}
            if parsed.return_text:
                text = parsed.texts[i]
                result["document"] = {"text": text} if text is not None else {"id": parsed.ids[i]}
            results.append(result)
        return {"id": str(uuid.uuid4()), "model": self.limits.model_id, "results": results,
                "usage": {"total_tokens": tokens},
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}


def _order(scores: list[float]) -> list[int]:
    """Positions by descending score, ties in input order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _tei_results(parsed: RerankRequest, logits: list[float]) -> list[dict]:
    results = []
    for i in _order(logits):
        result = {"index": i, "score": logits[i] if parsed.raw_scores else sigmoid(logits[i])}
        if parsed.return_text:
            result["text"] = parsed.texts[i]
        results.append(result)
    return results


def _error(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


def create_app(service: RerankService, stop_after: float | None = None, request_exit=None) -> Starlette:
    """The Starlette app of ``service``; its lifespan starts and drains the batcher. ``stop_after`` seconds after
    start-up, ``request_exit()`` is called (tests and benchmarks: a server that always ends)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        timer = None
        if stop_after and request_exit:
            async def stop_later() -> None:
                await asyncio.sleep(stop_after)
                logger.info("--stop-after %g s: shutting down", stop_after)
                request_exit()
            timer = asyncio.create_task(stop_later())
        try:
            yield
        finally:
            if timer:
                timer.cancel()
            service.draining = True
            await run_in_threadpool(service.batcher.stop, 30.0)

    routes = [
        Route("/rerank", service.rerank, methods=["POST"]),
        Route("/v1/rerank", service.cohere_rerank, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/info", service.info, methods=["GET"]),
        Route("/metrics", service.metrics_endpoint, methods=["GET"]),
    ]
    async def not_routed(request: Request, exc: HTTPException) -> Response:  # 404 / 405 as JSON errors too
        return _error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "NotFound"))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_routed, 405: not_routed})
    app.state.service = service
    return app
