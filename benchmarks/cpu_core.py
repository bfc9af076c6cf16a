"""CPU timing and peak memory of the attention backends (Schlatt et al., ECIR 2024, Table 3 protocol, whole forward).

Model: randomly initialised MiniLM-L6 shape (6 layers, hidden 384, 12 heads, FFN 1536), fp32, eval, inference mode,
query length 10. Rows: one document of the given total length per forward. Systems: Hugging Face BERT (SDPA), this
package's ``windowed`` backend with the sparse pattern (w=4), and the floor (the same model with attention removed:
each token's attention output is its value vector). "MB": in a fresh subprocess per configuration, after a warm-up
forward and ``malloc_trim``, the peak resident memory sampled during one forward minus the resident memory before it. Then 1 query x 100 passages: the query computed once vs per passage.

Timing runs the systems round-robin in one process (the machine is shared and noisy: compare within a row).

Usage: python benchmarks/cpu_core.py [--threads 2] [--lengths 512 2048 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

QUERY_LEN = 10
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)


def build(system: str, max_len: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from modeling_sparse_ce import SparseCrossEncoderConfig, SparseCrossEncoderForSequenceClassification
    from modeling_sparse_ce.attention import register_attention_backend

    torch.manual_seed(0)
    fields = dict(MINILM, max_position_embeddings=max_len, num_labels=1)
    if system == "bert-sdpa":
        return BertForSequenceClassification(BertConfig(**fields, attn_implementation="sdpa")).eval(), {}
    register_attention_backend("floor", lambda q, k, v, *args, **kwargs: (v, None))
    name, _, option = system.partition(":")
    config = SparseCrossEncoderConfig.from_preset("sparse", window=4, sep_token_id=102, **fields)
    if system == "floor":
        return SparseCrossEncoderForSequenceClassification(config).eval(), {"attention_backend": "floor"}
    if option == "unshared":
        config.share_query = False
    backend = "kernel" if name == "kernel" else "windowed"  # kernel: the build named by SPARSE_CE_KERNEL
    return SparseCrossEncoderForSequenceClassification(config).eval(), {"attention_backend": backend}


def inputs(total: int, docs: int, lengths: list[int] | None = None):
    import torch

    gen = torch.Generator().manual_seed(0)
    lengths = lengths or [total] * docs
    seq = max(lengths)
    ids = torch.zeros(docs, seq, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    query = torch.randint(1000, 29000, (QUERY_LEN,), generator=gen)
    for b, length in enumerate(lengths):
        ids[b, :length] = torch.randint(1000, 29000, (length,), generator=gen)
        ids[b, 0], ids[b, 1 : 1 + QUERY_LEN], ids[b, 1 + QUERY_LEN] = 101, query, 102
        ids[b, length - 1] = 102
        types[b, 2 + QUERY_LEN : length] = 1
        mask[b, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def peak_memory(system: str, total: int, docs: int, threads: int, lengths: list[int] | None) -> dict:
    """In a fresh process: peak resident-memory growth (MB) of one forward."""
    import torch

    torch.set_num_threads(threads)
    model, kwargs = build(system, max(total, max(lengths or [0])))
    batch = inputs(total, docs, lengths)
    with torch.inference_mode():
        model(**batch, **kwargs)  # first-call allocations (thread pools, caches) are not the forward's
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so RSS starts at what is in use
        before = _rss_mb()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        model(**batch, **kwargs)
        done.set()
        sampler.join()
    return {"peak_mb": max(peak[0], _rss_mb()) - before}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def interleaved_times(systems: list[str], total: int, docs: int, repeats: int, threads: int, lengths=None) -> dict:
    """Median ms per sequence of each system, timed round-robin in one process so machine drift hits all alike."""
    import torch

    torch.set_num_threads(threads)
    models = {s: build(s, max(total, max(lengths or [0]))) for s in systems}
    batch = inputs(total, docs, lengths)
    times = {s: [] for s in systems}
    with torch.inference_mode():
        for model, kwargs in models.values():
            model(**batch, **kwargs)  # warm-up
        for _ in range(repeats):
            for system, (model, kwargs) in models.items():
                start = time.perf_counter()
                model(**batch, **kwargs)
                times[system].append(time.perf_counter() - start)
    return {s: 1000 * statistics.median(t) / docs for s, t in times.items()}


def in_subprocess(**job) -> dict:
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def passage_lengths(count: int) -> list[int]:
    """Total lengths of 100 realistic passages: 40-164 tokens, query of 10 included (deterministic)."""
    import random

    rng = random.Random(0)
    return [rng.randint(40, 164) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernel", help="also time the fused CPU kernel of this build folder (kernel_src/build_local.py)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel:
        os.environ["SPARSE_CE_KERNEL"] = args.kernel  # read by the model's kernel loader, here and in subprocesses
    if args.job:
        print(json.dumps(peak_memory(**json.loads(args.job))))
        return
    systems = ["floor", "bert-sdpa", "sparse"] + (["kernel"] if args.kernel else [])
    print(f"threads={args.threads} repeats={args.repeats}: median ms per sequence (systems interleaved in one process),")
    print("MB = peak resident-memory growth of one forward in a fresh process\n")
    fast = systems[-1]  # the kernel when given, else the windowed backend
    print("| tokens | " + " | ".join(f"{s} ms | {s} MB" for s in systems) + f" | {fast} / floor | {fast} / sdpa | MB {fast} / floor |")
    print("|---" * (2 * len(systems) + 4) + "|")
    for total in args.lengths:
        ms = interleaved_times(systems, total, 1, args.repeats, args.threads)
        mb = {s: in_subprocess(system=s, total=total, docs=1, threads=args.threads, lengths=None)["peak_mb"] for s in systems}
        cells = " | ".join(f"{ms[s]:.1f} | {mb[s]:.0f}" for s in systems)
        print(f"| {total} | {cells} | {ms[fast] / ms['floor']:.2f} | {ms[fast] / ms['bert-sdpa']:.2f} "
              f"| {mb[fast] / mb['floor']:.2f} |")
    lengths = passage_lengths(100)
    passage_systems = ["sparse:unshared", "sparse", "bert-sdpa", "floor"] + (["kernel"] if args.kernel else [])
    ms = interleaved_times(passage_systems, 0, 100, args.repeats, args.threads, lengths)
    print("\n1 query x 100 passages (total lengths 40-164, right-padded batch), ms per passage:")
    for system in passage_systems:
        print(f"  {system:16s} {ms[system]:.2f}")
    print(f"  query computed once saves {100 * (1 - ms['sparse'] / ms['sparse:unshared']):.0f}% "
          f"(sparse vs sparse:unshared); sparse is {ms['bert-sdpa'] / ms['sparse']:.2f}x faster than bert-sdpa")


if __name__ == "__main__":
    main()
