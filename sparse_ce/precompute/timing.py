"""Where a MixEncoder's query time goes on this machine: the parts timed apart, the interaction layers' arithmetic,
and the GEMM throughput that bounds it.

Wang et al.: "Once is Enough", Table 1 counts the online cost per query as the query encoding plus
``N (k + q + d) d k`` for the interaction; the authors' block (output dense, LayerNorm and feed-forward for E and H,
:mod:`modeling_mixencoder.interaction`) adds ``~2 d I`` per context row and per H. On a GPU those ``N`` small products
cost little next to the query encoding's fixed overheads; on a CPU they are plain GEMM work, so the floor of the
interaction is its multiply-adds divided by what this machine's GEMMs sustain.
"""

from __future__ import annotations

import statistics
import time

import torch


def spread(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles (``q1``, ``q3``) of per-query times, in seconds."""
    ordered = sorted(seconds)
    if len(ordered) < 2:
        return {"median": ordered[0], "q1": ordered[0], "q3": ordered[0], "n": len(ordered)}
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "n": len(ordered)}


def timed(call, queries: list[str], warmup: int = 1) -> list[float]:
    """Wall time of ``call(query)`` per query, after ``warmup`` untimed calls."""
    for query in queries[:warmup]:
        call(query)
    out = []
    for query in queries:
        start = time.perf_counter()
        call(query)
        out.append(time.perf_counter() - start)
    return out


def interaction_macs(config, query_tokens: int) -> int:
    """Multiply-adds of the interaction layers per candidate (what grows with the number of candidates; the head's
    mean and cosine, O(k d), are left out)."""
    d, k, inner, t = config.hidden_size, config.num_context, config.intermediate_size, query_tokens
    attention = 2 * d * (k * (k + t) + t)  # Eq. 1 scores and sums (k rows over k + t keys), Eq. 2 (one row over t)
    if config.interaction_block == "authors":
        per_layer = k * (4 * d * d + 2 * d * inner) + (5 * d * d + 2 * d * inner)  # E: qkv + dense + FFN; H: Q* + dense + gate + FFN
    else:
        per_layer = k * 4 * d * d + 5 * d * d  # E: qkv + output; H: Q* + output + gate
    return len(config.interaction_layer_indices()) * (per_layer + attention)  # the head's mean and cosine: O(k d)


def gemm_gflops(rows: int, hidden: int, inner: int, repeats: int = 20) -> float:
    """Sustained float32 GFLOP/s of ``[rows, hidden] @ [hidden, inner]`` (the FFN's first product) on this machine."""
    x, w = torch.randn(rows, hidden), torch.randn(hidden, inner)
    for _ in range(3):
        x @ w
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w
    return 2 * rows * hidden * inner * repeats / (time.perf_counter() - start) / 1e9


@torch.inference_mode()
def breakdown(ranker, queries: list[str], docids: list[str]) -> dict:
    """Median seconds of the three parts of :meth:`~.ranker.StoreRanker.score` (query encoding, store read, interaction
    layers + head), the interaction's multiply-adds, and the time those would take at this machine's GEMM rate."""
    model = ranker.model
    parts: dict[str, list[float]] = {"encode_query": [], "read_store": [], "interaction": []}
    tokens = []
    model.score_candidates(ranker.encode_query(queries[0]), ranker.store.get(docids).to(model.device, model.dtype))
    for query in queries:
        start = time.perf_counter()
        states = ranker.encode_query(query)
        encoded = time.perf_counter()
        context = ranker.store.get(docids).to(model.device, model.dtype)
        read = time.perf_counter()
        model.score_candidates(states, context)
        done = time.perf_counter()
        parts["encode_query"].append(encoded - start)
        parts["read_store"].append(read - encoded)
        parts["interaction"].append(done - read)
        tokens.append(int(states.mask.sum()))
    macs = sum(interaction_macs(model.config, t) for t in tokens) / len(tokens) * len(docids)
    rate = gemm_gflops(len(docids) * model.config.num_context, model.config.hidden_size, model.config.intermediate_size)
    return {**{name: statistics.median(values) for name, values in parts.items()},
            "interaction_gflop": 2 * macs / 1e9, "gemm_gflops": rate, "interaction_at_gemm_rate": 2 * macs / 1e9 / rate}
