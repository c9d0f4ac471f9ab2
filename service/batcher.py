"""Micro-batcher: concurrent /rank requests share one Redis round trip and one ONNX Runtime call.

The shape of text-embeddings-inference's queue and Ray Serve's `@serve.batch`:
- each request carries an asyncio future and waits in a bounded queue; a full queue refuses at once;
- one consumer task owns the queue and closes a batch when its candidate budget is full, or when
  its first request has waited `max_delay` *and* an inference slot is free (while every slot is
  busy, the batch keeps growing instead of waiting in line half empty);
- a closed batch drops callers that went away, reads every missing history from Redis in one
  pipelined round trip (Redis down: empty histories, marked degraded), then runs the model in a
  worker thread while the consumer already collects the next batch;
- a failed batch sets the error on every future of that batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import DinError, InferenceFailed, QueueFull, ShuttingDown
from service.metrics import Metrics
from service.ranker import Ranker
from service.store import StoreUnavailable

log = logging.getLogger(__name__)


class HistorySource(Protocol):
    async def get_histories(self, user_ids: list[str]) -> list[list[str]]: ...


@dataclass(frozen=True, slots=True)
class RankResult:
    scores: np.ndarray  # float32 (n_candidates,), in the request's candidate order
    history_length: int  # behaviours the model saw, after truncation to T
    degraded: str | None  # why the history could not be read, or None


@dataclass(slots=True)
class _Job:
    user_id: str
    candidates: list[str]
    history: list[str] | None  # explicit history: skips the Redis read
    future: asyncio.Future[RankResult]
    enqueued_at: float


class Batcher:
    def __init__(
        self,
        ranker: Ranker,
        store: HistorySource,
        metrics: Metrics,
        *,
        max_delay_s: float,
        max_candidates: int,
        queue_max: int,
        max_inflight: int = 1,
    ) -> None:
        self.ranker = ranker
        self.store = store
        self.metrics = metrics
        self.max_delay_s = max_delay_s
        self.max_candidates = max_candidates
        self.max_inflight = max_inflight
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_max)
        self._carry: _Job | None = None  # the job that did not fit the previous batch
        self._holding: list[_Job] = []  # a closed batch waiting for a free slot
        self._inflight = 0
        self._slot_free = asyncio.Event()
        self._slot_free.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="din-infer")
        self._closing = False
        self.batches = 0  # ONNX Runtime calls made (also in the metrics' histogram count)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._consumer = asyncio.create_task(self._consume(), name="din-batcher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running batches finish, fail whatever still waits."""
        self._closing = True
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        pending = [*self._holding, *([self._carry] if self._carry else [])]
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(
                    ShuttingDown("the service is shutting down; retry on another replica")
                )
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- producer side

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, user_id: str, candidates: list[str], history: list[str] | None) -> RankResult:
        """Queue one request and wait for its scores. Raises QueueFull at once when the queue is full."""
        if self._closing:
            raise ShuttingDown("the service is shutting down; retry on another replica")
        loop = asyncio.get_running_loop()
        job = _Job(user_id, candidates, history, loop.create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.queue_rejections.labels(reason="queue_full").inc()
            raise QueueFull(
                f"the ranking queue is full ({self._queue.maxsize} requests waiting); retry shortly",
                retry_after_s=1,
            ) from None
        self.metrics.queue_admitted.inc()
        self.metrics.queue_depth.set(self._queue.qsize())
        return await job.future  # a caller that goes away cancels the future; the batcher skips it

    # ---------------------------------------------------------------- consumer side

    async def _consume(self) -> None:
        while True:
            try:
                batch = await self._collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the consumer die: it is the only one
                log.exception("batch collection failed")
                continue
            # Backpressure: while every slot computes, requests wait in the bounded queue (which sheds
            # load with 503s) instead of piling up as closed batches in front of the executor.
            await self._slot_free.wait()
            self._holding = []
            self._inflight += 1
            self.metrics.inflight_batches.set(self._inflight)
            if self._inflight >= self.max_inflight:
                self._slot_free.clear()
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next(self) -> _Job:
        job = self._carry or await self._queue.get()
        self._carry = None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job

    async def _collect(self) -> list[_Job]:
        """Block for a first job, then gather more until the budget is full or it is time to run."""
        first = await self._next()
        batch, size = [first], len(first.candidates)
        self._holding = batch  # so that stop() can fail these jobs if it cancels us mid-collection
        deadline = first.enqueued_at + self.max_delay_s
        loop = asyncio.get_running_loop()
        loop_deadline = loop.time() + (deadline - time.perf_counter())
        while size < self.max_candidates:
            job: _Job | None = None
            if not self._queue.empty():
                job = self._queue.get_nowait()
            elif loop.time() < loop_deadline:
                try:
                    async with asyncio.timeout_at(loop_deadline):
                        job = await self._queue.get()
                except TimeoutError:
                    continue
            elif self._slot_free.is_set():
                break  # waited long enough and the model is free: run now
            else:
                job = await self._job_or_free_slot()
                if job is None:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            if size + len(job.candidates) > self.max_candidates:
                self._carry = job  # opens the next batch
                break
            batch.append(job)
            size += len(job.candidates)
        return batch

    async def _job_or_free_slot(self) -> _Job | None:
        """While every inference slot is busy, keep growing the batch; None once a slot frees."""
        get = asyncio.ensure_future(self._queue.get())
        free = asyncio.ensure_future(self._slot_free.wait())
        try:
            await asyncio.wait((get, free), return_when=asyncio.FIRST_COMPLETED)
        finally:
            free.cancel()
            if not get.done():
                get.cancel()  # Queue.get is cancellation-safe: an item is only taken on success
            with contextlib.suppress(asyncio.CancelledError):
                await get
        return None if get.cancelled() else get.result()

    async def _run(self, batch: list[_Job]) -> None:
        try:
            await self._run_batch(batch)
        finally:
            self._inflight -= 1
            self.metrics.inflight_batches.set(self._inflight)
            self._slot_free.set()

    async def _run_batch(self, batch: list[_Job]) -> None:
        live = [job for job in batch if not job.future.done()]
        if len(live) < len(batch):
            self.metrics.cancelled.inc(len(batch) - len(live))
        if not live:
            return
        now = time.perf_counter()
        for job in live:
            self.metrics.queue_latency.observe(now - job.enqueued_at)
        try:
            histories, degraded = await self._histories(live)
            rows = [(job.candidates, hist) for job, hist in zip(live, histories, strict=True)]
            n_cand = sum(len(c) for c, _ in rows)
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                scores = await loop.run_in_executor(self._executor, self.ranker.score_batch, rows)
            except Exception as e:
                raise InferenceFailed(f"inference failed for a batch of {len(rows)} requests: {e}") from e
            self.metrics.inference_latency.observe(time.perf_counter() - t0)
            self.metrics.batch_requests.observe(len(rows))
            self.metrics.batch_candidates.observe(n_cand)
            self.metrics.candidates_scored.inc(n_cand)
            self.batches += 1
        except Exception as e:
            err = e if isinstance(e, DinError) else InferenceFailed(f"batch failed: {type(e).__name__}: {e}")
            reason = err.code if isinstance(err, DinError) else "error"
            self.metrics.batch_failures.labels(reason=reason).inc()
            log.error("batch of %d requests failed: %s", len(live), err, exc_info=e)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        T = self.ranker.max_history
        for job, hist, s in zip(live, histories, scores, strict=True):
            if not job.future.done():
                # an explicit history never touched Redis, so it is never degraded
                why = degraded if job.history is None else None
                job.future.set_result(RankResult(s, min(len(hist), T), why))

    async def _histories(self, jobs: list[_Job]) -> tuple[list[list[str]], str | None]:
        """Explicit histories as given; the others from Redis in one pipelined round trip."""
        histories: list[list[str]] = [job.history or [] for job in jobs]
        need = [i for i, job in enumerate(jobs) if job.history is None]
        if not need:
            return histories, None
        t0 = time.perf_counter()
        try:
            got = await self.store.get_histories([jobs[i].user_id for i in need])
        except StoreUnavailable as e:
            self.metrics.redis_latency.labels(op="get_histories").observe(time.perf_counter() - t0)
            self.metrics.degraded.labels(reason="redis_unavailable").inc(len(need))
            log.warning("redis unavailable, ranking %d requests with empty histories: %s", len(need), e)
            return histories, "redis_unavailable"
        self.metrics.redis_latency.labels(op="get_histories").observe(time.perf_counter() - t0)
        for i, hist in zip(need, got, strict=True):
            histories[i] = hist
        return histories, None
