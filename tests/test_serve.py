"""``sparse-ce serve``: real server processes on 127.0.0.1 (free ports, stopped in teardown, ``--stop-after`` as a
backstop) called over HTTP: scores equal ``CrossEncoder.predict``, concurrent clients get their own results, bad
input gets a 4xx naming its field, API keys, overload, SIGTERM with requests in flight, ``--index``; and the batcher
in-process (a failing request does not fail its batch)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tiny import PASSAGES, TOPICS, WORDS, make_mixencoder_folder  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = list(PASSAGES.values())


def start_server(model: Path, log: Path, *options: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "sparse_ce.cli", "serve", "--model", str(model), "--port", str(port),
               "--dtype", "float32", "--threads", "1", "--stop-after", "240", *options]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server ended ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(process)
    raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The tiny sparse model behind an API key, at most 16 texts per request and 20 kB per body."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process, url = start_server(tiny_model_dir, log, "--max-client-batch-size", "16", "--payload-limit", "20000",
                                "--batch-tokens", "256", env={"SPARSE_CE_API_KEY": KEY})
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield client
    stop(process)


@pytest.fixture(scope="module")
def cross_encoder(tiny_model_dir):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_model_dir), trust_remote_code=True, device="cpu",
                        model_kwargs={"dtype": torch.float32})


def logits(cross_encoder, query: str, texts: list[str]) -> list[float]:
    return cross_encoder.predict([(query, t) for t in texts], activation_fn=torch.nn.Identity()).tolist()


def test_scores_equal_cross_encoder_predict_on_both_apis(server, cross_encoder):
    query = TOPICS["101"]
    raw = logits(cross_encoder, query, TEXTS)
    # TEI's raw_scores=false: the sigmoid of the logit (whatever activation the model's config names for predict)
    predicted = cross_encoder.predict([(query, t) for t in TEXTS], activation_fn=torch.nn.Sigmoid()).tolist()
    for raw_scores, expected in ((True, raw), (False, predicted)):
        response = server.post("/rerank", json={"query": query, "texts": TEXTS, "raw_scores": raw_scores,
                                                "return_text": True})
        assert response.status_code == 200, response.text
        results = response.json()
        assert sorted(r["index"] for r in results) == list(range(len(TEXTS)))
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        for r in results:
            assert abs(r["score"] - expected[r["index"]]) <= 1e-4 and r["text"] == TEXTS[r["index"]]
    documents = [TEXTS[0], {"text": TEXTS[1]}, *TEXTS[2:]]
    response = server.post("/v1/rerank", json={"query": query, "documents": documents, "top_n": 3,
                                               "return_documents": True, "model": "ignored"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == sorted(range(len(TEXTS)), key=lambda i: -raw[i])[:3]
    for r in results:
        assert abs(r["relevance_score"] - predicted[r["index"]]) <= 1e-4
        assert r["document"] == {"text": TEXTS[r["index"]]}
    assert "document" not in server.post("/v1/rerank", json={"query": query, "documents": TEXTS}).json()["results"][0]


def test_concurrent_clients_get_their_own_scores_in_their_own_order(server, cross_encoder):
    def request(k: int):
        query = " ".join(WORDS[(3 * k + j) % len(WORDS)] for j in range(3 + k % 4))
        texts = [TEXTS[(k + j) % len(TEXTS)] + " " + WORDS[(k * j) % len(WORDS)] for j in range(3 + k % 13)]
        response = server.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True})
        return query, texts, response

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(request, range(32)))
    for query, texts, response in answers:
        assert response.status_code == 200, response.text
        expected = logits(cross_encoder, query, texts)
        results = response.json()
        assert sorted(r["index"] for r in results) == list(range(len(texts)))
        assert max(abs(r["score"] - expected[r["index"]]) for r in results) <= 1e-4
    batches = metric(server, "sparse_ce_batch_requests_sum")
    assert batches > 0


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


LONG = " ".join(["flea"] * 200)
BAD = [  # (endpoint, body (bytes or JSON), status, words the message names)
    ("/rerank", b"{not json", 400, "body"),
    ("/rerank", b'{"query": "\xff\xfe", "texts": ["a"]}', 400, "UTF-8"),
    ("/rerank", [1, 2], 422, "body"),
    ("/rerank", {"texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": 3, "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": "a"}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": []}, 400, "texts"),
    ("/rerank", {"query": "q", "texts": ["a", 7]}, 422, "texts[1]"),
    ("/rerank", {"query": "q", "texts": ["a"] * 17}, 413, "16"),
    ("/rerank", {"query": "q", "texts": ["a", LONG]}, 413, "maximum input length 128"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Up"}, 422, "truncation_direction"),
    ("/rerank", {"query": " ".join(["flea"] * 125), "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "texts": ["x " * 12000]}, 413, "payload-limit"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "a"}]}, 422, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": [{"id": "p1"}]}, 422, "--index"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a", LONG]}, 413, "documents[1]"),
]


@pytest.mark.parametrize("endpoint,body,status,named", BAD, ids=[f"{s}-{n}" for _, _, s, n in BAD])
def test_bad_input_gets_a_4xx_naming_it_and_the_server_goes_on(server, endpoint, body, status, named):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = server.post(endpoint, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert named in response.json()["error"] and response.json()["error_type"]
    good = server.post("/rerank", json={"query": "do goldfish grow", "texts": TEXTS[:3]})
    assert good.status_code == 200 and len(good.json()) == 3


def test_unknown_fields_are_ignored_and_truncate_cuts_and_counts(server, cross_encoder):
    body = {"query": "q", "texts": ["a"], "unknown": {"x": 1}}
    assert server.post("/rerank", json=body).status_code == 200
    before = metric(server, "sparse_ce_truncated_documents_total")
    query, text = TOPICS["101"], "the flea " + LONG
    right = server.post("/rerank", json={"query": query, "texts": [text], "truncate": True, "raw_scores": True})
    left = server.post("/rerank", json={"query": query, "texts": [text, "a"], "truncate": True, "raw_scores": True,
                                        "truncation_direction": "Left"})
    assert right.status_code == 200 and left.status_code == 200
    assert abs(right.json()[0]["score"] - logits(cross_encoder, query, [text])[0]) <= 1e-4  # predict cuts the end too
    assert metric(server, "sparse_ce_truncated_documents_total") == before + 2


def test_info_health_metrics_and_api_key(server):
    info = server.get("/info").json()
    assert info["max_client_batch_size"] == 16 and info["model_dtype"] == "float32" and info["max_input_length"] == 128
    pairs = metric(server, "sparse_ce_pairs_total")
    body = {"query": "q", "texts": ["a"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        with httpx.Client(base_url=str(server.base_url), timeout=10) as bare:
            for method, path in (("POST", "/rerank"), ("POST", "/v1/rerank"), ("GET", "/info"), ("GET", "/metrics")):
                response = bare.request(method, path, json=body, headers=headers)
                assert response.status_code == 401 and "API key" in response.json()["error"], (path, headers)
            assert bare.get("/health").status_code == 200
    assert metric(server, "sparse_ce_pairs_total") == pairs  # nothing was scored
    text = server.get("/metrics").text
    for name in ("sparse_ce_requests_total", "sparse_ce_request_duration_seconds_bucket", "sparse_ce_batch_pairs",
                 "sparse_ce_queue_depth", "sparse_ce_pairs_per_second"):
        assert name in text
    assert 'status="401"' in text and 'status="413"' in text


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny plain BERT cross-encoder (BertForSequenceClassification, one logit): no remote code."""
    from transformers import BertConfig, BertForSequenceClassification

    from tiny import TINY_MODEL, make_tokenizer

    folder = tmp_path_factory.mktemp("bert-ce")
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(**TINY_MODEL, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_server(bert_dir, tmp_path_factory):
    """The plain BERT cross-encoder with room for 2 waiting requests and one 64-token row per forward (slow on
    purpose); the SIGTERM test ends it."""
    log = tmp_path_factory.mktemp("serve-small") / "server.log"
    process, url = start_server(bert_dir, log, "--queue-size", "2", "--max-batch-requests", "1",
                                "--batch-tokens", "64")
    yield process, url
    stop(process)


def test_a_plain_bert_cross_encoder_is_served_like_rerank_loads_it(small_server, bert_dir):
    from sentence_transformers import CrossEncoder

    _, url = small_server
    query = TOPICS["104"]
    encoder = CrossEncoder(str(bert_dir), device="cpu", model_kwargs={"dtype": torch.float32})
    expected = logits(encoder, query, TEXTS)
    response = httpx.post(f"{url}/rerank", json={"query": query, "texts": TEXTS, "raw_scores": True}, timeout=30)
    assert response.status_code == 200, response.text
    assert max(abs(r["score"] - expected[r["index"]]) for r in response.json()) <= 1e-4


def test_overload_gets_429_with_retry_after_and_the_server_recovers(small_server):
    _, url = small_server
    texts = [TEXTS[i % len(TEXTS)] + " " + " ".join(WORDS[: 40 + i]) for i in range(40)]
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        with ThreadPoolExecutor(64) as pool:
            responses = list(pool.map(
                lambda k: client.post("/rerank", json={"query": f"query {k}", "texts": texts}), range(64)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and "--queue-size" in refused.json()["error"]
        assert client.post("/rerank", json={"query": "q", "texts": texts}).status_code == 200
        assert metric(client, "sparse_ce_overloaded_total") == codes.count(429)


def test_sigterm_answers_the_requests_in_flight(small_server):
    process, url = small_server
    texts = [" ".join(WORDS[: 50 + i % 30]) for i in range(40)]
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.post, "/rerank", json={"query": f"q {k}", "texts": texts}) for k in range(2)]
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=url, timeout=10) as watcher:  # its own connection
            while metric(watcher, "sparse_ce_requests_in_flight") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200]
    assert all(sorted(x["index"] for x in r.json()) == list(range(40)) for r in responses)
    assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_index_scores_stored_ids_like_texts(tmp_path):
    from sentence_transformers import CrossEncoder

    from sparse_ce.precompute.writer import write_store
    from sparse_ce.rank import load_tokenizer
    from transformers import AutoModelForSequenceClassification

    folder = make_mixencoder_folder(tmp_path / "mix")
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    write_store(model, load_tokenizer(str(folder)), list(PASSAGES.items())[:6], tmp_path / "store", progress=False)
    process, url = start_server(folder, tmp_path / "server.log", "--index", str(tmp_path / "store"))
    try:
        query = TOPICS["102"]
        documents = [{"id": "p4"}, {"text": PASSAGES["p5"]}, {"id": "p1"}, PASSAGES["p9"]]
        texts = [PASSAGES["p4"], PASSAGES["p5"], PASSAGES["p1"], PASSAGES["p9"]]
        response = httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": documents,
                                                        "return_documents": True}, timeout=30)
        assert response.status_code == 200, response.text
        encoder = CrossEncoder(str(folder), trust_remote_code=True, device="cpu")
        expected = encoder.predict([(query, t) for t in texts], activation_fn=torch.nn.Sigmoid()).tolist()
        results = response.json()["results"]
        assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
        assert max(abs(r["relevance_score"] - expected[r["index"]]) for r in results) <= 1e-4
        assert {r["index"]: r["document"] for r in results}[0] == {"id": "p4"}
        missing = httpx.post(f"{url}/v1/rerank", json={"query": query, "documents": [{"id": "p10"}]}, timeout=30)
        assert missing.status_code == 422 and "p10" in missing.json()["error"]
    finally:
        stop(process)


