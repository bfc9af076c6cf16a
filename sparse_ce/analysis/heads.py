"""``sparse-ce analyze heads``: which heads attend across query and document more for relevant passages.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Section 4: per (layer, head), the attention
mass and the maximum attention from query tokens to document tokens and from document tokens to query tokens, for
relevant passages (grade >= 2), hard negatives (judged 0, retrieved by BM25 for the query) and easy negatives
(passages retrieved for other queries). Heads whose attention is higher for relevant than for easy negatives are
"matching heads" (``ranking``); those that also separate relevant passages from hard negatives, which share the
query's terms, are the paper's "semantic" matching heads (``ranking_hard``, relevant − hard). Query tokens exclude
[CLS] and [SEP]1, document tokens exclude [SEP]2. Weights come from the dense backend (the only one that returns
them), in float32.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_sparse_ce.segments import Segment, build_segment_layout

from ..data.collections import Collection
from .report import heads_heatmap

logger = logging.getLogger(__name__)

CLASSES = ("relevant", "hard", "easy")
DIRECTIONS = {"query attends to document": "query-to-document", "document attends to query": "document-to-query"}
STATS = ("mass", "max")


def sample_pairs(collections: list[Collection], per_class: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(class, query id, query text, passage text) with up to ``per_class`` passages of each class per query."""
    rng = random.Random(seed)
    pairs = []
    for collection in collections:
        grades: dict[str, dict[str, int]] = {}
        for qrel in collection.qrels:
            grades.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
        stage = collection.first_stage
        qids = [q for q in stage.candidates if q in grades]
        for qid in qids:
            judged = grades[qid]
            hits = stage.candidates[qid]
            relevant = [c.text for c in hits if judged.get(c.docid, -1) >= 2]
            hard = [c.text for c in hits if judged.get(c.docid, -1) == 0]
            others = [c for q in qids if q != qid for c in stage.candidates[q] if c.docid not in judged]
            easy = [c.text for c in rng.sample(others, min(per_class, len(others)))]
            for name, texts in (("relevant", relevant), ("hard", hard), ("easy", easy)):
                for text in rng.sample(texts, min(per_class, len(texts))):
                    pairs.append((name, f"{collection.name}/{qid}", stage.queries[qid], text))
    return pairs


def segment_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-token and document-token masks ``[batch, seq]`` of ``[CLS] q [SEP] d [SEP]`` rows (segments as the
    model finds them; [CLS] and the [SEP]s in neither)."""
    segment_ids = build_segment_layout(input_ids, attention_mask, sep_token_id=sep_id, share_query=False).segment_ids
    return segment_ids == Segment.QUERY, segment_ids == Segment.DOC


def head_statistics(weights: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass and max attention from ``rows`` to ``cols`` per row and head, averaged over the rows.

    Args:
        weights: ``[batch, heads, seq, seq]`` attention of one layer.
        rows, cols: ``[batch, seq]`` boolean masks of the attending and the attended tokens.

    Returns:
        ``mass [batch, heads]`` (sum over ``cols``) and ``max [batch, heads]`` (max over ``cols``), means over ``rows``.
    """
    picked = weights.float() * cols[:, None, None, :]
    mass, peak = picked.sum(-1), picked.amax(-1)  # [batch, heads, seq]
    count = rows.sum(-1).clamp(min=1)[:, None]
    return (mass * rows[:, None, :]).sum(-1) / count, (peak * rows[:, None, :]).sum(-1) / count


@torch.inference_mode()
def run_heads(model, tokenizer, pairs: list[tuple[str, str, str, str]], output_dir: Path, max_length: int = 256,
              batch_size: int = 16) -> dict:
    """Average the statistics per class and write ``heads.json`` and per direction two heatmap PNGs (relevant − easy,
    relevant − hard).

    Returns:
        The content of ``heads.json``: ``statistics`` (direction -> mass/max -> class -> layers x heads means),
        ``difference`` / ``difference_hard`` (relevant − easy / − hard of those), ``ranking`` / ``ranking_hard``
        (direction -> heads by relevant − easy / − hard max attention, highest first) and the counts.
    """
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    sums = {d: {s: {c: torch.zeros(layers, heads, dtype=torch.float64) for c in CLASSES} for s in STATS} for d in DIRECTIONS}
    counts = dict.fromkeys(CLASSES, 0)
    forward = {"attention_backend": "dense"} if getattr(config, "model_type", None) == "sparse_ce" else {}
    model.eval()
    for start in tqdm(range(0, len(pairs), batch_size), desc="attention", unit="batch"):
        batch = pairs[start : start + batch_size]
        inputs = tokenizer([p[2] for p in batch], [p[3] for p in batch], padding=True, truncation="only_second",
                           max_length=max_length, return_tensors="pt").to(model.device)
        output = model(**inputs, output_attentions=True, **forward)
        query, doc = segment_masks(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu(), tokenizer.sep_token_id)
        classes = [p[0] for p in batch]
        for layer, weights in enumerate(output.attentions):
            weights = weights.cpu()
            for direction, (rows, cols) in (("query attends to document", (query, doc)),
                                            ("document attends to query", (doc, query))):
                mass, peak = head_statistics(weights, rows, cols)
                for i, name in enumerate(classes):
                    sums[direction]["mass"][name][layer] += mass[i].double()
                    sums[direction]["max"][name][layer] += peak[i].double()
        for name in classes:
            counts[name] += 1
    means = {d: {s: {c: (sums[d][s][c] / max(counts[c], 1)).tolist() for c in CLASSES} for s in STATS} for d in DIRECTIONS}
    result = {"layers": layers, "heads": heads, "pairs": counts, "statistics": means, "difference": {},
              "difference_hard": {}, "ranking": {}, "ranking_hard": {}}
    output_dir.mkdir(parents=True, exist_ok=True)
    for direction, slug in DIRECTIONS.items():
        for key, negative in (("difference", "easy"), ("difference_hard", "hard")):
            result[key][direction] = {stat: (torch.tensor(means[direction][stat]["relevant"])
                                             - torch.tensor(means[direction][stat][negative])).tolist() for stat in STATS}
        rel, hard, easy = (torch.tensor(means[direction]["max"][c]) for c in CLASSES)
        records = [
            {"layer": l, "head": h, "relevant": float(rel[l, h]), "hard": float(hard[l, h]), "easy": float(easy[l, h]),
             "relevant_minus_easy": float(rel[l, h] - easy[l, h]), "relevant_minus_hard": float(rel[l, h] - hard[l, h])}
            for l in range(layers) for h in range(heads)
        ]
        result["ranking"][direction] = sorted(records, key=lambda r: -r["relevant_minus_easy"])
        result["ranking_hard"][direction] = sorted(records, key=lambda r: -r["relevant_minus_hard"])
        for key, negatives, suffix in (("difference", "easy", ""), ("difference_hard", "hard", "-hard")):
            heads_heatmap(result[key][direction]["max"], f"{direction}: max attention, relevant − {negatives} negatives",
                          output_dir / f"heads-{slug}{suffix}.png", "Δ max attention")
    (output_dir / "heads.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.info("heads: %s pairs; results in %s", counts, output_dir)
    return result
