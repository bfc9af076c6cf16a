"""``sparse-ce serve-bench``: load-test ``sparse-ce serve`` on 127.0.0.1 with DL19 queries and their BM25 top-100.

Protocol: every request is one DL19 query with its 100 BM25 passages (TEI ``/rerank``, ``raw_scores=true``,
``truncate=true``: passages are cut to the model's length, as ``CrossEncoder.predict`` cuts them). The
baseline answers the same requests one by one with sentence-transformers' ``CrossEncoder.predict`` in this process,
on a plain BERT holding the same weights (what one would serve without this package), in the same dtype and thread
count. Then a server process is started (``--stop-after``: it always ends) and loaded at each concurrency (1, 4, 16,
64 by default) by as many asynchronous httpx clients, each sending its next request as soon as its last one is
answered; a level sends ``max(--requests, concurrency)`` requests (the first level every query once, for the
reference; by default 43, 32, 32 and 64 requests: 17,100 pairs, DL19's queries in turn), capped at
``--max-requests``. Reported per level: pairs per second over the level's wall time, pairs per CPU second of the
server process (of this process for the baseline: less disturbed by other jobs on the machine) and p50/p95/p99
request latency. Every response is checked: each index exactly once (nothing lost or duplicated), sorted by score
(nothing mis-ordered), and each score within ``--tolerance`` of the same pair's score at the first level (nothing
mixed up between requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import positive_int

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LEVELS = (1, 4, 16, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve-bench`` options to ``parser``."""
    parser.add_argument("--model", default=str(ROOT / "models" / "sparse-ce-minilm-l6-w4"), help="model folder "
                        "(default: the shipped w=4 model)")
    parser.add_argument("--dl-json", default=str(ROOT.parent / "shared" / "data" / "trec-dl" / "bm25_top100_dl19.json"),
                        help="TREC DL JSON first stage (default: ../shared/data/trec-dl/bm25_top100_dl19.json)")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=list(DEFAULT_LEVELS), help="client levels")
    parser.add_argument("--requests", type=positive_int, default=32, help="requests per level: this many, or one per client "
                        "where there are more clients (default: 32)")
    parser.add_argument("--max-requests", type=positive_int, default=200, help="requests per level at most (default: 200)")
    parser.add_argument("--queries", type=positive_int, help="use the first N queries only (a quick check)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="dtype of both (default: "
                        "bfloat16, what --dtype auto picks on CPUs with bfloat16 arithmetic)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads of both (default: the cores this process may use)")
    parser.add_argument("--batch-tokens", type=positive_int, help="the server's --batch-tokens (default: its own)")
    parser.add_argument("--tolerance", type=float, help="largest score difference to concurrency 1 not counted as "
                        "mixed up (default: 1e-3 in float32, 0.5 in bfloat16)")
    parser.add_argument("--no-baseline", action="store_true", help="skip CrossEncoder.predict")
    parser.add_argument("--time-limit", type=float, default=900, help="the server stops after this many seconds")
    parser.add_argument("--output", default="docs/serving/bench.json", help="results JSON (a plot .png beside it)")


def run(args: argparse.Namespace) -> int:
    from ..data import read_dl_json
    from ..errors import check_output, require
    from ..runtime import set_threads

    for module, extra in (("uvicorn", "serve"), ("httpx", "serve"), ("matplotlib", "bench")):
        require(module, extra, "sparse-ce serve-bench")  # before any work, not after the runs
    check_output(args.output, "--output")

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the server (finally below)
    threads = set_threads(args.threads)
    stage = read_dl_json(args.dl_json, limit=args.queries)
    qids, queries, texts = stage.pairs()
    requests: dict[str, tuple[str, list[str]]] = {}
    for qid, query, text in zip(qids, queries, texts):
        requests.setdefault(qid, (query, []))[1].append(text)
    requests = list(requests.values())
    result = {"model": args.model, "dtype": args.dtype, "threads": threads, "requests": len(requests),
              "pairs": sum(len(t) for _, t in requests), "machine": _machine(), "levels": []}
    if not args.no_baseline:
        result["baseline"] = baseline(args.model, requests, args.dtype)
        print(_line("CrossEncoder.predict, one by one", result["baseline"]), flush=True)
    tolerance = args.tolerance if args.tolerance is not None else (1e-3 if args.dtype == "float32" else 0.5)
    with server(args, threads) as (url, pid):
        reference = None
        for level in args.concurrency:
            count = min(max(args.requests, level, len(requests) if reference is None else 0), args.max_requests)
            batch = [requests[i % len(requests)] for i in range(count)]
            cpu = _cpu_seconds(pid)
            measured, responses = asyncio.run(load(url, batch, level))
            _add_cpu(measured, _cpu_seconds(pid) - cpu)
            if reference is None:  # the first level's own scores: the reference of every pair
                reference = {(q, t): s for (q, ts), r in zip(batch, responses) for t, s in _by_index(ts, r).items()}
            measured.update(check(batch, responses, reference, tolerance))
            measured["concurrency"] = level
            result["levels"].append(measured)
            print(_line(f"sparse-ce serve, concurrency {level}", measured), flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_suffix(".png"))
    print(table(result))
    print(f"results: {output} and {output.with_suffix('.png')}")
    return 0


def baseline(model: str, requests: list[tuple[str, list[str]]], dtype: str) -> dict:
    """``CrossEncoder.predict`` on a plain BERT twin of ``model``, request by request, in this process."""
    import torch
    from sentence_transformers import CrossEncoder

    from ..bench.rank import plain_bert_copy

    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_bert_copy(model, Path(tmp) / "bert")
        encoder = CrossEncoder(str(plain), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
    encoder.predict([(requests[0][0], t) for t in requests[0][1][:8]], show_progress_bar=False)  # warm-up
    latencies = []
    started, cpu = time.perf_counter(), time.process_time()
    for query, texts in requests:
        begin = time.perf_counter()
        encoder.predict([(query, t) for t in texts], show_progress_bar=False)
        latencies.append(time.perf_counter() - begin)
    summary = _summary(latencies, time.perf_counter() - started, sum(len(t) for _, t in requests))
    return _add_cpu(summary, time.process_time() - cpu)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _add_cpu(summary: dict, seconds: float) -> dict:
    """CPU seconds spent and pairs per CPU second: throughput that other jobs on the machine disturb less."""
    summary["cpu_seconds"] = seconds
    summary["pairs_per_cpu_second"] = summary["pairs"] / seconds if seconds > 0 else float("nan")
    return summary


@contextmanager
def server(args: argparse.Namespace, threads: int):
    """A ``sparse-ce serve`` process on a free 127.0.0.1 port, stopped (SIGTERM, then kill) on exit."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "sparse_ce.cli", "serve", "--model", args.model, "--port", str(port),
               "--dtype", args.dtype, "--threads", str(threads), "--queue-size", "256", "--timeout", "600",
               "--stop-after", str(args.time_limit)]
    if args.batch_tokens:
        command += ["--batch-tokens", str(args.batch_tokens)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server ended ({process.returncode}):\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 300 s")
            time.sleep(0.5)
        httpx.post(f"{url}/rerank", json={"query": "warm up", "texts": ["a passage"] * 8}, timeout=120)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load(url: str, requests: list[tuple[str, list[str]]], concurrency: int) -> tuple[dict, list]:
    """Send ``requests`` from ``concurrency`` clients; their latencies, throughput and the responses in order."""
    import httpx

    responses: list = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    failures: list[str] = []
    next_request = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def worker() -> None:
            for i in next_request:
                query, texts = requests[i]
                begin = time.perf_counter()
                body = {"query": query, "texts": texts, "raw_scores": True, "truncate": True}  # cut as predict cuts
                response = await client.post("/rerank", json=body)
                latencies[i] = time.perf_counter() - begin
                if response.status_code == 200:
                    responses[i] = response.json()
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    answered = sum(len(texts) for (_, texts), response in zip(requests, responses) if response is not None)
    summary = _summary(latencies, wall, answered)  # pairs/s counts answered pairs only
    summary["failed_requests"] = len(failures)
    summary["failures"] = failures[:5]
    return summary, responses


def check(requests: list, responses: list, reference: dict, tolerance: float) -> dict:
    """Counts of refused requests and of lost, duplicated, mis-ordered and mixed-up results (and the largest
    difference to the reference)."""
    lost = duplicated = misordered = mixed = refused = 0
    largest = 0.0
    for (query, texts), response in zip(requests, responses):
        if response is None:  # answered with an error (counted in failed_requests): no results to check
            refused += 1
            continue
        indices = [r["index"] for r in response]
        duplicated += len(indices) - len(set(indices))
        lost += len(set(range(len(texts))) - set(indices))
        scores = [r["score"] for r in response]
        misordered += sum(a < b for a, b in zip(scores, scores[1:]))
        for text, score in _by_index(texts, response).items():
            difference = abs(score - reference[(query, text)])
            largest = max(largest, difference)
            mixed += difference > tolerance
    return {"refused": refused, "lost": lost, "duplicated": duplicated, "misordered": misordered, "mixed": mixed,
            "max_abs_difference": largest, "tolerance": tolerance}


def _by_index(texts: list[str], response: list | None) -> dict:
    """Text -> score of a response (texts within a DL request are distinct passages)."""
    return {texts[r["index"]]: r["score"] for r in response or [] if 0 <= r["index"] < len(texts)}


def _summary(latencies: list[float], wall: float, pairs: int) -> dict:
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]).tolist()
    return {"requests": len(latencies), "pairs": pairs, "seconds": wall, "pairs_per_second": pairs / wall,
            "p50_ms": 1000 * p50, "p95_ms": 1000 * p95, "p99_ms": 1000 * p99}


def _line(name: str, m: dict) -> str:
    return (f"{name}: {m['requests']} requests, {m['pairs']} pairs in {m['seconds']:.1f} s: "
            f"{m['pairs_per_second']:.1f} pairs/s, p50 {m['p50_ms']:.0f} ms, p95 {m['p95_ms']:.0f} ms, "
            f"p99 {m['p99_ms']:.0f} ms")


def table(result: dict) -> str:
    """The load table in Markdown."""
    base = result.get("baseline")
    rows = ["| system | concurrency | requests | pairs | pairs/s | × one by one | pairs per CPU-s | p50 ms | p95 ms | "
            "p99 ms | refused | lost | duplicated | mis-ordered | mixed |", "|---" * 15 + "|"]

    def timing(m: dict) -> str:
        ratio = f"{m['pairs_per_second'] / base['pairs_per_second']:.2f}" if base else ""
        return (f"{m['requests']} | {m['pairs']} | {m['pairs_per_second']:.1f} | {ratio} | "
                f"{m.get('pairs_per_cpu_second', float('nan')):.1f} | {m['p50_ms']:.0f} | {m['p95_ms']:.0f} | "
                f"{m['p99_ms']:.0f}")

    if base:
        rows.append(f"| CrossEncoder.predict, one by one | 1 | {timing(base)} | | | | | |")
    for m in result["levels"]:
        rows.append(f"| sparse-ce serve | {m['concurrency']} | {timing(m)} | {m['refused']} | {m['lost']} | "
                    f"{m['duplicated']} | {m['misordered']} | {m['mixed']} |")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    """Throughput and latency percentiles by concurrency, the one-by-one baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    x = [m["concurrency"] for m in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [m["pairs_per_second"] for m in levels], "o-", label="sparse-ce serve")
    right.set_yscale("log")
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        right.plot(x, [m[key] for m in levels], "o-", label=f"serve {key[:3]}")
    if "baseline" in result:
        left.axhline(result["baseline"]["pairs_per_second"], color="gray", ls="--",
                     label="CrossEncoder.predict, one by one")
        right.axhline(result["baseline"]["p99_ms"], color="gray", ls="--", label="predict p99")
    for axis, label in ((left, "pairs / s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(x, [str(v) for v in x])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    left.set_ylim(bottom=0)
    fig.suptitle(f"DL19 BM25 top-100 requests, {result['dtype']}, {result['threads']} threads ({result['machine']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
