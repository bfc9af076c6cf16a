"""Dev-set evaluation during training: graded nDCG@10 over the full candidate depth, and a learning curve.

A re-ranker is judged on the whole first-stage depth (Schlatt et al., ECIR 2024 re-rank the BM25 top-100), and a
model that orders the top-15 well can still lift poor candidates from deep ranks into its top-10. So the held-out
judged DL21 queries (:func:`.pool.dev_split`) are re-ranked at several depths of their BM25 run, nDCG@10 is computed
by ir_measures on the graded judgements, and every evaluation is appended to ``learning_curve.jsonl`` with the step
and the training wall-clock seconds so far.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ir_measures
import torch
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from ..data import FirstStage, read_qrels
from ..rank import PairScorer

logger = logging.getLogger(__name__)


class DevRerankingEvaluator(BaseEvaluator):
    """Re-rank the dev queries' first stage with the model under training; nDCG@10 at each of ``depths``.

    Args:
        first_stage: The dev queries and their candidates in first-stage order (deep enough for ``max(depths)``).
        qrels: Judgements of the dev queries (TREC qrels file or a list of ir_measures qrels).
        depths: Re-ranking depths to report; the primary metric is nDCG@10 at the deepest.
        curve: ``learning_curve.jsonl`` to append to (``None``: no file).
        max_length: Tokens per (query, document) row.
        name: Metric prefix.
        autocast: Score under ``torch.autocast`` with this dtype (the training's mixed precision), or not at all.
    """

    def __init__(
        self, first_stage: FirstStage, qrels, depths: tuple[int, ...] = (15, 100), curve: str | Path | None = None,
        max_length: int = 256, name: str = "dev", autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.first_stage = first_stage
        qids = set(first_stage.candidates)
        all_qrels = read_qrels(qrels) if isinstance(qrels, (str, Path)) else list(qrels)
        self.qrels = [q for q in all_qrels if q.query_id in qids]
        self.depths = tuple(sorted(depths))
        self.curve = Path(curve) if curve else None
        self.max_length = max_length
        self.name = name
        self.autocast = autocast
        self.primary_metric = f"{name}_ndcg@10_top{self.depths[-1]}"
        self.started = time.perf_counter()
        self.eval_seconds = 0.0
        self.offset = 0.0  # training seconds of earlier sittings of a resumed run
        self.last: dict[str, float] = {}
        self.last_step: int | None = None

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        start = time.perf_counter()
        stage = self.first_stage
        qids, queries, docs = stage.pairs()
        scorer = PairScorer(model.model, tokenizer=model.tokenizer, max_length=self.max_length, progress=False)
        with torch.autocast(model.model.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            scores, stats = scorer.score(queries, docs, qids)
        ranking = stage.ranking(scores)
        metrics = {}
        for depth in self.depths:
            run = {qid: dict(hits[:depth]) for qid, hits in ranking.items()}
            value = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], self.qrels, run)[ir_measures.nDCG @ 10]
            metrics[f"{self.name}_ndcg@10_top{depth}"] = float(value)
        train_seconds = self.train_seconds(start)
        self.eval_seconds += time.perf_counter() - start
        record = {"step": steps, "epoch": epoch, "train_seconds": round(max(train_seconds, 0.0), 1),
                  "eval_seconds": round(time.perf_counter() - start, 1), "cut_documents": stats.truncated, **metrics}
        logger.info("dev evaluation: %s", record)
        if self.curve is not None:
            self.curve.parent.mkdir(parents=True, exist_ok=True)
            with self.curve.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        self.last, self.last_step = dict(metrics), steps  # a copy: the trainer renames the keys it is given
        return metrics

    def train_seconds(self, now: float) -> float:
        """Wall-clock seconds since :attr:`started`, evaluations excluded, plus :attr:`offset`: the training budget
        spent so far."""
        return self.offset + now - self.started - self.eval_seconds
