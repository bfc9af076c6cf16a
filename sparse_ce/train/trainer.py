"""The trainer pieces of ``train_st.py``: checkpoints written by the main process only, a wall-clock budget, and a
count of the training pairs the tokenizer cuts.

sentence-transformers' ``CrossEncoderTrainer`` runs the training (Schlatt et al., ECIR 2024 fine-tune every pattern
the same way); these extend it without a hand-written loop.
"""

from __future__ import annotations

import logging

from datasets import DatasetDict
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class MainProcessTrainer(CrossEncoderTrainer):
    """``CrossEncoderTrainer`` whose checkpoints only the main process writes. transformers 5.2x checks
    ``should_save`` inside ``Trainer._save``, which sentence-transformers overrides without that check, so under
    torchrun every process wrote the same checkpoint folder (one read another's half-written ``config.json``)."""

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
