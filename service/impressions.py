"""The impression log: every /rank answer, as the model saw it, to Redis Streams, off the request path.

Every answer gets an id (`new_impression_id`: 48 bits of unix milliseconds, then 80 random bits, as 32
hex digits: time-ordered, unique without asking anyone, known before anything is written). With
DIN_LOG_IMPRESSIONS the route hands `ImpressionLog.offer` what it answered (never awaited, never
raising): one append to a bounded buffer, all the request path does. The record
(`contracts.records.Impression`: the history snapshot scored, the candidates returned with their
categories, scores and positions, the version) is built, encoded and written by one writer thread,
owned by the app's lifespan, which writes whatever has gathered in the buffer as one pipeline of
`XADD ... MAXLEN ~` over a blocking Redis client of its own (`service.store.streams.StreamWriter`).

Why a thread: a record of 200 candidates and a 100-item history was ~20 kB of JSON; building it,
encoding it and sending it took 0.5-0.9 ms of the event loop's CPU per answer (measured), and a batch
of them held every request waiting on the loop (its JSON parsing, its answer) for milliseconds at a
time. The writer thread sleeps YIELD_S once it has encoded for YIELD_EVERY_S, so that the GIL goes to
the loop when it waits: the loop waits on the writer for a fraction of a millisecond at most. Woken by a
record, it waits LINGER_S for more, so that records go to Redis a few at a pipeline rather than one at a
round trip. The record is encoded from plain lists (`encode`, ~40 us for 200 candidates and a 100-item
history: its candidates are columns, `contracts.records`), not from the dataclasses.

- Bounded: at most DIN_LOG_BUFFER impressions wait; one more is dropped (`buffer_full`). A batch Redis
  did not take (down, an error, no answer in time) is dropped too, never retried: the log never holds
  up /rank, and never grows behind a Redis that is gone. Every drop is counted by reason in
  `din_impressions_dropped_total`, every record written in `din_impressions_logged_total`.
- Sampled by the id itself (`sampled`): the same impression is in or out on every replica, and /events
  records feedback only for impressions in the sample.
- With Redis Cluster the log is spread over DIN_LOG_STREAMS streams (`service.store.keys`), an
  impression and its feedback going to the stream its id picks.
- `stop()` writes what is buffered for at most STOP_FLUSH_S; what is left is dropped (`shutdown`), and
  a batch still on its way then is counted `unconfirmed`.

Shadow scores (`offer_shadow`, the arms issue): a shadow version's scores of a request go through the
same buffer, sampling (by the served impression's id), drops and writer as the served answer, and become
a `contracts.records.ShadowScores` record of the same candidates the served impression logs. It is
written to the impression stream of that id, its JSON marked `"type": "shadow"` (an impression has no
`type`). Why there and not a stream of its own: `din log export` reads the impression streams through
one consumer group, so shadow records get its exactly-once export (pending until their file is in
place) with no second group, no new key, and land in the same stream (and slot) as their impression on
a cluster; an exporter that predates them counts them as malformed entries and moves on. The cost: they
share the stream's DIN_LOG_MAXLEN with the impressions (at 100% shadow sampling of one version the stream
holds half as many impressions). They are counted with the impressions, in
`din_impressions_logged_total` and `din_impressions_dropped_total`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from contracts.records import SHADOW_RECORD, Candidate, Feedback, Impression, ShadowScores
from service.config import Settings
from service.inference import RankResult
from service.metrics import Metrics
from service.store.history import HistoryStore
from service.store.keys import feedback_key, impressions_key, log_shard
from service.store.streams import OUTCOMES, REDIS_ERROR, UNCONFIRMED, WRITTEN, StreamWriter

log = logging.getLogger(__name__)

FLUSH_MAX = 256  # impressions per pipeline (a record of 200 candidates is ~13.5 kB of JSON)
STOP_FLUSH_S = 2.0  # at shutdown, how long the last records may take to be written
# The writer's own reply timeout: a pipeline of 256 records of ~20 kB may take longer than a history
# read's budget (DIN_REDIS_TIMEOUT_MS) on a busy host, and only the writer's thread waits for it.
WRITER_TIMEOUT_S = 2.0
# Once it has encoded for YIELD_EVERY_S the writer sleeps YIELD_S, so the GIL goes to the event loop if it
# waits. (The writer is not niced: on a busy machine a niced thread that holds the GIL waits long for a
# CPU, and the loop waits with it: a priority inversion.) A sleep costs ~20 us of CPU (measured): after
# every record (the first design) it was a tenth of the writer's CPU.
YIELD_S = 0.00005
YIELD_EVERY_S = 0.0002
# Woken by the first record, the writer waits this long for more before it writes: one pipeline of a few
# records instead of a wake-up, a GIL hand-over and a round trip per record (an XADD of a ~20 kB record
# costs ~75 us of this process's CPU alone, ~20 us in a pipeline of 8 or more; measured).
LINGER_S = 0.05
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
    arm: str | None = None  # the routing arm that served it; None: no routing config in force
    arm_forced: bool = False  # the arm came from the QA header, not the hash of the user


@dataclass(frozen=True, slots=True)
class ShadowAnswered:
    """A shadow version's scores of a request that was answered (and offered) as `impression_id`."""

    impression_id: str
    ts: float  # unix seconds (the served answer's)
    user_id: str
    model_version: str  # the shadow's version
    candidates: list[str]  # the request's candidates: the same list the served Answered has
    scores: np.ndarray  # float32 (n_candidates,): the shadow's scores, in `candidates` order
    served_order: np.ndarray  # int: the served answer's order (indices into candidates), as Answered.order


