"""``sparse-ce serve``: a re-ranking HTTP server (TEI ``/rerank`` and Cohere-style ``/v1/rerank``) on uvicorn.

The model loads as in ``rerank`` (:func:`~sparse_ce.rank.rerank.make_scorer`: a sparse-ce folder, a MixEncoder or a
plain BERT cross-encoder, local or a Hub id). The server binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM
(or Ctrl-C) stops accepting connections, answers ``503`` to new requests on open ones, and answers every request in
flight before the process ends. The web stack (``pip install sparse-ce[serve]``) is imported only when serving, so
the other commands work without it.
"""

from __future__ import annotations

import argparse
import logging
import os

from configuration_sparse_ce import ATTENTION_BACKENDS

from ..errors import positive_int
from ..rank.scoring import DTYPES

logger = logging.getLogger(__name__)

API_KEY_VARIABLE = "SPARSE_CE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser``."""
    parser.add_argument("--model", required=True, help="model folder or Hub id of a cross-encoder (as for rerank)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="compute dtype (default auto: bfloat16 where the hardware has it; float32 for exact "
                        "scores)")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads of the model (default: the cores this process may use)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", choices=ATTENTION_BACKENDS,
                        help="attention backend of sparse-ce models (default: the model's own)")
    parser.add_argument("--batch-tokens", type=positive_int, help="padded tokens per forward, across requests (default: "
                        "4096 on CPU, 16384 on GPU)")
    parser.add_argument("--max-batch-requests", type=positive_int, default=32, help="requests sharing one forward at most "
                        "(default: 32)")
    parser.add_argument("--max-client-batch-size", type=positive_int, default=1000,
                        help="texts per request at most; more: 413 (default: 1000)")
    parser.add_argument("--max-input-length", type=positive_int, help="tokens per (query, text) pair (default: the model's "
                        "maximum); longer pairs are cut with truncate=true, else refused with 413")
    parser.add_argument("--queue-size", type=positive_int, default=64, help="requests waiting for the model at most; more: "
                        "429 with Retry-After (default: 64)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait for its scores; "
                        "then 503 (default: 60)")
    parser.add_argument("--payload-limit", type=positive_int, default=2_000_000, help="request body bytes at most; more: 413 "
                        "(default: 2,000,000, as TEI)")
    parser.add_argument("--index", metavar="DIR", help="MixEncoder candidate store (sparse-ce index): /v1/rerank "
                        "takes documents as {\"id\": ...} and reads them from it")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                        f"(default: ${API_KEY_VARIABLE} when set)")
    parser.add_argument("--stop-after", type=float, metavar="S", help="shut down (gracefully) after S seconds; for "
                        "tests and benchmarks")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")


def run(args: argparse.Namespace) -> int:
    """Load the model, build the app and serve until SIGTERM / Ctrl-C (or ``--stop-after``)."""
    from ..errors import require

    for module in ("uvicorn", "starlette", "prometheus_client"):
        require(module, "serve", "sparse-ce serve")
    import uvicorn

    from .app import create_app
    service = build_service(args)
    app_holder: dict = {}
    app = create_app(service, args.stop_after, request_exit=lambda: app_holder["server"].handle_exit(15, None))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                            timeout_graceful_shutdown=int(args.timeout) + 5, lifespan="on")

    class DrainingServer(uvicorn.Server):
        """uvicorn's server; on SIGTERM/SIGINT new requests on open connections get 503 while the rest drain."""

        def handle_exit(self, sig, frame) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    server = app_holder["server"] = DrainingServer(config)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: reachable from other machines%s", args.host,
                       "" if service.api_key else " without an API key")
    limits = service.limits
    logger.info("serving %s (%s, %s) on http://%s:%d", limits.model_id, limits.model_dtype, limits.backend,
                args.host, args.port)
    server.run()
    return 0


def build_service(args: argparse.Namespace):
    """The :class:`~.app.RerankService` of the command's options (the model loaded as ``rerank`` loads it)."""
    import torch

    from ..cli import UsageError
    from ..rank.rerank import make_scorer, open_index
    from ..runtime import set_threads
    from .app import Limits, RerankService

    if args.timeout <= 0:
        raise UsageError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    try:
        threads = set_threads(args.threads)
    except ValueError as error:
        raise UsageError(f"--threads: {error}") from None
    store = open_index(args) if args.index else None
    scoring = argparse.Namespace(device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens,
                                 max_length=args.max_input_length, backend=args.backend)
    scorer = make_scorer(args.model, scoring, progress=False)
    ranker = _store_ranker(scorer, store, args) if store is not None else None
    config = scorer.model.config
    backend = scorer.forward_options.get("attention_backend") or getattr(config, "attention_backend", None)
    limits = Limits(
        model_id=args.model, model_dtype=str(scorer.model.dtype).removeprefix("torch."),
        backend=f"{getattr(config, 'model_type', '?')}" + (f"/{backend}" if backend else ""),
        device=str(scorer.device), max_input_length=scorer.max_length, max_batch_tokens=scorer.batch_tokens,
        max_batch_requests=args.max_batch_requests, max_client_batch_size=args.max_client_batch_size,
        queue_size=args.queue_size, timeout=args.timeout, payload_limit=args.payload_limit, index=args.index,
    )
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    return RerankService(scorer, limits, api_key=api_key, store_ranker=ranker,
                         on_worker_start=lambda: torch.set_num_threads(threads))


def _store_ranker(scorer, store, args: argparse.Namespace):
    from ..cli import UsageError
    from ..precompute.ranker import MIXENCODER_TYPE, StoreRanker

    if getattr(scorer.model.config, "model_type", None) != MIXENCODER_TYPE:
        raise UsageError(f"--index: --model {args.model} is not a MixEncoder; only those read a store")
    try:
        return StoreRanker(scorer.model, scorer.tokenizer, store)
    except ValueError as error:
        raise UsageError(f"--index {args.index}: --model {args.model}: {error}") from None
