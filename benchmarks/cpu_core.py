"""CPU timing and peak memory of the attention backends (Schlatt et al., ECIR 2024, Table 3 protocol, whole forward).

Model: randomly initialised MiniLM-L6 shape (6 layers, hidden 384, 12 heads, FFN 1536), fp32, eval, inference mode,
query length 10. Rows: one document of the given total length per forward. Systems: Hugging Face BERT (SDPA), this
package's ``windowed`` backend with the sparse pattern (w=4), and the floor (the same model with attention removed:
each token's attention output is its value vector). Every configuration runs in a fresh subprocess; "MB" is the peak
resident-memory growth during one forward. Then 1 query x 100 passages: the query computed once vs per passage.

Usage: python benchmarks/cpu_core.py [--threads 2] [--lengths 512 2048 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
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
    return SparseCrossEncoderForSequenceClassification(config).eval(), {"attention_backend": "windowed"}


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


def measure(system: str, total: int, docs: int, repeats: int, threads: int, lengths: list[int] | None) -> dict:
    """Run in a fresh process: peak memory of the first forward, then the median time of ``repeats`` forwards."""
    import torch

    torch.set_num_threads(threads)
    model, kwargs = build(system, max(total, max(lengths or [0])))
    batch = inputs(total, docs, lengths)
    with torch.inference_mode():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model(**batch, **kwargs)
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch, **kwargs)
            times.append(time.perf_counter() - start)
    return {"ms_per_seq": 1000 * statistics.median(times) / docs, "peak_mb": peak_mb}


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
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(**json.loads(args.job))))
        return
    systems = ["floor", "bert-sdpa", "sparse"]
    print(f"threads={args.threads} repeats={args.repeats} (median ms per sequence, peak MB growth of one forward)\n")
    print("| tokens | " + " | ".join(f"{s} ms | {s} MB" for s in systems) + " | sparse / floor | sparse / sdpa |")
    print("|---" * (2 * len(systems) + 3) + "|")
    for total in args.lengths:
        row = {s: in_subprocess(system=s, total=total, docs=1, repeats=args.repeats, threads=args.threads, lengths=None) for s in systems}
        cells = " | ".join(f"{row[s]['ms_per_seq']:.1f} | {row[s]['peak_mb']:.0f}" for s in systems)
        ratio_floor = row["sparse"]["ms_per_seq"] / row["floor"]["ms_per_seq"]
        ratio_sdpa = row["sparse"]["ms_per_seq"] / row["bert-sdpa"]["ms_per_seq"]
        print(f"| {total} | {cells} | {ratio_floor:.2f} | {ratio_sdpa:.2f} |")
    lengths = passage_lengths(100)
    print("\n1 query x 100 passages (lengths 40-164, right-padded batch), sparse w=4 windowed:")
    for system in ["sparse:unshared", "sparse", "bert-sdpa"]:
        result = in_subprocess(system=system, total=0, docs=100, repeats=args.repeats, threads=args.threads, lengths=lengths)
        print(f"  {system:16s} {result['ms_per_seq']:.2f} ms/seq  peak {result['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