class ImpressionLog:
    """The bounded buffer and its writer thread (see the module docstring). `offer` is called on the
    event loop; `start` and `stop` on the loop that owns the store."""

    def __init__(
        self, store: HistoryStore, settings: Settings, metrics: Metrics, *, url: str | None = None
    ) -> None:
        """`url`: the Redis endpoint the store talks to (the writer opens its own client on it, with
        the store's options, `settings.redis`)."""
        self.store = store
        self.metrics = metrics
        self.url = url if url is not None else settings.redis.url
        self.redis_cfg = dataclasses.replace(
            settings.redis, timeout_s=max(settings.redis.timeout_s, WRITER_TIMEOUT_S)
        )
        self.prefix = settings.redis_prefix
        self.sample_rate = settings.log_sample_rate
        self.max_candidates = settings.log_candidates  # 0: every returned one
        self.shards = settings.log_shards
        self.maxlen = -(-settings.log_maxlen // self.shards)  # per stream
        # appends and pops: thread-safe
        self._buffer: collections.deque[Answered | ShadowAnswered] = collections.deque()
        self._capacity = settings.log_buffer
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # the writer ends once the buffer is empty
        self._lock = threading.Lock()  # the batch being written, and who counts it
        self._in_flight = 0  # records of the batch being written
        self._abandoned = False  # stop() gave up on that batch (and counted it): the writer does not
        for reason in (BUFFER_FULL, SHUTDOWN, *OUTCOMES[1:]):  # every reason shows, at 0
            metrics.impressions_dropped.labels(reason=reason)

    # ------------------------------------------------------------------ the request side

    def offer(self, answered: Answered) -> None:
        """Take one answer to log (if sampled): at once, never blocking, never raising."""
        self._offer(answered)

    def offer_shadow(self, shadow: ShadowAnswered) -> None:
        """Take one shadow version's scores to log (if its impression is sampled), exactly as `offer`."""
        self._offer(shadow)

    def _offer(self, answered: Answered | ShadowAnswered) -> None:
        if not sampled(answered.impression_id, self.sample_rate):
            return
        if len(self._buffer) >= self._capacity:
            self.metrics.impressions_dropped.labels(reason=BUFFER_FULL).inc()
            return
        self._buffer.append(answered)
        self.metrics.impressions_buffered.set(len(self._buffer))
        if not self._wake.is_set():
            self._wake.set()

    def wants_feedback(self, impression_id: str) -> bool:
        """Whether feedback on `impression_id` is recorded: when that impression is in the sample."""
        return sampled(impression_id, self.sample_rate)

    def feedback_entry(self, fb: Feedback) -> tuple[str, bytes]:
        """(stream key, record) of one feedback record: the stream of its impression."""
        key = feedback_key(self.prefix, log_shard(fb.impression_id, self.shards), self.shards)
        return key, orjson.dumps(fb)

    # ------------------------------------------------------------------ start, stop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Write what is buffered (for at most STOP_FLUSH_S), then stop; what is left is dropped."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + STOP_FLUSH_S
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._thread = None
        with self._lock:
            if thread.is_alive() and self._in_flight:  # still on its way: it may or may not be written
                self._abandoned = True
                self.metrics.impressions_dropped.labels(reason=UNCONFIRMED).inc(self._in_flight)
        left = 0
        while True:  # what the writer did not take (it takes no more once stopping and past this)
            try:
                self._buffer.popleft()
            except IndexError:
                break
            left += 1
        if left:
            log.warning("impression log: %d impressions not written at shutdown", left)
            self.metrics.impressions_dropped.labels(reason=SHUTDOWN).inc(left)
        self.metrics.impressions_buffered.set(0)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        writer = self._writer()
        try:
            while True:
                self._wake.wait()
                if not self._stopping:
                    time.sleep(LINGER_S)  # a batch gathers (offers meanwhile find the event set: no wake-up)
                self._wake.clear()
                while self._buffer and self._thread is not None:
                    n = min(len(self._buffer), FLUSH_MAX)
                    batch = []
                    for _ in range(n):
                        with contextlib.suppress(IndexError):  # stop() may have taken the rest
                            batch.append(self._buffer.popleft())
                    self.metrics.impressions_buffered.set(len(self._buffer))
                    if batch:
                        self._write_batch(writer, batch)
                if self._stopping or self._thread is None:
                    return
        finally:
            writer.close()

    def _writer(self) -> StreamWriter:
        assert self.url is not None, "the impression log needs the store's Redis URL"
        breaker, loop = self.store.breaker, self._loop
        if breaker is None or loop is None:  # a cluster: no breaker, each node's failure is its own
            return StreamWriter(self.url, self.redis_cfg)

        def on_loop(fn: Callable[..., Any], *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(fn, *args)

        def succeeded() -> None:
            if breaker.open:  # read from this thread: at worst one batch late
                on_loop(breaker.succeeded)

        return StreamWriter(
            self.url,
            self.redis_cfg,
            down=lambda: breaker.open,
            failed=lambda why: on_loop(breaker.failed, why),
            succeeded=succeeded,
        )

    def _write_batch(self, writer: StreamWriter, batch: list[Answered | ShadowAnswered]) -> None:
        with self._lock:
            self._in_flight, self._abandoned = len(batch), False
        counts: collections.Counter[str]
        try:
            entries = []
            since = time.perf_counter()
            for a in batch:
                key = impressions_key(self.prefix, log_shard(a.impression_id, self.shards), self.shards)
                entries.append((key, self.encode(a) if isinstance(a, Answered) else self.encode_shadow(a)))
                if time.perf_counter() - since >= YIELD_EVERY_S:
                    time.sleep(YIELD_S)  # hand the interpreter to the event loop if it waits
                    since = time.perf_counter()
            counts = collections.Counter(writer.append(entries, self.maxlen))
        except Exception:  # a bug here must not end the writer: this batch is lost, counted
            log.exception("impression log: a batch of %d could not be written", len(batch))
            counts = collections.Counter({REDIS_ERROR: len(batch)})
        with self._lock:
            self._in_flight = 0
            if self._abandoned:  # stop() counted it already
                return
        self.metrics.impressions_logged.inc(counts.pop(WRITTEN, 0))
        for reason, n in counts.items():
            self.metrics.impressions_dropped.labels(reason=reason).inc(n)
        if counts:
            log.warning(
                "impression log: %d of %d not written (%s)", sum(counts.values()), len(batch), dict(counts)
            )

    # ------------------------------------------------------------------ the record

    def _kept(self, order: np.ndarray) -> list[int]:
        """The candidates logged, in the answer's order (indices into the candidates): the first
        DIN_LOG_CANDIDATES of the answer's `order`, or all of it."""
        kept: list[int] = order.tolist()
        return kept[: self.max_candidates] if self.max_candidates else kept

    def record(self, a: Answered) -> Impression:
        """The record of one answer: its candidates in the request's order (the best
        DIN_LOG_CANDIDATES of those returned, or all of them), each with its place in the answer."""
        r = a.result
        order = self._kept(a.order)
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
            arm=a.arm,
            arm_forced=a.arm_forced,
        )

    def encode(self, a: Answered) -> bytes:
        """`orjson.dumps(self.record(a).to_dict())`, the same bytes, built from plain lists (no object
        per candidate: the wire form is columns, `contracts.records`)."""
        r = a.result
        order = np.asarray(self._kept(a.order), dtype=np.int64)
        keep = np.sort(order)
        place = np.empty(len(a.candidates), dtype=np.int64)
        place[order] = np.arange(len(order))
        kept = keep.tolist()
        ids = list(a.candidates) if len(kept) == len(a.candidates) else [a.candidates[i] for i in kept]
        history = list(r.history)
        scorer, scored = r.scorer, r.scored
        categories: list[str | None]
        history_categories: list[str | None]
        if scorer is None:
            categories, history_categories = [None] * len(ids), [None] * len(history)
        elif scored is not None:
            categories = scorer.categories_at(scored.items[keep])  # by the indices the graph scored
            history_categories = scorer.categories_at(scored.history)
        else:
            categories = scorer.categories(ids)
            history_categories = scorer.categories(history)
        return orjson.dumps(
            {
                "impression_id": a.impression_id,
                "ts": a.ts,
                "user_id": a.user_id,
                "model_version": r.model_version,
                "history": history,
                "history_categories": history_categories,
                "candidates": {
                    "item_id": ids,
                    "category": categories,
                    "score": r.scores[keep].tolist(),
                    "position": place[keep].tolist(),
                },
                "degraded": r.degraded,
                "context": None,
                "arm": a.arm,
                "arm_forced": a.arm_forced,
            }
        )

    def _shadow_fields(self, s: ShadowAnswered) -> tuple[list[str], list[float], list[int]]:
        """(items, scores, positions) of a shadow record: the candidates the served impression logs, in
        the request's order, with the shadow's score of each and its rank among all the candidates."""
        keep = sorted(self._kept(s.served_order))
        scores = np.asarray(s.scores, dtype=np.float32)
        rank = np.empty(len(scores), dtype=np.int64)
        rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))  # ties: the request's order
        return [s.candidates[i] for i in keep], scores[keep].tolist(), rank[keep].tolist()

    def shadow_record(self, s: ShadowAnswered) -> ShadowScores:
        """The record of one shadow scoring (see `_shadow_fields`)."""
        items, scores, positions = self._shadow_fields(s)
        return ShadowScores(s.impression_id, s.ts, s.user_id, s.model_version, items, scores, positions)

    def encode_shadow(self, s: ShadowAnswered) -> bytes:
        """`orjson.dumps(self.shadow_record(s).to_dict())`, built from plain lists."""
        items, scores, positions = self._shadow_fields(s)
        return orjson.dumps(
            {
                "type": SHADOW_RECORD,
                "impression_id": s.impression_id,
                "ts": s.ts,
                "user_id": s.user_id,
                "model_version": s.model_version,
                "items": items,
                "scores": scores,
                "positions": positions,
            }
        )
