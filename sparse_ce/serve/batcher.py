"""Batching across requests: a bounded queue of jobs packed into forwards under a token budget by one worker thread.

Each request becomes a :class:`Job` of rows (its query's pairs, longest first). The worker takes rows from the jobs in
arrival order into a forward of at most ``batch_tokens`` padded tokens and ``max_batch_requests`` requests, so one
request may span several forwards and several requests share one (rows of one query stay together, so the sparse
model computes that query once per forward). Scores go back by each row's position in its own request, never by
arrival order. A forward that raises is retried request by request: only the request whose rows fail gets the error.
The queue holds at most ``queue_size`` requests not yet fully sent to a forward; :meth:`Batcher.submit` refuses the
next one (429). :meth:`Batcher.stop` lets the worker finish every admitted job, then ends it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..rank.scoring import Row

logger = logging.getLogger(__name__)

Forward = Callable[[list[Row]], list[float]]
"""Scores (logits) of rows, ``scores[k]`` for ``rows[k]``."""
StoreScore = Callable[[str, list[str]], list[float]]
"""Scores of stored documents by id for a query (``--index``)."""


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests already."""


@dataclass(eq=False)
class Job:
    """One request in the batcher: its rows, store ids and the future its scores go to."""

    query: str
    rows: list[Row]
    size: int
    stored: list[tuple[int, str]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    scores: list[float] = field(default_factory=list)
    taken: int = 0  # rows handed to a forward so far
    left: int = 0  # rows and stored ids not scored yet
    failed: bool = False

    def __post_init__(self) -> None:
        self.scores = [float("nan")] * self.size
        self.left = len(self.rows) + len(self.stored)

    @property
    def dropped(self) -> bool:
        """Failed, timed out or cancelled: its remaining rows are skipped."""
        return self.failed or self.future.cancelled()

    def resolve(self, error: BaseException | None = None) -> None:
        """Hand the scores (or the error) to the request's event loop, once."""
        def settle() -> None:
            if not self.future.done():
                self.future.set_exception(error) if error else self.future.set_result(self.scores)
        self.loop.call_soon_threadsafe(settle)


class Batcher:
    """Queue and worker thread.

    Args:
        forward: Scores rows of one forward (:data:`Forward`).
        batch_tokens: Padded tokens (rows x longest row) per forward.
        max_batch_requests: Requests per forward at most.
        queue_size: Requests waiting at most; more are refused with :class:`QueueFull`.
        store_score: Scores stored documents by id (``None`` without ``--index``).
        metrics: A :class:`~.metrics.ServeMetrics` (``None``: not recorded).
        on_start: Called first in the worker thread (sets its torch threads).
    """

    def __init__(self, forward: Forward, batch_tokens: int, max_batch_requests: int, queue_size: int,
                 store_score: StoreScore | None = None, metrics=None, on_start: Callable[[], object] | None = None):
        self.forward, self.store_score, self.metrics, self.on_start = forward, store_score, metrics, on_start
        self.batch_tokens, self.max_batch_requests, self.queue_size = batch_tokens, max_batch_requests, queue_size
        self.jobs: deque[Job] = deque()
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="sparse-ce-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the admitted jobs, then end the worker (waits up to ``timeout`` seconds)."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def depth(self) -> int:
        """Requests in the queue (not yet fully handed to a forward)."""
        return len(self.jobs)

    def submit(self, query: str, rows: list[Row], size: int, stored: Sequence[tuple[int, str]] = ()) -> asyncio.Future:
        """Queue a request of ``size`` documents: ``rows`` (``Row.pair``: position) and ``stored`` (position, id).

        Raises:
            QueueFull: ``queue_size`` requests wait already, or the batcher is stopping.
        """
        loop = asyncio.get_running_loop()
        job = Job(query, rows, size, list(stored), loop.create_future(), loop)
        with self.condition:
            if self.stopping or len(self.jobs) >= self.queue_size:
                raise QueueFull
            if job.left == 0:
                job.future.set_result(job.scores)
                return job.future
            self.jobs.append(job)
            self._record_depth()
            self.condition.notify()
        return job.future

    def _work(self) -> None:
        if self.on_start:
            self.on_start()
        while True:
            with self.condition:
                while not self.jobs and not self.stopping:
                    self.condition.wait()
                if not self.jobs:
                    return  # stopping, nothing left
                job = next((j for j in self.jobs if j.stored and not j.dropped), None)
                if job is not None:
                    stored, job.stored = job.stored, []
                    batch = []
                else:
                    batch = self._take()
                self._record_depth()
            if job is not None:
                self._score_stored(job, stored)
            elif batch:
                self._run(batch)

    def _take(self) -> list[tuple[Job, list[Row]]]:
        """Rows of the next forward, from the jobs in arrival order (caller holds the lock)."""
        batch: list[tuple[Job, list[Row]]] = []
        count, longest = 0, 0
        while self.jobs and len(batch) < self.max_batch_requests:
            job = self.jobs[0]
            if job.dropped or job.taken == len(job.rows):  # (stored ids are scored before any forward is taken)
                self.jobs.popleft()
                continue
            start = job.taken
            while job.taken < len(job.rows):
                row = job.rows[job.taken]
                width = max(longest, len(row.input_ids))
                if count and (count + 1) * width > self.batch_tokens:
                    break
                count, longest = count + 1, width
                job.taken += 1
            if job.taken > start:
                batch.append((job, job.rows[start:job.taken]))
            if job.taken < len(job.rows):
                break  # the forward is full
            self.jobs.popleft()
        return batch

    def _run(self, batch: list[tuple[Job, list[Row]]]) -> None:
        rows = [row for _, job_rows in batch for row in job_rows]
        started = time.perf_counter()
        try:
            scores = self._forward(rows)
        except Exception as error:  # find the request whose rows fail; the others are scored
            if len(batch) == 1:
                self._fail(batch[0][0], error)
                return
            logger.warning("a forward of %d requests failed (%s); scoring them one by one", len(batch), error)
            for job, job_rows in batch:
                self._run([(job, job_rows)])
            return
        if self.metrics:
            self.metrics.record_forward(len(rows), len(batch), time.perf_counter() - started)
        start = 0
        for job, job_rows in batch:
            for row, score in zip(job_rows, scores[start:start + len(job_rows)]):
                job.scores[row.pair] = score
            start += len(job_rows)
            self._done(job, len(job_rows))

    def _forward(self, rows: list[Row]) -> list[float]:
        scores = self.forward(rows)
        if len(scores) != len(rows):
            raise RuntimeError(f"the model gave {len(scores)} scores for {len(rows)} rows")
        return scores

    def _score_stored(self, job: Job, stored: list[tuple[int, str]]) -> None:
        try:
            scores = self.store_score(job.query, [docid for _, docid in stored])
        except Exception as error:
            self._fail(job, error)
            return
        for (position, _), score in zip(stored, scores):
            job.scores[position] = score
        if self.metrics:
            self.metrics.pairs.inc(len(stored))
        self._done(job, len(stored))

    def _done(self, job: Job, count: int) -> None:
        job.left -= count
        if job.left == 0 and not job.dropped:
            job.resolve()

    def _fail(self, job: Job, error: Exception) -> None:
        logger.error("scoring a request failed: %s: %s", type(error).__name__, error)
        job.failed = True
        job.resolve(error)

    def _record_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.jobs))
