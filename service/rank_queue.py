"""The ranking queue, the first half of the micro-batcher (`service.inference` is the second): admission,
deadlines, and grouping requests into batches. It never reads Redis or runs a model.

The shape of text-embeddings-inference's queue (queue.rs): each request is a `Job` with an asyncio
future, waiting in a bounded deque; a full queue refuses at once. Jobs wait in a lane per model
version (`Job.model`, the member of the model set that will score them; today one, `default`), so a
batch is always scored by one model. One consumer (`service.batcher.Batcher`) asks `next_batch`: a
batch closes when a lane's queued candidates fill the budget, or when its oldest request has waited
`max_delay` *and* an inference slot is free (while every slot is busy, requests keep queueing, and the
next batch grows instead of waiting in line half empty). Closing takes jobs off the front while they
fit; the first that does not fit stays at the front and opens the next batch. A job whose caller went
away is skipped, and one whose deadline passed is answered 503 there: it is never computed.

Admission (`admits`): a request whose expected wait (the candidates ahead of it, drained by `workers`
calls at once, and its own, at the median cost per candidate of recent calls, plus a Redis read) would
not fit in half the time left is shed at once; an explained one counts its explaining work and must fit
in a quarter. The costs are each model's, measured by the inference half (`service.costs.Costs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contracts.errors import Overloaded
from service.costs import Costs
from service.live import DEFAULT_MODEL
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.inference import RankResult

CANNOT_MEET_DEADLINE = "the service cannot answer within the request's deadline"
# Admission: the expected wait must fit in half the time left. The queue then holds at most half a
# budget of work: enough to keep every worker busy (a batch takes ~10-30 ms), with the other half for
# what the estimate cannot see (a slow call, an event loop busy refusing, the time a request spent in
# the socket before it was read). Filling the queue to the deadline adds latency, not goodput: at 2x
# capacity it answered 200s at p50 190 ms and some past 250 ms by the client's clock (bench/overload.py).
HEADROOM = 2.0  # also what the inference half sets aside for a batch's own inference
_EXPLAIN_HEADROOM = 4.0  # explained requests: a quarter of the time left, so they are shed first


@dataclass(slots=True)
class Job:
    user_id: str
    candidates: list[str]
    history: list[str] | None  # explicit history: skips the Redis read
    future: asyncio.Future[RankResult]
    enqueued_at: float  # time.perf_counter()
    deadline: float  # time.perf_counter() by which the answer is due
    explain: bool = False  # wants each returned item's contributions
    top_k: int | None = None  # with explain: how many items it returns (None: every candidate)
    explain_rows: int = 0  # with explain: the explaining graph's rows it needs (items x T), for admission
    model: str = DEFAULT_MODEL  # the member of the model set that scores it (its lane)


class RankQueue:
    def __init__(
        self,
        metrics: Metrics,
        costs: Callable[[str], Costs],
        *,
        max_delay_s: float,
        max_candidates: int,
        queue_max: int,
        max_inflight: int,
        workers: int,
    ) -> None:
        self.metrics = metrics
        self.costs = costs  # each model's recent costs, by its name
        self.max_delay_s = max_delay_s
        self.max_candidates = max_candidates
        self.queue_max = queue_max
        self.max_inflight = max(max_inflight, workers)
        self.workers = workers
        self._lanes: dict[str, deque[Job]] = {}  # per model, each in arrival order
        self._queued = 0  # jobs in every lane
        self._queued_candidates: dict[str, int] = {}
        self._wakeup = asyncio.Event()  # a job arrived or a slot freed: the consumer looks again
        self.inflight = 0  # batches taken and not finished
        self._inflight_candidates = 0
        self._explain_rows = 0  # explaining work admitted and not yet done, in rows
        self._typical_candidates = 0  # candidates of a recent request (moving average)

    # ---------------------------------------------------------------- admission

    @property
    def depth(self) -> int:
        return self._queued

    def lane_depth(self, model: str) -> int:
        """Jobs queued for member `model`."""
        lane = self._lanes.get(model)
        return len(lane) if lane is not None else 0

    @property
    def full(self) -> bool:
        return self._queued >= self.queue_max

    def admits(
        self,
        deadline: float,
        candidates: int | None = None,
        explain_rows: int = 0,
        model: str = DEFAULT_MODEL,
    ) -> bool:
        """Whether a request of `candidates` (default: a typical one), explaining `explain_rows` rows,
        can be answered by `deadline` (time.perf_counter()) by `model`, with headroom: an estimate a
        little optimistic would admit work that then times out; an explained request gets twice the
        headroom, so it is shed first. The one admission rule, used here and at the door
        (service.middleware)."""
        n = self._typical_candidates if candidates is None else candidates
        headroom = _EXPLAIN_HEADROOM if explain_rows else HEADROOM
        return time.perf_counter() + headroom * self.expected_wait(n, explain_rows, model) <= deadline

    def expected_wait(self, candidates: int, explain_rows: int = 0, model: str = DEFAULT_MODEL) -> float:
        """Seconds until a new request of `candidates` (explaining `explain_rows` rows) would be
        answered by `model`: the work ahead of it and its own, at that model's recent cost per candidate
        and per explained row, plus a Redis read. 0 until a batch has been measured."""
        costs = self.costs(model)
        ahead = self._inflight_candidates + sum(self._queued_candidates.values())
        # the work ahead drains `workers` batches at a time; its own batch takes one call's time
        scoring = (ahead / self.workers + candidates) * costs.candidate_s.value()
        explaining = (self._explain_rows / self.workers + explain_rows) * costs.explain_row_s.value()
        return scoring + explaining + costs.redis_s.value()

    def shed(self, reason: str, message: str = CANNOT_MEET_DEADLINE) -> Overloaded:
        """Count a refusal and return its answer (overloaded, retry shortly); raised by the batcher, and
        answered by the AdmissionGate (service.middleware) for requests refused before parsing."""
        self.metrics.queue_rejections.labels(reason=reason).inc()
        return Overloaded(f"{message}; retry shortly", reason=reason, retry_after_s=1)

    def put(self, job: Job) -> None:
        """Queue an admitted job in its model's lane."""
        self._typical_candidates = round(_ewma(self._typical_candidates, len(job.candidates)))
        self._lanes.setdefault(job.model, deque()).append(job)
        self._queued += 1
        self._queued_candidates[job.model] = self._queued_candidates.get(job.model, 0) + len(job.candidates)
        self._explain_rows += job.explain_rows
        self._wakeup.set()
        self.metrics.queue_admitted.inc()
        self.metrics.queue_depth.set(self._queued)

    # ---------------------------------------------------------------- batches

    async def next_batch(self) -> list[Job]:
        """Wait until a batch should close, then take it off the front of its lane (possibly empty:
        every job taken had gone away). It counts as in flight until `finished`."""
        while True:
            timeout: float | None = None  # nothing queued, or every slot busy: wait for news
            lane = self._oldest_lane()
            if lane is not None and self.inflight < self.max_inflight:
                if self._queued_candidates[lane] >= self.max_candidates:
                    break
                timeout = self._lanes[lane][0].enqueued_at + self.max_delay_s - time.perf_counter()
                if timeout <= 0:
                    break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        batch = self._take(lane)
        if batch:
            self.inflight += 1
            self.metrics.inflight_batches.set(self.inflight)
        return batch

    def finished(self, batch: list[Job]) -> None:
        """A batch from `next_batch` is done (answered or failed): its slot is free again."""
        self._inflight_candidates -= sum(len(job.candidates) for job in batch)
        self._explain_rows -= sum(job.explain_rows for job in batch)
        self.inflight -= 1
        self.metrics.inflight_batches.set(self.inflight)
        self._wakeup.set()

    def drain(self) -> list[Job]:
        """Every job still queued, taken off (the batcher is stopping)."""
        jobs = [job for lane in self._lanes.values() for job in lane]
        self._lanes.clear()
        self._queued = 0
        self._queued_candidates.clear()
        return jobs

    def _oldest_lane(self) -> str | None:
        """The lane whose front job has waited longest (None: nothing queued)."""
        fronts = [(lane[0].enqueued_at, model) for model, lane in self._lanes.items() if lane]
        return min(fronts)[1] if fronts else None

    def _take(self, model: str) -> list[Job]:
        """Jobs off the front of `model`'s lane while they fit the candidate budget (the first always
        does)."""
        lane = self._lanes[model]
        batch: list[Job] = []
        size = 0
        while lane:
            job = lane[0]
            n = len(job.candidates)
            if batch and size + n > self.max_candidates:
                break  # stays at the front: it opens the next batch
            lane.popleft()
            self._queued -= 1
            self._queued_candidates[model] -= n
            if job.future.done():  # the caller went away (or gave up at its deadline) while queued
                self._explain_rows -= job.explain_rows
                self.metrics.cancelled.inc()
                continue
            if job.deadline <= time.perf_counter():  # too late: never computed
                self._explain_rows -= job.explain_rows
                self.metrics.queue_rejections.labels(reason="expired").inc()
                late = Overloaded("the request's deadline passed in the queue", reason="timeout")
                job.future.set_exception(late)
                continue
            batch.append(job)
            size += n
        self.metrics.queue_depth.set(self._queued)
        self._inflight_candidates += size
        return batch


def _ewma(previous: float, sample: float, weight: float = 0.2) -> float:
    """Exponential moving average; the first sample stands alone."""
    return sample if previous == 0.0 else (1 - weight) * previous + weight * sample
