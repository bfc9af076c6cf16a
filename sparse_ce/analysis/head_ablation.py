"""``sparse-ce analyze ablate --heads``: nDCG@10 with chosen attention heads removed, against random heads.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604) names matching heads by their attention
(``analyze heads``); removing them tests whether the ranking needs them. A removed head's slice of the per-head context
vector (``[tokens, heads * head_dim]``, head-major) is zeroed before the attention output projection
(``attention.output.dense``) by a forward pre-hook, so the head adds nothing to the residual stream but the projection's
bias, whatever attention backend computed the context. The named heads are removed together and scored once; as a
baseline, ``random_draws`` sets of as many heads from the same layers (per layer as many as were named there, never a
named one) are removed and scored each. Scoring and measures are :mod:`.ablate`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.collections import Collection
from ..rank.scoring import PairScorer
from .ablate import base_summary, collection_scorer, measure_variant
from .report import heads_ablation_markdown

logger = logging.getLogger(__name__)

Head = tuple[int, int]


def parse_head(text: str) -> Head:
    """An argparse type: ``LAYER.HEAD`` (0-based), e.g. ``2.9``."""
    import argparse

    layer, dot, head = text.partition(".")
    if not (dot and layer.isdigit() and head.isdigit()):
        raise argparse.ArgumentTypeError(f"expected LAYER.HEAD (0-based, e.g. 2.9), got {text!r}")
    return int(layer), int(head)


def output_projections(model) -> list[torch.nn.Linear]:
    """Each layer's attention output projection (BERT's ``encoder.layer[i].attention.output.dense``)."""
    encoder = getattr(model, "bert", model)
    try:
        return [layer.attention.output.dense for layer in encoder.encoder.layer]
    except AttributeError:
        raise ValueError(f"model: {type(model).__name__} has no BERT attention output projections") from None


def check_heads(heads: list[Head], num_layers: int, num_heads: int) -> None:
    """Refuse a head outside the model or one named twice, naming it (``--heads L.H``)."""
    for layer, head in heads:
        if not 0 <= layer < num_layers:
            raise ValueError(f"--heads {layer}.{head}: layer {layer} is out of range; the model has layers 0-{num_layers - 1}")
        if not 0 <= head < num_heads:
            raise ValueError(f"--heads {layer}.{head}: head {head} is out of range; the model has heads 0-{num_heads - 1}")
    twice = [f"{l}.{h}" for (l, h), n in Counter(heads).items() if n > 1]
    if twice:
        raise ValueError(f"--heads: {', '.join(twice)} named more than once")


@contextlib.contextmanager
def ablated_heads(model, heads: list[Head]):
    """Zero the context vector of ``heads`` (layer, head) before each layer's output projection while inside."""
    config = model.config
    check_heads(heads, config.num_hidden_layers, config.num_attention_heads)
    head_dim = config.hidden_size // config.num_attention_heads
    projections = output_projections(model)
    hooks = []
    try:
        for layer in sorted({l for l, _ in heads}):
            keep = torch.ones(config.hidden_size, dtype=torch.bool)
            for l, h in heads:
                if l == layer:
                    keep[h * head_dim : (h + 1) * head_dim] = False

            def zero(module, args, keep=keep):
                context, *rest = args  # [..., heads * head_dim]
                return (context.masked_fill(~keep.to(context.device), 0), *rest)

            hooks.append(projections[layer].register_forward_pre_hook(zero))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def random_heads(heads: list[Head], num_heads: int, draws: int, seed: int = 0) -> list[list[Head]]:
    """``draws`` random sets of heads: per layer of ``heads`` as many heads as named there, none of them named."""
    rng = random.Random(seed)
    per_layer = Counter(l for l, _ in heads)
    pools = {}
    for layer, count in sorted(per_layer.items()):
        pools[layer] = [h for h in range(num_heads) if (layer, h) not in heads]
        if len(pools[layer]) < count:
            raise ValueError(f"--random-heads: layer {layer} has {len(pools[layer])} heads besides the named ones; "
                             f"{count} needed per draw")
    return [sorted((layer, h) for layer, count in sorted(per_layer.items()) for h in rng.sample(pools[layer], count))
            for _ in range(draws)]


def head_draws(model, heads: list[Head], random_draws: int = 0, seed: int = 0) -> list[list[Head]]:
    """Check ``heads`` against ``model`` (ValueError naming a bad one) and return the random draws."""
    config = model.config
    output_projections(model)
    check_heads(heads, config.num_hidden_layers, config.num_attention_heads)
    return random_heads(heads, config.num_attention_heads, random_draws, seed)


def run_head_ablation(scorer: PairScorer, collections: list[Collection], output_dir: Path, heads: list[Head],
                      random_draws: int = 0, seed: int = 0) -> dict:
    """Score the unablated model, ``heads`` removed together and ``random_draws`` random sets; write
    ``heads-ablation.json`` and ``heads-ablation.md``.

    Returns:
        ``unablated`` (:func:`.ablate.base_summary`), ``named`` (``heads`` and the fields of
        :func:`.ablate.measure_variant`; with draws also ``random_at_least_as_damaging``, the draws whose delta is at
        most the named heads', and ``empirical_p`` = (1 + that) / (1 + draws)) and ``random`` (``draws``: one record
        each; ``delta_mean``, ``delta_min``, ``delta_max``).
    """
    model = scorer.model
    config = model.config
    draws = head_draws(model, heads, random_draws, seed)
    score = collection_scorer(scorer, collections)
    started = time.perf_counter()
    base = score()
    records = []
    for removed in tqdm([sorted(heads), *draws], desc="head ablations", unit="variant"):
        with ablated_heads(model, removed):
            result = score()
        records.append({"heads": [f"{l}.{h}" for l, h in removed], **measure_variant(result, base)})
    named, random_records = records[0], records[1:]
    result = {"unablated": {**base_summary(base, collections), "num_layers": config.num_hidden_layers,
                            "num_heads": config.num_attention_heads},
              "seed": seed, "named": named, "random": {"draws": random_records}}
    if random_records:
        deltas = [r["delta"] for r in random_records]
        damaging = sum(d <= named["delta"] for d in deltas)
        named.update(random_at_least_as_damaging=damaging, empirical_p=(1 + damaging) / (1 + len(deltas)))
        result["random"].update(delta_mean=sum(deltas) / len(deltas), delta_min=min(deltas), delta_max=max(deltas))
    result["seconds"] = time.perf_counter() - started
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "heads-ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    (output_dir / "heads-ablation.md").write_text(heads_ablation_markdown(result) + "\n")
    logger.info("head ablation: %d variants in %.0f s; results in %s", len(records), result["seconds"], output_dir)
    return result
