"""Op benchmark of sparse_ce_kernels (issue 13's protocol) and a small smoke run for compute-sanitizer.

    python kernel_src/scripts/bench_op.py --kernel DIR [--device cuda] [--reps 100]
    compute-sanitizer --tool memcheck python kernel_src/scripts/bench_op.py --kernel DIR --smoke

DIR is a kernel repository folder (``build/<variant>/`` inside, as build_local.py writes). Settings: bf16 (fp32 on
the CPU), 12 heads x head_dim 32, query of 10 tokens, w = 4 with and without cls_doc (flags 51 / 49), on one
document of 512, 2,048 and 4,096 tokens and 100 documents of 164 tokens sharing one query. Each time is the median
of ``--reps`` timings (CUDA events on a GPU) of the forward op and of forward + backward, printed next to the
bandwidth bound: the bytes the op must move (q, k, v, out, lse; backward also dO, dq, dk, dv) over the measured
device-to-device copy bandwidth, and next to PyTorch SDPA on the same rows, dense (FlashAttention on a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, DIM, QUERY = 12, 32, 10
SETTINGS = [(1, 512), (1, 2048), (1, 4096), (100, 164)]  # (documents, tokens of one [CLS] query [SEP] doc [SEP] row)


def load(folder: Path):
    (variant,) = (folder / "build").iterdir()
    spec = importlib.util.spec_from_file_location("sparse_ce_kernels_bench", variant / "__init__.py",
                                                  submodule_search_locations=[str(variant)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def layout(docs: int, row_tokens: int, device):
    """One shared query; each row is [CLS] + query + document (the [SEP]s counted in query and document)."""
    doc_len = row_tokens - 1 - QUERY
    cu_q = torch.tensor([docs, docs + QUERY], device=device)
    cu_d = docs + QUERY + doc_len * torch.arange(docs + 1, device=device)
    return cu_q, cu_d, torch.zeros(docs, dtype=torch.long, device=device)


def timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            return statistics.median(times)
    else:
        def run(fn, reps):
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e6)
            return statistics.median(times)
    return run


def copy_bandwidth(device, time_us) -> float:
    """Bytes per microsecond of a device-to-device copy (read + write counted)."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() / time_us(lambda: y.copy_(x), 20)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="one small forward + backward, then exit")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ops = load(args.kernel).ops
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        index = layout(3, 40, device)
        q, k, v, g = (torch.randn(int(index[1][-1]), 2, 40, device=device, dtype=dtype) for _ in range(4))
        out, lse = ops.sparse_attention_fwd(q, k, v, *index, 51, 4, 0.2)
        grads = ops.sparse_attention_bwd(g, q, k, v, out, lse, *index, 51, 4, 0.2)
        print("smoke ok:", all(bool(torch.isfinite(x.float()).all()) for x in (out, lse, *grads)))
        return
    time_us = timer(device)
    bandwidth = copy_bandwidth(device, time_us)
    size = torch.finfo(dtype).bits // 8
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{HEADS} x {DIM}, copy bandwidth {bandwidth / 1e3:.2f} GB/ms; times in us (median of {args.reps})")
    print("| docs x tokens | flags | fwd | fwd bound | fwd+bwd | fwd+bwd bound | SDPA fwd | SDPA fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for docs, row_tokens in SETTINGS:
        index = layout(docs, row_tokens, device)
        T = int(index[1][-1])
        q, k, v, g = (torch.randn(T, HEADS, DIM, device=device, dtype=dtype) for _ in range(4))
        dense = [torch.randn(docs, HEADS, row_tokens, DIM, device=device, dtype=dtype, requires_grad=True)
                 for _ in range(3)]

        def sdpa_fwd():
            return F.scaled_dot_product_attention(*dense)

        def sdpa_step():
            sdpa_fwd().backward(torch.ones_like(dense[0]))

        sdpa = [time_us(fn, args.reps) for fn in (sdpa_fwd, sdpa_step)]
        for flags in (51, 49):
            def fwd():
                return ops.sparse_attention_fwd(q, k, v, *index, flags, 4, DIM**-0.5)

            def step():
                out, lse = fwd()
                return ops.sparse_attention_bwd(g, q, k, v, out, lse, *index, flags, 4, DIM**-0.5)

            fwd(), step()  # warm-up
            elems = T * HEADS * DIM
            fwd_bytes = 4 * elems * size + T * HEADS * 4
            step_bytes = fwd_bytes + 8 * elems * size + T * HEADS * 4  # + read q, k, v, out, dO, lse; write dq, dk, dv
            print(f"| {docs} x {row_tokens} | {flags} | {time_us(fwd, args.reps):.1f} | {fwd_bytes / bandwidth:.1f} | "
                  f"{time_us(step, args.reps):.1f} | {step_bytes / bandwidth:.1f} | {sdpa[0]:.1f} | {sdpa[1]:.1f} |")


if __name__ == "__main__":
    main()
