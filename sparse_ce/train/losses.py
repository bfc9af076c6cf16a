"""Listwise distillation on sentence-transformers' cross-encoder loss API.

The sparse cross-encoder (Schlatt et al., ECIR 2024) computes a query once for all rows of a forward that share it,
so training on one query's list of candidates per forward is cheap. Two losses over such lists:

- :class:`ListwiseDistillationLoss`: ListNet (Cao et al., 2007) with a teacher's scores as the target distribution,
  the cross entropy between ``softmax(scale * teacher)`` and the student's softmax over the list, i.e. the KL
  divergence to the teacher's distribution up to a constant. It weighs the top of the list.
- :class:`ListwiseCorrelationLoss`: ``1 - Pearson correlation`` of student and teacher scores within each list. It
  is free of scale and offset and gives every document of the list a gradient, the clearly irrelevant ones included.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from sentence_transformers.cross_encoder import CrossEncoder
from sentence_transformers.cross_encoder.losses import ListNetLoss
from sentence_transformers.util import batch_to_device


class ListwiseDistillationLoss(ListNetLoss):
    """ListNet against ``softmax(scale * labels)``, each list in one forward pass.

    Args:
        model: The cross-encoder being trained (one logit).
        scale: Inverse temperature of the teacher distribution over the z-scored labels (:mod:`.teacher`).
    """

    def __init__(self, model: CrossEncoder, scale: float = 1.0) -> None:
        # mini_batch_size -1: every pair of the batch in one forward, so rows of one query share its computation
        super().__init__(model, mini_batch_size=-1)
        if scale <= 0:
            raise ValueError(f"scale: expected a number > 0, got {scale}")
        self.scale = scale

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        return super().forward(inputs, [label * self.scale for label in labels], prompt=prompt, task=task)

    def get_config_dict(self) -> dict[str, float]:
        return {**super().get_config_dict(), "scale": self.scale}


class ListwiseCorrelationLoss(nn.Module):
    """``1 - corr(student, teacher)`` per list, averaged over the lists of a batch; every pair in one forward.

    Args:
        model: The cross-encoder being trained (one logit).
    """

    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model
        if model.num_labels != 1:
            raise ValueError(f"{type(self).__name__}: the model must have one output label, not {model.num_labels}")

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        queries, docs_list = inputs
        if [len(d) for d in docs_list] != [len(lab) for lab in labels]:
            raise ValueError("ListwiseCorrelationLoss: each list needs one label per document")
        pairs = [(query, doc) for query, docs in zip(queries, docs_list) for doc in docs]
        tokens = self.model.preprocess(pairs, prompt=prompt, task=task)
        tokens = batch_to_device(tokens, self.model.device)
        logits = self.model(tokens)["scores"].view(-1).float()
        losses, start = [], 0
        for label in labels:
            student = logits[start : start + len(label)]
            start += len(label)
            losses.append(1 - _correlation(student, label.to(student)))
        return torch.stack(losses).mean()

    def get_config_dict(self) -> dict:
        return {}


def _correlation(x: Tensor, y: Tensor, eps: float = 1e-6) -> Tensor:
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm() + eps)
