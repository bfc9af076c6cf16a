"""Scoring a first stage, its queries sharded over the processes of ``torchrun`` / ``accelerate launch``.

Re-ranking is embarrassingly parallel by query (Schlatt et al., ECIR 2024 re-rank each query's BM25 top-100 on its
own), and a query's candidates belong in one forward so that the sparse model computes the query once. So process
``r`` of ``n`` scores queries ``r, r + n, ...``; the scores are gathered (gloo, CPU or GPU alike) and the main
process gets them in the first stage's pair order. A single process just scores everything.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields

from ..data import FirstStage
from .scoring import PairScorer, ScoringStats


@dataclass
class ScoredFirstStage:
    """Scores in :meth:`FirstStage.pairs` order (``None`` on processes other than the main one), what happened to
    the documents (summed over processes), and the wall-clock seconds of scoring (the slowest process)."""

    scores: list[float] | None
    stats: ScoringStats
    seconds: float
    processes: int

    @property
    def pairs_per_second(self) -> float:
        return self.stats.pairs / max(self.seconds, 1e-9)


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process; joins a gloo process group when launched by torchrun or accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def score_first_stage(scorer: PairScorer, first_stage: FirstStage, sharded: bool = True) -> ScoredFirstStage:
    """Score every (query, candidate) pair of ``first_stage``, sharded by query over the launched processes
    (``sharded=False``: all in this process, for callers that run on one process of a launch only)."""
    rank, world = process_group() if sharded else (0, 1)
    qids = list(first_stage.candidates)[rank::world]
    mine = FirstStage({q: first_stage.queries[q] for q in qids}, {q: first_stage.candidates[q] for q in qids})
    start = time.perf_counter()
    pair_qids, queries, documents = mine.pairs()
    scores, stats = scorer.score(queries, documents, pair_qids) if pair_qids else ([], ScoringStats(0, 0, 0, 0, scorer.maxp))
    seconds = time.perf_counter() - start
    if world == 1:
        return ScoredFirstStage(scores, stats, seconds, 1)
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, (qids, scores, stats, seconds))
    total = ScoringStats(*(sum(getattr(s, f.name) for _, _, s, _ in gathered) for f in fields(ScoringStats)
                           if f.name != "maxp"), maxp=scorer.maxp)
    slowest = max(sec for *_, sec in gathered)
    if rank != 0:
        return ScoredFirstStage(None, total, slowest, world)
    by_query: dict[str, list[float]] = {}
    for shard_qids, shard_scores, _, _ in gathered:
        left = iter(shard_scores)
        for qid in shard_qids:
            by_query[qid] = [next(left) for _ in first_stage.candidates[qid]]
    ordered = [score for qid in first_stage.candidates for score in by_query[qid]]
    return ScoredFirstStage(ordered, total, slowest, world)