def test_a_failing_request_does_not_fail_its_batch():
    from sparse_ce.rank.scoring import Row
    from sparse_ce.serve.batcher import Batcher

    forwards = []

    def forward(rows):
        forwards.append(len(rows))
        if any(row.input_ids[0] == 666 for row in rows):
            raise RuntimeError("poisoned row")
        return [float(sum(row.input_ids)) for row in rows]

    async def main():
        batcher = Batcher(forward, batch_tokens=12, max_batch_requests=8, queue_size=8)
        jobs = {name: [Row(i, [first, i, i], [0, 0, 0]) for i in range(5)] for name, first in
                (("a", 1), ("poisoned", 666), ("b", 2))}
        futures = {name: batcher.submit(name, rows[::-1], len(rows)) for name, rows in jobs.items()}
        batcher.start()
        results = await asyncio.gather(*futures.values(), return_exceptions=True)
        batcher.stop(5)
        return dict(zip(futures, results))

    results = asyncio.run(main())
    assert results["a"] == [1.0 + 2 * i for i in range(5)] and results["b"] == [2.0 + 2 * i for i in range(5)]
    assert isinstance(results["poisoned"], RuntimeError)
    assert max(forwards) <= 4 and len(forwards) > 3  # requests span forwards under the 12-token budget
    assert not math.isnan(sum(results["a"]))


