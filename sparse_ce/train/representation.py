"""Representation distillation: a sparse cross-encoder learns to reproduce its bi-encoder start's embeddings.

Starting a sparse w=4 model from all-MiniLM-L6-v2 with the ``cosine`` head (Schlatt et al., ECIR 2024 fine-tune from
a trained model) loses most of the bi-encoder's quality at once: a document token sees only its window, [CLS] and the
query, so the mean document state is no longer the bi-encoder's document embedding (docs/training.md: 0.334 dev
nDCG@10 at step 0 against the bi-encoder's 0.525). Score distillation gives one number per pair to recover it; this
loss gives the whole embedding: ``1 - cos`` between the model's mean document state and the bi-encoder's document
embedding, plus the same for the query, so the cosine head scores as the bi-encoder again before listwise training
teaches it to use the query (a stage 0 before the paper's fine-tuning).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import torch
from datasets import Dataset
from sentence_transformers.cross_encoder import CrossEncoder
from sentence_transformers.util import batch_to_device
from torch import Tensor, nn

from .pool import TrainingQuery

logger = logging.getLogger(__name__)


def bi_encoder_embeddings(model: str, texts: list[str], cache_dir: Path | None, batch_size: int = 64) -> Tensor:
    """Normalised sentence-transformers embeddings ``[texts, dim]`` of ``model``, cached by a hash of the model's
    name, the content of its files (:func:`~sparse_ce.provenance.model_digest`: new weights in the same folder are a
    new cache entry) and the texts."""
    from ..provenance import model_digest

    digest = hashlib.sha256(f"{model}\0{model_digest(model)}\0".encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    path = cache_dir / f"embeddings-{digest.hexdigest()[:16]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        logger.info("bi-encoder embeddings from cache %s", path)
        return torch.load(path)
    from sentence_transformers import SentenceTransformer

    from .teacher import count_cut

    encoder = SentenceTransformer(model, device="cpu")
    count_cut(encoder, texts, model)  # logged
    vectors = encoder.encode(
        texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=True
    ).float().cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vectors, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return vectors


def representation_dataset(
    pool: Mapping[str, TrainingQuery], bi_encoder: str, pairs_per_query: int, cache_dir: Path | None, seed: int = 0
) -> Dataset:
    """``query, document, label`` rows: pooled pairs, the label the bi-encoder's query and document embeddings
    concatenated (``[2 * dim]``)."""
    rng = random.Random(seed)
    rows = []
    for entry in pool.values():
        docs = list(entry.documents.values())
        rows += [(entry.text, doc) for doc in rng.sample(docs, min(pairs_per_query, len(docs)))]
    texts = sorted({text for pair in rows for text in pair})
    vectors = bi_encoder_embeddings(bi_encoder, texts, cache_dir)
    index = {text: i for i, text in enumerate(texts)}
    labels = [torch.cat([vectors[index[q]], vectors[index[d]]]).tolist() for q, d in rows]
    return Dataset.from_dict({"query": [q for q, _ in rows], "document": [d for _, d in rows], "label": labels}).shuffle(seed=seed)


class RepresentationDistillationLoss(nn.Module):
    """``(1 - cos(mean query state, t_q)) + (1 - cos(mean document state, t_d))``, averaged over the pairs.

    Args:
        model: A sparse cross-encoder (its encoder exposes the packed states and segment layout).
    """

    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model
        if not hasattr(getattr(model.model, "bert", None), "encode"):
            raise ValueError("RepresentationDistillationLoss: needs a sparse cross-encoder (model_type sparse_ce)")

    def forward(self, inputs: list, labels: Tensor | list, prompt: str | None = None, task: str | None = None) -> Tensor:
        pairs = list(zip(inputs[0], inputs[1]))
        tokens = batch_to_device(self.model.preprocess(pairs, prompt=prompt, task=task), self.model.device)
        hidden, layout, _, _ = self.model.model.bert.encode(
            tokens["input_ids"], tokens.get("attention_mask"), tokens.get("token_type_ids")
        )
        query, document = layout.segment_means(hidden)
        if isinstance(labels, (list, tuple)):  # the collator passes list-valued labels as a list of rows
            labels = torch.stack([torch.as_tensor(row) for row in labels])
        target = labels.to(hidden.device).float()
        dim = target.shape[-1] // 2
        loss_q = 1 - torch.cosine_similarity(query.float(), target[:, :dim], dim=-1)
        loss_d = 1 - torch.cosine_similarity(document.float(), target[:, dim:], dim=-1)
        return (loss_q + loss_d).mean()

    def get_config_dict(self) -> dict:
        return {}
