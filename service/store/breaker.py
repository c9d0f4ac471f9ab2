"""A circuit breaker for a Redis that stopped answering: once a call finds it down, calls fail at once
(the caller degrades) and one background probe asks Redis again, until it answers.

Why: a Redis that vanished (its host or container gone: a connect waits out the whole connect timeout,
a name lookup may wait longer) would otherwise cost every batch the full timeout (twice, with the
stale-connection retry), longer than a request's whole budget, so a replica that could answer
degraded at once sheds instead. With the breaker open no batch waits on Redis at all; the probe runs
on its own, at 0.1 s, then 0.2, 0.4, ... up to `probe_max_s` apart, and the first PING that answers
closes the breaker (every call goes to Redis again). A failure of one key (WRONGTYPE) or an error
reply is Redis answering: it never opens the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("din.redis")


class RedisBreaker:
    """Open (Redis down: fail fast) or closed (ask Redis). Lives on one event loop."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        probe_first_s: float = 0.1,
        probe_max_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """`probe`: True when Redis answers (never raises; bounded by the client's own timeouts).
        `on_change(up)`: called when the breaker opens (False) or closes (True)."""
        self._probe = probe
        self.probe_first_s = probe_first_s
        self.probe_max_s = probe_max_s
        self.on_change = on_change
        self.opened_at: float | None = None  # monotonic time it opened; None: closed
        self.reason = ""
        self.opened = 0  # times it opened (an outage, or a blip)
        self._task: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def why(self) -> str:
        """Why a call was not sent (for the log and the degraded counter, not for clients)."""
        assert self.opened_at is not None
        down = time.monotonic() - self.opened_at
        return f"redis down for {down:.1f}s (not asked; probing in the background): {self.reason}"

    def failed(self, reason: str) -> None:
        """A call found Redis not answering (no connection, or no reply in time): open, and probe."""
        if self.opened_at is None:
            self.opened_at = time.monotonic()
            self.reason = reason
            self.opened += 1
            log.warning("redis not answering (%s): calls fail fast until a probe answers", reason)
            if self.on_change is not None:
                self.on_change(False)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probing(), name="redis-probe")

    def succeeded(self) -> None:
        """A call got Redis's answer: close (the probe stops on its own)."""
        if self.opened_at is not None:
            down = time.monotonic() - self.opened_at
            self.opened_at = None
            log.warning("redis answering again after %.1fs", down)
            if self.on_change is not None:
                self.on_change(True)

    async def _probing(self) -> None:
        wait = self.probe_first_s
        while self.open:
            await asyncio.sleep(wait)
            if self.open and await self._probe():
                self.succeeded()
            wait = min(wait * 2, self.probe_max_s)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
