"""The trainer pieces of ``train_st.py``: checkpoints written by the main process only, a wall-clock budget, and a
count of the training pairs the tokenizer cuts.

sentence-transformers' ``CrossEncoderTrainer`` runs the training (Schlatt et al., ECIR 2024 fine-tune every pattern
the same way); these extend it without a hand-written loop.
"""

from __future__ import annotations

import logging
import re

import torch
from datasets import DatasetDict
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


NEW_PARTS = re.compile(r"(^|\.)(context|interaction|classifier)\.")
"""Parameter names of a MixEncoder's parts that a BERT checkpoint lacks (context compressor, interaction layers, head)."""


class MainProcessTrainer(CrossEncoderTrainer):
    """``CrossEncoderTrainer`` whose checkpoints only the main process writes. transformers 5.2x checks
    ``should_save`` inside ``Trainer._save``, which sentence-transformers overrides without that check, so under
    torchrun every process wrote the same checkpoint folder (one read another's half-written ``config.json``).

    Args:
        new_parts_lr: Learning rate of the parameters :data:`NEW_PARTS` names (``None``: the one learning rate);
            zero-initialised blends move by about one learning rate per step, so at 2e-5 they stay near zero.
    """

    def __init__(self, *args, new_parts_lr: float | None = None, **kwargs) -> None:
        self.new_parts_lr = new_parts_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.new_parts_lr is None:
            return optimizer
        names = {id(p): name for name, p in self.model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            new = [p for p in group["params"] if NEW_PARTS.search(names.get(id(p), ""))]
            rest = [p for p in group["params"] if not NEW_PARTS.search(names.get(id(p), ""))]
            groups += [{**group, "params": rest}] if rest else []
            groups += [{**group, "params": new, "lr": self.new_parts_lr}] if new else []
        if not any(g["lr"] == self.new_parts_lr for g in groups):
            raise ValueError("--new-parts-lr: the model has no context/interaction/classifier parameters to give it")
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        logger.info("learning rate %.2g for %d new-part tensors", self.new_parts_lr,
                    sum(len(g["params"]) for g in groups if g["lr"] == self.new_parts_lr))
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            super()._save(output_dir, state_dict=state_dict)


class TimeBudget(TrainerCallback):
    """Stops training once ``seconds`` of training wall-clock (the dev evaluator's clock) are spent."""

    def __init__(self, seconds: float, clock) -> None:
        self.seconds, self.clock = seconds, clock

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() >= self.seconds:
            logger.info("time budget of %.0f s spent at step %d", self.seconds, state.global_step)
            control.should_training_stop = control.should_evaluate = control.should_save = True
        return control


def cut_documents(model: CrossEncoder, dataset) -> int:
    """Distinct (query, document) pairs of the training set longer than the model's max_length: the trainer's
    tokenizer cuts them (longest first, so the document)."""
    if isinstance(dataset, DatasetDict):
        return sum(cut_documents(model, part) for part in dataset.values())
    columns = dataset.column_names[1:] if "label" not in dataset.column_names[-1] else dataset.column_names[1:-1]
    pairs = set()
    for row in dataset:
        for column in columns:
            docs = row[column] if isinstance(row[column], list) else [row[column]]
            pairs.update((row["query"], doc) for doc in docs)
    queries, docs = zip(*pairs) if pairs else ((), ())
    lengths = model.tokenizer(list(queries), list(docs))["input_ids"] if pairs else []
    return sum(len(ids) > model.max_seq_length for ids in lengths)