def test_timeout_and_a_model_error_get_json_errors_and_the_server_goes_on(tiny_model_dir):
    """In-process (Starlette's test client): a forward slower than --timeout gives 503, one that raises gives 500,
    and the next request is answered."""
    from starlette.testclient import TestClient

    from sparse_ce.cli import build_parser
    from sparse_ce.serve.app import create_app
    from sparse_ce.serve.command import build_service

    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--dtype", "float32", "--threads", "1",
                                      "--timeout", "0.5"])
    service = build_service(args)
    forward = service.batcher.forward
    body = {"query": "do goldfish grow", "texts": TEXTS[:4]}
    with TestClient(create_app(service)) as client:
        service.batcher.forward = lambda rows: time.sleep(1.0) or forward(rows)
        slow = client.post("/rerank", json=body)
        assert slow.status_code == 503 and "--timeout" in slow.json()["error"] and slow.headers["retry-after"]
        time.sleep(1.0)  # the worker finishes the slow forward

        def broken(rows):
            raise RuntimeError("out of memory")

        service.batcher.forward = broken
        failed = client.post("/v1/rerank", json={"query": "q", "documents": TEXTS[:2]})
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]
        service.batcher.forward = forward
        assert client.post("/rerank", json=body).status_code == 200


def test_a_mixencoders_query_and_candidate_limits_are_checked_as_in_rerank(tmp_path):
    """The server's rows follow the scorer's PairLimits (issue 23: no silent cut): a MixEncoder's query over its
    max_query_length is refused (never cut), a candidate over its max_candidate_length is cut and counted, or
    refused with truncate=false; the same query passes for rerank's own check at the limit."""
    from transformers import AutoConfig

    from sparse_ce.rank import load_tokenizer
    from sparse_ce.rank.limits import PairLimits
    from sparse_ce.serve.encoding import PairEncoder
    from sparse_ce.serve.schemas import RequestError, RerankRequest

    folder = make_mixencoder_folder(tmp_path / "mix")
    tokenizer = load_tokenizer(str(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    encoder = PairEncoder(tokenizer, PairLimits.of(config, tokenizer))
    fits = " ".join(["flea"] * (config.max_query_length - 2))  # [CLS] q [SEP] exactly at the limit
    rows, cut, _ = encoder.encode(RerankRequest(query=fits, texts=["the flea life cycle"]))
    assert len(rows) == 1 and cut == 0
    with pytest.raises(RequestError) as refused:
        encoder.encode(RerankRequest(query=fits + " flea", texts=["the flea life cycle"]))
    assert refused.value.status == 422 and "max_query_length" in refused.value.message
    long_text = " ".join(["cat"] * config.max_candidate_length)
    rows, cut, _ = encoder.encode(RerankRequest(query="do fleas", texts=[long_text], truncate=True))
    query_tokens = len(tokenizer("do fleas", add_special_tokens=False)["input_ids"])
    assert cut == 1 and len(rows[0].input_ids) - 3 - query_tokens == config.max_candidate_length - 2  # cut to the cap
    with pytest.raises(RequestError) as too_long:
        encoder.encode(RerankRequest(query="do fleas", texts=[long_text], truncate=False))
    assert too_long.value.status == 413
