"""``sparse-ce analyze svd``: how aligned each head's query-key matrix is, and whether aligned heads are matching heads.

"Understanding Matching Mechanisms in Cross-Encoders" (arXiv 2507.14604), Section 5: a head's attention logit between
token states x and y is ``x W_Q W_Kᵀ yᵀ`` (per head, ``W_Q, W_K: [hidden, head_dim]``); with the SVD
``W_Q W_Kᵀ = Σ σₖ uₖ vₖᵀ`` the alignment ``Σ σₖ (uₖ·vₖ) / Σ σₖ`` is near 1 when a head matches a token with tokens
that look like it (the same directions on both sides), as a lexical or semantic matching head does. Biases are left
out (they add per-token terms, not a matching of x with y).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from scipy import stats

from .report import svd_scatter

logger = logging.getLogger(__name__)


def head_alignment(w_q: torch.Tensor, w_k: torch.Tensor, num_heads: int) -> list[float]:
    """Alignment of every head of one layer from ``nn.Linear`` weights ``[hidden, hidden]`` (out x in)."""
    dim = w_q.shape[0] // num_heads
    scores = []
    for h in range(num_heads):
        q = w_q[h * dim : (h + 1) * dim].double()  # [head_dim, hidden]: q_h = x q^T
        k = w_k[h * dim : (h + 1) * dim].double()
        u, s, vh = torch.linalg.svd(q.T @ k)  # [hidden, hidden] of rank head_dim
        u, s, v = u[:, :dim], s[:dim], vh[:dim].T
        scores.append(float((s * (u * v).sum(0)).sum() / s.sum()))
    return scores


def layer_weights(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W_Q, W_K) of every layer of a BERT-named model (``encoder.layer.N.attention.self.query/key``)."""
    encoder = model.base_model.encoder
    return [(layer.attention.self.query.weight.detach(), layer.attention.self.key.weight.detach()) for layer in encoder.layer]


def run_svd(model, output_dir: Path, heads_file: Path | None = None) -> dict:
    """Alignment per head; with ``heads.json`` its Spearman/Pearson correlation with each direction's matching score."""
    num_heads = model.config.num_attention_heads
    alignment = [head_alignment(w_q, w_k, num_heads) for w_q, w_k in layer_weights(model)]
    result = {"alignment": alignment, "correlation": {}}
    output_dir.mkdir(parents=True, exist_ok=True)
    if heads_file is not None:
        heads = json.loads(Path(heads_file).read_text())
        flat = [a for row in alignment for a in row]
        panels = []
        for direction, by_stat in heads["difference"].items():
            score = [v for row in by_stat["max"] for v in row]
            if len(score) != len(flat):
                raise ValueError(f"heads: {heads_file} has {len(score)} heads, the model {len(flat)}")
            constant = len(set(score)) == 1
            rho = float("nan") if constant else float(stats.spearmanr(flat, score).statistic)
            r = float("nan") if constant else float(stats.pearsonr(flat, score).statistic)
            result["correlation"][direction] = {"spearman": rho, "pearson": r, "constant_score": constant}
            panels.append((direction, flat, score, rho))
        svd_scatter(panels, output_dir / "svd.png")
    (output_dir / "svd.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.info("svd: alignment of %d heads; results in %s", sum(map(len, alignment)), output_dir)
    return result
