"""Shadow scoring: a version nobody is shown scores the same requests, on idle CPU only.

After /rank has its answer, each shadow of the routing in force (`service.routing`) whose sample takes
the impression id gets a `ShadowJob`: the request's candidates and the very history snapshot the
served version scored (no second Redis read, no drift between the two), and the served order. Jobs
wait in one bounded queue; one consumer takes them in order, a batch of one version at a time (never
mixing versions in a graph call, like the batcher) and hands its strings, as the requests had them, to a
process of its own at the idle scheduling class (`service.shadow_worker`, SCHED_IDLE: it runs only on a
core nothing else wants, and shares no GIL with the server), which holds an ONNX Runtime session of the
very graph bytes this process verified for each shadow version, and encodes, scores and compares the
batch with the served orders itself: this process pickles the strings and logs the scores, nothing more
per candidate. (A thread at the idle class in this process, the first design, raised the served p99 at
half capacity by ~20-70%: when it took the GIL back after a graph call and a busy core made it wait, the
event loop waited on it. What a process at the idle class still costs the served answers is the CPU's own
sharing (caches, memory bandwidth, the vector units), which depends on the machine: README and
bench/shadow.py; hence, by default (DIN_SHADOW_YIELD), the worker also waits for the served graph calls
to stop and stops its own slice when one starts: `service.shadow_worker.ServedWork`, which this
process's inference keeps, and `Preemption`.) If the worker cannot be started, or dies, the batch is
shed ("failed") and the next one starts a new worker; where no process can be started at all, the same
scoring runs in an idle-class thread of this process as before (waiting for the served calls between
slices, not stopping one). Under load it simply does not run: jobs
that wait past DIN_SHADOW_MAX_AGE_MS, or find the queue full (DIN_SHADOW_QUEUE_MAX), are shed and
counted (din_shadow_shed_total): a shadow is the first thing dropped.

What a shadow produced goes to the impression log beside the served answer
(`ImpressionLog.offer_shadow`: its scores of the logged items and where it ranks them) and to
din_shadow_topk_overlap (how much of the served top k it would have shown too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.impressions import ImpressionLog, ShadowAnswered
from service.live import LiveModel
from service.metrics import Metrics
from service.ranker import Ranker
from service.shadow_worker import ServedWork, idle_priority, read_frame, ready_within, score_rows, write_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShadowJob:
    member: LiveModel  # the shadow version's member (held: an unloaded version finishes its jobs)
    impression_id: str
    ts: float  # unix seconds of the served answer
    user_id: str
    candidates: list[str]
    history: tuple[str, ...]  # the snapshot the served version scored
    served_order: np.ndarray  # the served answer's order (indices into candidates)
    queued_at: float  # time.perf_counter()


class ShadowRunner:
    def __init__(
        self,
        metrics: Metrics,
        impressions: ImpressionLog | None,
        *,
        queue_max: int,
        max_age_s: float,
        max_candidates: int,
        yield_to_served: bool = True,
    ) -> None:
        self.metrics = metrics
        self.impressions = impressions
        self.queue_max = queue_max
        self.max_age_s = max_age_s
        self.max_candidates = max_candidates
        self._queue: collections.deque[ShadowJob] = collections.deque()
        self._wake = asyncio.Event()
        # the served graph calls running (the batcher's inference writes it): the shadows wait for none,
        # a slice at a time (service.shadow_worker); None: they run whenever a core is idle
        self.served_work = ServedWork.create() if yield_to_served else None
        self._worker = ShadowWorker(self.served_work)
        # the thread that talks to the worker (normal class: it only waits on the pipe, and takes the GIL
        # for a few microseconds to pickle the jobs' strings and take the scores back)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="din-shadow")
        # where no worker process can start: the idle-class thread in this process (the fallback)
        self._threads: set[int] = set()  # the idle-class thread's native id (to raise it at stop)
        self._in_process = ThreadPoolExecutor(
            1, thread_name_prefix="din-shadow-idle", initializer=_idle_priority, initargs=(self._threads,)
        )
        self._task: asyncio.Task[None] | None = None
        self.scored = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="din-shadow")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._queue:
            self._shed(job, "shutdown")
        self._queue.clear()
        # Not waited for here: on a machine with no idle core the idle-class thread may get no CPU at all,
        # and waiting would hold the event loop (and the shutdown) for as long. It goes back to the
        # normal class first, so that it ends its last call (if any) and exits promptly.
        for tid in list(self._threads):
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        self._worker.close()  # a call waiting on it ends at once (EOF)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._in_process.shutdown(wait=False, cancel_futures=True)
        if self.served_work is not None:
            self.served_work.close()  # a fallback call still waiting on it sees no served work, and ends

    @property
    def depth(self) -> int:
        return len(self._queue)

    def offer(self, job: ShadowJob) -> None:
        """Queue `job` (never blocks, never raises): shed at once when the queue is full."""
        if len(self._queue) >= self.queue_max:
            self._shed(job, "queue_full")
            return
        self._queue.append(job)
        self._wake.set()

    def _shed(self, job: ShadowJob, reason: str) -> None:
        version = job.member.current.model_version
        self.metrics.shadow_shed.labels(model_version=version, reason=reason).inc()

    def _take(self) -> list[ShadowJob]:
        """The oldest job's version: its jobs off the front while they fit the candidate budget (jobs
        past their age are shed on the way)."""
        batch: list[ShadowJob] = []
        size = 0
        now = time.perf_counter()
        while self._queue:
            job = self._queue[0]
            if now - job.queued_at > self.max_age_s:
                self._queue.popleft()
                self._shed(job, "too_old")
                continue
            if batch and (
                job.member is not batch[0].member or size + len(job.candidates) > self.max_candidates
            ):
                break
            self._queue.popleft()
            batch.append(job)
            size += len(job.candidates)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            ranker = batch[0].member.current
            rows = [(job.candidates, job.history) for job in batch]
            served = [job.served_order for job in batch]
            # what is left of each job's age: how long it may wait for the served work to stop
            now = time.perf_counter()
            budgets = [max(0.0, self.max_age_s - (now - job.queued_at)) for job in batch]
            try:
                # the strings as the requests had them: the worker encodes, scores and compares them with
                # the served orders, so that this process's interpreter does next to nothing per job
                if self._worker.usable:
                    scores, overlaps = await loop.run_in_executor(
                        self._executor, self._worker.score, ranker, rows, served, budgets
                    )
                else:
                    score = functools.partial(score_rows, ranker.run, ranker.vocab, ranker.max_history)
                    ready = ready_within(self.served_work, budgets)
                    scores, overlaps = await loop.run_in_executor(
                        self._in_process, functools.partial(score, rows, served, ready=ready)
                    )
            except Exception:
                log.exception("shadow %s failed on a batch of %d", ranker.model_version, len(batch))
                for job in batch:
                    self._shed(job, "failed")
                continue
            version = ranker.model_version
            overlap = self.metrics.shadow_overlap.labels(model_version=version)
            for job, job_scores, share in zip(batch, scores, overlaps, strict=True):
                if job_scores is None:  # the served work kept the CPU past its age
                    self._shed(job, "too_old")
                    continue
                self.scored += 1
                self.metrics.shadow_scored.labels(model_version=version).inc()
                if share is not None:
                    overlap.observe(share)
                if self.impressions is not None:
                    self.impressions.offer_shadow(
                        ShadowAnswered(
                            job.impression_id,
                            job.ts,
                            job.user_id,
                            version,
                            job.candidates,
                            job_scores,
                            job.served_order,
                        )
                    )


class ShadowWorker:
    """The idle-class scoring process (`service.shadow_worker`): started at the first call, again after it
    died; each ranker's graph loaded into it once (the bytes this process verified), unloaded once the
    ranker is gone. `score` blocks (call it from a thread); one call at a time. With `served_work` the worker
    is handed it (its file descriptors) and gives way to the served graph calls it counts."""

    def __init__(self, served_work: ServedWork | None = None) -> None:
        self._served_work = served_work
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._keys: weakref.WeakKeyDictionary[Ranker, str] = weakref.WeakKeyDictionary()
        self._loaded: set[str] = set()
        self._next = 0
        self._closed = False
        self.usable = True  # False once a worker could not be started at all: the fallback runs
        self.starts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "service.shadow_worker"]
        fds: tuple[int, ...] = ()
        if self._served_work is not None:
            count_fd, idle_fd = self._served_work.fds
            fds = (count_fd,) if idle_fd < 0 else (count_fd, idle_fd)
            argv += ["--served-fd", str(count_fd), "--served-idle-fd", str(idle_fd)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,  # `-m` imports `service` from there
                close_fds=True,
                pass_fds=fds,
            )
        except OSError as e:
            self.usable = False
            log.warning("shadow scoring runs in this process: its worker could not start (%s)", e)
            raise
        self.starts += 1
        self._loaded.clear()
        return proc

    def _call(self, proc: subprocess.Popen[bytes], request: tuple[Any, ...]) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        write_frame(proc.stdin, request)
        reply = read_frame(proc.stdout)
        if reply is None:
            raise RuntimeError(f"the shadow worker exited (status {proc.poll()})")
        status, value = reply
        if status != "ok":
            raise RuntimeError(f"the shadow worker: {value}")
        return value

    def score(
        self,
        ranker: Ranker,
        rows: list[tuple[list[str], tuple[str, ...]]],
        served: list[np.ndarray],
        budgets: list[float] | None = None,
    ) -> tuple[list[np.ndarray | None], list[float | None]]:
        """`score_rows` of `ranker`'s graph, in the worker: each row's ctr and overlap. Giving way to the
        served work, row i waits for it `budgets[i]` seconds at most (default 60), then is given up
        (None)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the shadow worker is closed")
            proc = self._proc
            try:
                if proc is None or proc.poll() is not None:
                    self._kill()  # a worker that died: its pipes closed
                    proc = self._proc = self._start()
                for gone in self._loaded - set(self._keys.values()):  # rankers since unloaded
                    self._call(proc, ("unload", gone))
                    self._loaded.discard(gone)
                key = self._keys.get(ranker)
                if key is None:
                    key = self._keys[ranker] = f"{ranker.model_version}#{self._next}"
                    self._next += 1
                if key not in self._loaded:
                    graph = (
                        ranker.bundle.int8_bytes if ranker.precision == "int8" else ranker.bundle.graph_bytes
                    )
                    self._call(
                        proc, ("load", key, graph, ranker.providers, ranker.vocab.ids, ranker.max_history)
                    )
                    self._loaded.add(key)
                budgets = [60.0] * len(rows) if budgets is None else budgets
                scores, overlaps = self._call(proc, ("score", key, rows, served, budgets))
                return scores, overlaps
            except (OSError, ValueError) as e:  # the pipe broke: the worker is gone; the next call starts one
                self._kill()
                raise RuntimeError(f"the shadow worker is gone: {e}") from e

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()

    def close(self) -> None:
        """Stop the worker (never waits for a call in progress: killing it ends that call with EOF)."""
        self._closed = True
        self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None


def _idle_priority(threads: set[int]) -> None:
    """The fallback thread: noted (raised again at stop), then at the idle class as the worker is."""
    threads.add(threading.get_native_id())
    idle_priority()
