"""``sparse-ce bench``: the efficiency protocol of Schlatt et al., ECIR 2024 (Table 3, Figure 2b), whole forward.

Randomly initialised MiniLM-L6 shape (6 layers, hidden 384, 12 heads, FFN 1536), query length 10, one query per
forward with 100 documents of total length 164 (the passage setting) or one document of each sweep length (64 to
4,096 tokens). Every system is timed over its WHOLE forward (embeddings, packing and padding included; the original
code excluded them for its own model only). Systems: Hugging Face BERT with full attention (``sdpa``, ``eager``);
this package's ``full``, ``longformer`` (w=64) and ``sparse`` (w=4, w=64) presets on each available backend
(``dense`` for full attention, PyTorch ``windowed``, the fused ``kernel`` on CPU or CUDA, FlexAttention compiled
``flex`` and uncompiled ``flex-eager``, and ``auto``, whatever it picks on the device); and the floor (this model
with attention removed: each token's attention output is its value vector).

Timing: median of ``repeats`` forwards after warm-up, systems interleaved round-robin in one process, so machine
drift hits all alike. Memory: on CPU the peak resident-memory growth of one forward, sampled in a fresh subprocess per
system (settings in ascending size, ``malloc_trim`` before each); on CUDA the peak allocated bytes above those held
before the forward. Ratios are to full attention (``bert-sdpa``) and to the floor, from the same run.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

QUERY_LEN = 10
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
CLS, SEP = 101, 102


@dataclass(frozen=True)
class System:
    """A benchmarked model: ``kind`` bert (Hugging Face), sparse (this package) or floor."""

    name: str
    kind: str
    attn: str = ""  # bert: sdpa | eager
    preset: str = ""  # sparse: full | longformer | sparse
    window: int | None = None
    backend: str = ""  # sparse: dense | windowed | kernel | flex | flex-eager | auto


def _systems() -> dict[str, System]:
    systems = [System("floor", "floor", preset="sparse", window=4, backend="floor"),
               System("bert-sdpa", "bert", attn="sdpa"), System("bert-eager", "bert", attn="eager")]
    flex = ("flex", "flex-eager", "auto")
    for preset, window, backends in [("full", None, ("dense", "windowed", "kernel")),
                                     ("longformer", 64, ("windowed", "kernel", *flex)),
                                     ("sparse", 4, ("windowed", "kernel", *flex)),
                                     ("sparse", 64, ("windowed", "kernel", *flex))]:
        label = preset if preset != "sparse" else f"sparse-w{window}"
        systems += [System(f"{label}:{backend}", "sparse", preset=preset, window=window, backend=backend)
                    for backend in backends]
    return {s.name: s for s in systems}


SYSTEMS = _systems()
"""All benchmarkable systems by name."""

DEFAULT_SYSTEMS = ["floor", "bert-sdpa", "bert-eager", "full:dense", "longformer:kernel", "sparse-w4:windowed",
                   "sparse-w4:kernel", "sparse-w4:flex", "sparse-w4:flex-eager", "sparse-w64:kernel"]
DEFAULT_LENGTHS = [64, 128, 256, 512, 1024, 2048, 4096]
PASSAGES = (100, 164)  # documents per forward, total length of each
EAGER_MAX_TOKENS = 1024
"""Eager (materialised) attention is timed up to this row length: beyond it only shows its quadratic cost again."""
STABLE_SPREAD = 0.05
"""Timing stops after ``min_repeats`` rounds once every system's (max - min) / median is at most this."""


def runs_at(system: "System", setting: "Setting") -> bool:
    """Whether ``system`` is measured at ``setting``: materialised attention only up to :data:`EAGER_MAX_TOKENS`
    (BERT eager: tokens per row; uncompiled FlexAttention, which scores all packed tokens against all: per forward)."""
    if system.backend == "flex-eager":
        return setting.docs * setting.total <= EAGER_MAX_TOKENS
    return not (system.attn == "eager" and setting.total > EAGER_MAX_TOKENS)


@dataclass(frozen=True)
class Setting:
    """One input shape: ``docs`` documents of ``total`` tokens each, sharing one query of :data:`QUERY_LEN`."""

    docs: int
    total: int

    @property
    def label(self) -> str:
        return f"{self.docs}x{self.total}"


def kernel_available(device: torch.device) -> bool:
    """Whether a sparse-attention kernel loads for ``device`` (``SPARSE_CE_KERNEL``, or the built-in CPU op)."""
    from modeling_sparse_ce import SparseCrossEncoderConfig
    from modeling_sparse_ce.attention_kernel import find_kernel

    return find_kernel(SparseCrossEncoderConfig(), device) is not None


def build(system: System, max_len: int, device: torch.device, dtype: torch.dtype, shape: dict | None = None):
    """The model of ``system`` (random weights, seed 0) and the keyword arguments of its forward."""
    from transformers import BertConfig, BertForSequenceClassification

    from modeling_sparse_ce import SparseCrossEncoderConfig, SparseCrossEncoderForSequenceClassification
    from modeling_sparse_ce.attention import ATTENTION_FUNCTIONS, register_attention_backend

    torch.manual_seed(0)
    fields = dict(shape or MINILM, max_position_embeddings=max(max_len, 512), num_labels=1)
    if system.kind == "bert":
        model = BertForSequenceClassification(BertConfig(**fields, attn_implementation=system.attn))
        return model.to(device, dtype).eval(), {}
    if "floor" not in ATTENTION_FUNCTIONS:
        register_attention_backend("floor", lambda q, k, v, *args, **kwargs: (v, None))
    config = SparseCrossEncoderConfig.from_preset(system.preset, window=system.window, sep_token_id=SEP, **fields)
    model = SparseCrossEncoderForSequenceClassification(config)
    return model.to(device, dtype).eval(), {"attention_backend": system.backend}


