"""Micro-batcher: concurrent /rank requests share one Redis round trip and one ONNX Runtime call.

The shape of text-embeddings-inference (its queue.rs apart from its infer.rs) and Ray Serve's
`@serve.batch`, in two halves with one owner each, joined here by one consumer task:
- `service.rank_queue.RankQueue`: admission, deadlines, and grouping requests into batches, one lane
  per model version (a request carries an asyncio future and waits in a bounded deque; a full queue
  refuses at once; a batch closes when the queued candidates fill the budget, or when the oldest
  request has waited `max_delay` *and* an inference slot is free);
- `service.inference.Inference`: a batch's history reads (one pipelined round trip), the thread pool
  that runs the model (`workers` calls at once, while the consumer already collects the next batch),
  explanations, and delivery. Every answer carries the history it was scored on and its version.

Deadlines (admission control): every request carries its deadline. At the door, a request whose
expected wait (the candidates ahead of it, drained by `workers` calls at once, and its own, at the
median cost per candidate of recent calls, plus a Redis read) would not fit in half the time left
is shed at once with 503 overloaded + Retry-After, instead of queueing work that would be late
anyway; so the queue never holds more than half a budget's worth of work. A caller stops waiting
at its deadline (503 overloaded, reason timeout), and a request whose deadline has passed is
dropped when its batch is taken: it is never computed.

Explained requests are a debugging tool and are shed first: their expected wait counts their own
explaining work (items returned x behaviours, at the measured cost per row) and must fit in a quarter
of the time left, not half (503 overloaded, reason `explain`), so under load they are refused while
the requests that do not explain are still admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from contracts.errors import Overloaded, ShuttingDown
from service.costs import Costs
from service.inference import HistorySource, Inference, RankResult
from service.live import DEFAULT_MODEL, ModelSet
from service.metrics import Metrics
from service.rank_queue import CANNOT_MEET_DEADLINE, Job, RankQueue

_SHUTTING_DOWN = "the service is shutting down; retry on another replica"
_EXPLAIN_SHED = (
    "explanations are shed first under load and this one would not fit its deadline; retry shortly, "
    "or rank without explain"
)


class Batcher:
    """The queue and inference joined: `submit` admits a request into the queue, one consumer task
    hands each batch the queue closes to inference and frees its slot when it is done."""

    def __init__(
        self,
        models: ModelSet,
        store: HistorySource,
        metrics: Metrics,
        *,
        max_delay_s: float,
        max_candidates: int,
        queue_max: int,
        max_inflight: int = 1,
        workers: int = 1,
    ) -> None:
        self.models = models
        self.store = store
        self.metrics = metrics
        self.queue = RankQueue(
            metrics,
            lambda name: models.get(name).costs,
            max_delay_s=max_delay_s,
            max_candidates=max_candidates,
            queue_max=queue_max,
            max_inflight=max_inflight,
            workers=workers,
        )
        self.inference = Inference(models, store, metrics, workers=workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._closing = False

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
        for job in self.queue.drain():
            if not job.future.done():
                job.future.set_exception(ShuttingDown(_SHUTTING_DOWN))
        self.inference.shutdown()

    # ---------------------------------------------------------------- what the queue and inference say

    @property
    def depth(self) -> int:
        return self.queue.depth

    @property
    def inflight(self) -> int:
        return self.queue.inflight

    @property
    def batches(self) -> int:
        return self.inference.batches

    @property
    def costs(self) -> Costs:
        """The default member's recent costs."""
        return self.models.default.costs

    def admits(self, deadline: float, candidates: int | None = None, explain_rows: int = 0) -> bool:
        """`RankQueue.admits`: the one admission rule, here and at the door (service.middleware)."""
        return self.queue.admits(deadline, candidates, explain_rows)

    def expected_wait(self, candidates: int, explain_rows: int = 0) -> float:
        return self.queue.expected_wait(candidates, explain_rows)

    def shed(self, reason: str, message: str = CANNOT_MEET_DEADLINE) -> Overloaded:
        return self.queue.shed(reason, message)

    # ---------------------------------------------------------------- producer side

    async def submit(
        self,
        user_id: str,
        candidates: list[str],
        history: list[str] | None,
        deadline: float | None = None,
        *,
        explain: bool = False,
        top_k: int | None = None,
        model: str = DEFAULT_MODEL,
    ) -> RankResult:
        """Queue one request and wait for its scores (and with `explain`, the contributions behind the
        best `top_k` of them, or all) from the member `model`, until `deadline` (time.perf_counter()).

        Raises Overloaded at once when the queue is full or the request cannot be answered by its
        deadline (an explained one: with its explaining work, in a quarter of the time left), and when
        the deadline passes while it waits."""
        if self._closing:
            raise ShuttingDown(_SHUTTING_DOWN)
        now = time.perf_counter()
        deadline = deadline if deadline is not None else now + 3600.0
        if self.queue.full:
            raise self.shed(
                "queue_full", f"the ranking queue is full ({self.queue.queue_max} requests waiting)"
            )
        if not self.queue.admits(deadline, len(candidates), model=model):
            raise self.shed("deadline", CANNOT_MEET_DEADLINE)
        returned = len(candidates) if top_k is None else min(top_k, len(candidates))
        rows = returned * self.models.get(model).current.max_history if explain else 0
        if explain and not self.queue.admits(deadline, len(candidates), rows, model):
            raise self.shed("explain", _EXPLAIN_SHED)
        future: asyncio.Future[RankResult] = asyncio.get_running_loop().create_future()
        job = Job(user_id, candidates, history, future, now, deadline, explain, top_k, rows, model)
        self.queue.put(job)
        try:
            # a caller that goes away (or times out) cancels the future; the batcher skips it
            async with asyncio.timeout(deadline - time.perf_counter()):
                return await job.future
        except TimeoutError:
            raise self.shed("timeout", "the request's deadline passed before it could be answered") from None

    # ---------------------------------------------------------------- the consumer

    async def _consume(self) -> None:
        while True:
            batch = await self.queue.next_batch()
            if not batch:  # every job taken had been cancelled by its caller
                continue
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Job]) -> None:
        try:
            await self.inference.run(batch)
        finally:
            self.queue.finished(batch)
