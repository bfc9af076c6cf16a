"""``sparse-ce bench``: time and memory of every attention path, as Table 3 / Figure 2b of Schlatt et al., ECIR 2024.

See :mod:`sparse_ce.bench.measure` for the protocol. This command runs the default set (about ten minutes on a
2-core CPU), writes ``results.json``, ``results.md`` (tables, ratios, the CPU targets) and ``figure.png`` (log-log time
and memory against length), and prints the Markdown. ``--smoke`` is a seconds-long run of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from ..cli import UsageError
from ..errors import check_output
from . import report as bench_report
from .measure import (
    DEFAULT_LENGTHS,
    DEFAULT_SYSTEMS,
    PASSAGES,
    SYSTEMS,
    Setting,
    environment,
    kernel_available,
    memory_in_subprocess,
    peak_memory,
    time_systems,
)

logger = logging.getLogger(__name__)

DEFAULT_RANK_MODEL = Path(__file__).resolve().parents[2] / "models" / "sparse-ce-minilm-l6-w4"
SMOKE_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), help="default: " + " ".join(DEFAULT_SYSTEMS))
    parser.add_argument("--lengths", nargs="+", type=int, help="sweep: one document of each total length "
                        f"(default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--passages", default=f"{PASSAGES[0]}x{PASSAGES[1]}", metavar="DOCSxLENGTH",
                        help="the passage setting: documents per forward x total length (default 100x164; 'none')")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per setting at most (median; default 5)")
    parser.add_argument("--min-repeats", type=int, default=3, help="stop after this many once every system's spread "
                        "is within 5%% (default 3; = --repeats for a fixed count)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, the targets' setting)")
    parser.add_argument("--kernel", help="load the attention kernel from this build folder (SPARSE_CE_KERNEL; default: "
                        "the kernel models use, on CPU the one sparse-ce builds)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--rank-model", default=str(DEFAULT_RANK_MODEL),
                        help="sparse model for the CrossEncoder.rank throughput (default: the shipped model; 'none')")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="offline data (DL19 passages)")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check of the pipeline: tiny model, lengths 32 64, 4x32 passages, 1 repeat")
    from ..precompute import bench as precomputed

    precomputed.add_arguments(parser.add_argument_group("pre-computed candidates (MixEncoder, Table 4 protocol)"))


def run(args: argparse.Namespace) -> int:
    check_output(args.output_dir, "--output-dir", folder=True)
    if args.precomputed:
        from ..precompute import bench as precomputed

        return precomputed.run(args)
    if args.kernel:  # otherwise the built-in CPU kernel (compiled on first use) or a pinned Hub kernel
        os.environ["SPARSE_CE_KERNEL"] = args.kernel  # read by the kernel loader, here and in the memory subprocesses
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    shape = SMOKE_SHAPE if args.smoke else None
    lengths = args.lengths or ([32, 64] if args.smoke else DEFAULT_LENGTHS)
    passages = None if args.passages == "none" else _parse_passages("4x32" if args.smoke else args.passages)
    repeats, warmup = (1, 0) if args.smoke else (args.repeats, args.warmup)
    names = args.systems or (["floor", "bert-sdpa", "sparse-w4:windowed"] if args.smoke else DEFAULT_SYSTEMS)
    has_kernel = kernel_available(device)
    systems = [SYSTEMS[n] for n in names if SYSTEMS[n].backend != "kernel" or has_kernel]
    skipped = [n for n in names if SYSTEMS[n] not in systems]
    if skipped:
        logger.warning("no attention kernel for %s: skipping %s", device, ", ".join(skipped))

    start = time.perf_counter()
    settings = [Setting(1, n) for n in lengths] + ([passages] if passages else [])
    timings, rounds = {}, {}
    for setting in settings:
        logger.info("timing %s tokens x %d documents", setting.total, setting.docs)
        times = time_systems(systems, setting, device, dtype, repeats, warmup, shape, min_repeats=args.min_repeats)
        timings[setting.label] = {name: statistics.median(t) for name, t in times.items()}
        rounds[setting.label] = len(next(iter(times.values())))
    memory = {}
    if not args.no_memory:
        for system in systems:
            logger.info("memory of %s", system.name)
            if device.type == "cuda":
                memory[system.name] = peak_memory(system, settings, device, dtype, shape)
            else:
                memory[system.name] = memory_in_subprocess(system, settings, device, dtype, args.threads, shape)
    rank = None
    if args.rank_model != "none" and not args.smoke:
        rank = _rank(args, device)
    results = {
        "environment": environment(device, args.threads), "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats, "rounds": rounds, "warmup": warmup, "systems": [s.name for s in systems],
        "skipped": skipped,
        "settings": [s.label for s in settings], "passages": passages.label if passages else None,
        "ms": timings, "mb": memory, "rank": rank, "seconds": round(time.perf_counter() - start, 1),
        "command": "sparse-ce bench " + " ".join(_argv(args)), "smoke": args.smoke,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = bench_report.markdown(results)
    (args.output_dir / "results.md").write_text(table + "\n")
    figure = bench_report.plot(results, args.output_dir / "figure.png")
    print(table)
    print(f"\nresults.json, results.md{', figure.png' if figure else ''} in {args.output_dir} "
          f"({results['seconds']:.0f} s)")
    return 0


def _parse_passages(text: str) -> Setting:
    docs, sep, total = text.partition("x")
    if not sep or not docs.isdigit() or not total.isdigit():
        raise UsageError(f"--passages: expected DOCSxLENGTH such as 100x164, got {text!r}")
    return Setting(int(docs), int(total))


def _rank(args: argparse.Namespace, device: torch.device) -> dict | None:
    from .rank import dl19_passages, rank_throughput

    if not Path(args.rank_model, "config.json").is_file():
        logger.warning("--rank-model %s: no model folder; skipping the CrossEncoder.rank throughput", args.rank_model)
        return None
    try:
        query, passages, source = dl19_passages(args.data)
    except FileNotFoundError as error:
        logger.warning("no DL19 passages (%s); skipping the CrossEncoder.rank throughput", error)
        return None
    logger.info("CrossEncoder.rank throughput on %s", source)
    systems = rank_throughput(args.rank_model, query, passages, args.repeats, device=str(device))
    return {"source": source, "model": str(args.rank_model), "passages": len(passages), "systems": systems}


def _argv(args: argparse.Namespace) -> list[str]:
    parts = []
    for flag in ("systems", "lengths"):
        if getattr(args, flag):
            parts += [f"--{flag}", *map(str, getattr(args, flag))]
    for flag in () if args.smoke else ("passages", "repeats", "warmup", "device", "dtype", "threads"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", str(value)]
    if args.smoke:
        parts.append("--smoke")
    return parts