def make_inputs(setting: Setting, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """``[CLS] q [SEP] d [SEP]`` rows of random tokens, one shared query, no padding (all rows equally long)."""
    gen = torch.Generator().manual_seed(seed)
    if setting.total < QUERY_LEN + 4:
        raise ValueError(f"length {setting.total}: at least {QUERY_LEN + 4} tokens (query {QUERY_LEN} plus specials)")
    ids = torch.randint(1000, 29000, (setting.docs, setting.total), generator=gen)
    ids[:, 0], ids[:, 1 + QUERY_LEN] = CLS, SEP
    ids[:, 1 : 1 + QUERY_LEN] = ids[0, 1 : 1 + QUERY_LEN].clone()  # one query shared by all documents
    ids[:, -1] = SEP
    types = torch.zeros_like(ids)
    types[:, 2 + QUERY_LEN :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_systems(systems: list[System], setting: Setting, device: torch.device, dtype: torch.dtype, repeats: int,
                 warmup: int, shape: dict | None = None, min_repeats: int | None = None) -> dict[str, list[float]]:
    """Milliseconds per forward of each system, timed round-robin after ``warmup`` forwards each.

    At most ``repeats`` rounds; with ``min_repeats``, timing stops early once that many rounds are in and every
    system's spread is within :data:`STABLE_SPREAD`. Systems that do not run at this setting (:func:`runs_at`) are
    left out.
    """
    models = {s.name: build(s, setting.total, device, dtype, shape) for s in systems if runs_at(s, setting)}
    batch = make_inputs(setting, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model, kwargs in models.values():
            for _ in range(warmup):
                model(**batch, **kwargs)
        for round_ in range(1, repeats + 1):
            for name, (model, kwargs) in models.items():
                _sync(device)
                start = time.perf_counter()
                model(**batch, **kwargs)
                _sync(device)
                times[name].append(1000 * (time.perf_counter() - start))
            if min_repeats and round_ >= min_repeats and all(_spread(t) <= STABLE_SPREAD for t in times.values()):
                break
    del models
    gc.collect()
    return times


def _spread(times: list[float]) -> float:
    return (max(times) - min(times)) / statistics.median(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(system: System, settings: list[Setting], device: torch.device, dtype: torch.dtype,
                shape: dict | None = None) -> dict[str, float]:
    """Peak memory growth (MB) of one forward per setting (ascending sizes): RSS sampled on CPU, allocator on CUDA."""
    result = {}
    libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" and platform.system() == "Linux" else None
    for setting in sorted(settings, key=lambda s: s.docs * s.total):
        if not runs_at(system, setting):
            continue
        model, kwargs = build(system, setting.total, device, dtype, shape)
        batch = make_inputs(setting, device)
        with torch.inference_mode():
            model(**batch, **kwargs)  # first-call allocations (thread pools, caches) are not the forward's
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model(**batch, **kwargs)
                torch.cuda.synchronize(device)
                result[setting.label] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                if libc is not None:
                    libc.malloc_trim(0)  # hand freed heap back so RSS starts at what is in use
                before = _rss_mb()
                peak = [before]
                done = threading.Event()

                def sample(peak=peak, done=done) -> None:
                    while not done.is_set():
                        peak[0] = max(peak[0], _rss_mb())
                        time.sleep(0.0005)

                sampler = threading.Thread(target=sample)
                sampler.start()
                model(**batch, **kwargs)
                done.set()
                sampler.join()
                result[setting.label] = max(peak[0], _rss_mb()) - before
        del model, batch
        gc.collect()
    return result


def memory_in_subprocess(system: System, settings: list[Setting], device: torch.device, dtype: torch.dtype,
                         threads: int, shape: dict | None) -> dict[str, float]:
    """:func:`peak_memory` in a fresh Python process (CPU: RSS of this process would include the other systems)."""
    job = {"system": system.name, "settings": [asdict(s) for s in settings], "device": str(device),
           "dtype": str(dtype).removeprefix("torch."), "threads": threads, "shape": shape}
    code = "import sys; from sparse_ce.bench.measure import _memory_job; _memory_job(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {system.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_job(text: str) -> None:
    job = json.loads(text)
    torch.set_num_threads(job["threads"])
    settings = [Setting(**s) for s in job["settings"]]
    result = peak_memory(SYSTEMS[job["system"]], settings, torch.device(job["device"]), getattr(torch, job["dtype"]),
                         job["shape"])
    print(json.dumps(result))


def environment(device: torch.device, threads: int) -> dict[str, str]:
    """Device and versions, recorded with every result."""
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": str(threads)}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = f"{_cpu_name()} ({os.cpu_count()} cores visible)"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
