"""The impression log: every /rank answer, as the model saw it, to Redis Streams, off the request path.

Every answer gets an id (`new_impression_id`: 48 bits of unix milliseconds, then 80 random bits, as 32
hex digits: time-ordered, unique without asking anyone, known before anything is written). With
DIN_LOG_IMPRESSIONS the route hands `ImpressionLog.offer` what it answered (never awaited, never
raising): the record (`contracts.records.Impression`: the history snapshot scored, the candidates
returned with their categories, scores and positions, the version) is built and written later by one
background task, owned by the app's lifespan, which writes whatever has gathered in the buffer as one
pipeline of `XADD ... MAXLEN ~` (`service.store.streams`).

- Bounded: at most DIN_LOG_BUFFER impressions wait; one more is dropped (`buffer_full`). A batch Redis
  did not take (down, an error, no answer in time) is dropped too, never retried: the log never holds
  up /rank, and never grows behind a Redis that is gone. Every drop is counted by reason in
  `din_impressions_dropped_total`, every record written in `din_impressions_logged_total`.
- Sampled by the id itself (`sampled`): the same impression is in or out on every replica, and /events
  records feedback only for impressions in the sample.
- With Redis Cluster the log is spread over DIN_LOG_STREAMS streams (`service.store.keys`), an
  impression and its feedback going to the stream its id picks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import orjson

from contracts.records import Candidate, Feedback, Impression
from service.config import Settings
from service.inference import RankResult
from service.metrics import Metrics
from service.store.history import HistoryStore
from service.store.keys import feedback_key, impressions_key, log_shard
from service.store.streams import OUTCOMES, UNCONFIRMED, WRITTEN, append_entries

log = logging.getLogger(__name__)

FLUSH_MAX = 256  # impressions per pipeline (a record of 200 candidates is ~15 kB of JSON)
STOP_FLUSH_S = 2.0  # at shutdown, how long the last records may take to be written
BUFFER_FULL, SHUTDOWN = "buffer_full", "shutdown"


def new_impression_id(now_ms: int | None = None) -> str:
    """32 lowercase hex digits: 48 bits of unix time in ms, then 80 random bits (time-ordered)."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"{ms & 0xFFFFFFFFFFFF:012x}{os.urandom(10).hex()}"


