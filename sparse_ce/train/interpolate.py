"""Weight-space interpolation of two checkpoints of one training run (WiSE-FT: Wortsman et al., "Robust fine-tuning
of zero-shot models", CVPR 2022).

The w=4 recipe (docs/training.md) has two stages: stage 0 teaches the sparse model its bi-encoder start's embeddings,
stage 1 distils a listwise teacher from there on 109 training queries. Stage 1 gains on the dev set, and part of what
stage 0 kept can be lost on collections unlike the training queries. Averaging the two stages' weights,
``(1 - alpha) * start + alpha * end``, trades one against the other without training; ``alpha`` is chosen on the dev
set (``experiments/interpolate.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
SKIP = {WEIGHTS, "README.md", "learning_curve.jsonl", "trainer", "runs", "eval"}
SAME_CONFIG = ("model_type", "attention_pattern", "attention_window_size", "cls_query_attention", "cls_doc_attention",
               "query_cls_attention", "query_doc_attention", "doc_cls_attention", "doc_query_attention", "score_head",
               "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (interpolation reads one unsharded safetensors file)")
    return load_file(path)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def interpolate(start: str | Path, end: str | Path, alpha: float, output: str | Path) -> Path:
    """Save ``(1 - alpha) * start + alpha * end`` into ``output`` with ``end``'s configuration, tokenizer, remote code
    and weight dtype; ``training.json`` keeps ``end``'s record and adds an ``interpolation`` entry.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two folders are not the same architecture (config fields,
            weight names or shapes differ; the message names the first difference).
    """
    start, end, output = Path(start), Path(end), Path(output)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolate: alpha must lie in [0, 1], got {alpha}")
    config_a, config_b = _config(start), _config(end)
    for key in SAME_CONFIG:
        if config_a.get(key) != config_b.get(key):
            raise ValueError(f"interpolate: {start} and {end} differ in config {key!r}: "
                             f"{config_a.get(key)!r} vs {config_b.get(key)!r}")
    weights_a, weights_b = _weights(start), _weights(end)
    if weights_a.keys() != weights_b.keys():
        names = sorted(weights_a.keys() ^ weights_b.keys())
        raise ValueError(f"interpolate: {start} and {end} hold different weights, e.g. {names[:3]}")
    mixed = {}
    for name, b in weights_b.items():
        a = weights_a[name]
        if a.shape != b.shape:
            raise ValueError(f"interpolate: {name} has shape {tuple(a.shape)} in {start}, {tuple(b.shape)} in {end}")
        if not b.is_floating_point():
            mixed[name] = b.clone()
            continue
        mixed[name] = ((1.0 - alpha) * a.double() + alpha * b.double()).to(b.dtype).contiguous()

    output.mkdir(parents=True, exist_ok=True)
    for item in end.iterdir():
        if item.is_file() and item.name not in SKIP:
            shutil.copy2(item, output / item.name)
    save_file(mixed, str(output / WEIGHTS), metadata={"format": "pt"})
    record_path = end / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["interpolation"] = {"start": str(start), "end": str(end), "alpha": alpha}
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return output