def sampled(impression_id: str, rate: float) -> bool:
    """Whether impression `impression_id` is in a sample of `rate` (0..1): decided by 32 of its random
    bits, so every replica and every later reader decides the same."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return int(impression_id[12:20], 16) < rate * 2**32


@dataclass(frozen=True, slots=True)
class Answered:
    """What /rank answered, as handed to the log (the record is built later, off the request path)."""

    impression_id: str
    ts: float  # unix seconds
    user_id: str
    candidates: list[str]  # the request's candidates, duplicates dropped (what the scores index)
    order: np.ndarray  # int (n_returned,): indices into `candidates`, in the answer's order
    result: RankResult


class ImpressionLog:
    """The bounded buffer and its writer (see the module docstring). Lives on one event loop."""

    def __init__(self, store: HistoryStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.prefix = settings.redis_prefix
        self.sample_rate = settings.log_sample_rate
        self.max_candidates = settings.log_candidates  # 0: every returned one
        self.shards = settings.log_shards
        self.maxlen = -(-settings.log_maxlen // self.shards)  # per stream
        self._buffer: collections.deque[Answered] = collections.deque()
        self._capacity = settings.log_buffer
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing = False  # a batch is being written
        for reason in (BUFFER_FULL, SHUTDOWN, *OUTCOMES[1:]):  # every reason shows, at 0
            metrics.impressions_dropped.labels(reason=reason)

    # ------------------------------------------------------------------ the request side

    def offer(self, answered: Answered) -> None:
        """Take one answer to log (if sampled): at once, never blocking, never raising."""
        if not sampled(answered.impression_id, self.sample_rate):
            return
        if len(self._buffer) >= self._capacity:
            self.metrics.impressions_dropped.labels(reason=BUFFER_FULL).inc()
            return
        self._buffer.append(answered)
        self.metrics.impressions_buffered.set(len(self._buffer))
        self._wake.set()

    def wants_feedback(self, impression_id: str) -> bool:
        """Whether feedback on `impression_id` is recorded: when that impression is in the sample."""
        return sampled(impression_id, self.sample_rate)

    def feedback_entry(self, fb: Feedback) -> tuple[str, bytes]:
        """(stream key, record) of one feedback record: the stream of its impression."""
        key = feedback_key(self.prefix, log_shard(fb.impression_id, self.shards), self.shards)
        return key, orjson.dumps(fb)

    # ------------------------------------------------------------------ the writer

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="impression-log")

    async def stop(self) -> None:
        """Write what is buffered (for at most STOP_FLUSH_S), then stop; what is left is dropped."""
        if self._task is None:
            return
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), STOP_FLUSH_S)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._buffer:
            log.warning("impression log: %d impressions not written at shutdown", len(self._buffer))
            self.metrics.impressions_dropped.labels(reason=SHUTDOWN).inc(len(self._buffer))
            self._buffer.clear()
        self.metrics.impressions_buffered.set(0)

    async def _drained(self) -> None:
        while self._buffer or self._writing:
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buffer:
                n = min(len(self._buffer), FLUSH_MAX)
                batch = [self._buffer.popleft() for _ in range(n)]
                self.metrics.impressions_buffered.set(len(self._buffer))
                self._writing = True
                try:
                    await self._write(batch)
                except asyncio.CancelledError:  # stopped mid-write: sent, perhaps, but not confirmed
                    self.metrics.impressions_dropped.labels(reason=UNCONFIRMED).inc(len(batch))
                    raise
                except Exception:  # a bug here must not end the writer: this batch is lost, counted
                    log.exception("impression log: a batch of %d could not be written", len(batch))
                    self.metrics.impressions_dropped.labels(reason="redis_error").inc(len(batch))
                finally:
                    self._writing = False

    async def _write(self, batch: list[Answered]) -> None:
        entries = [
            (
                impressions_key(self.prefix, log_shard(a.impression_id, self.shards), self.shards),
                orjson.dumps(self.record(a)),
            )
            for a in batch
        ]
        outcomes = await append_entries(self.store, entries, self.maxlen)
        counts = collections.Counter(outcomes)
        self.metrics.impressions_logged.inc(counts.pop(WRITTEN, 0))
        for reason, n in counts.items():
            self.metrics.impressions_dropped.labels(reason=reason).inc(n)
        if counts:
            log.warning(
                "impression log: %d of %d not written (%s)", sum(counts.values()), len(batch), dict(counts)
            )

    def record(self, a: Answered) -> Impression:
        """The record of one answer: its candidates in the request's order (the best
        DIN_LOG_CANDIDATES of those returned, or all of them), each with its place in the answer."""
        r = a.result
        order = a.order.tolist()
        if self.max_candidates:
            order = order[: self.max_candidates]
        position = {index: place for place, index in enumerate(order)}
        keep = sorted(position)
        ids = [a.candidates[i] for i in keep]
        scores = r.scores[keep].tolist() if keep else []
        history = list(r.history)
        scorer = r.scorer
        unknown: list[str | None] = [None] * max(len(ids), len(history))
        categories = scorer.categories(ids) if scorer is not None else unknown[: len(ids)]
        history_categories = scorer.categories(history) if scorer is not None else unknown[: len(history)]
        candidates = [
            Candidate(item, cat, score, position[i])
            for item, cat, score, i in zip(ids, categories, scores, keep, strict=True)
        ]
        return Impression(
            impression_id=a.impression_id,
            ts=a.ts,
            user_id=a.user_id,
            model_version=r.model_version,
            history=history,
            history_categories=history_categories,
            candidates=candidates,
            degraded=r.degraded,
        )
