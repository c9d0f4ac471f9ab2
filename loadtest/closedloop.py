"""Closed-loop load: `connections` clients, each sending its next request as soon as the previous one
answered, for a fixed time. It measures a server's throughput at a fixed concurrency (what `make
bench` compares services with); for latency under a given arrival rate use the open-loop runner
(`loadtest.openloop`), which does not slow down when the server does."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.report import percentiles


@dataclass
class ClosedLoopResult:
    connections: int
    duration_s: float
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Successful answers per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


async def run_closed(
    url: str, payloads: list[bytes], *, connections: int = 8, duration: float = 10.0, timeout: float = 10.0
) -> ClosedLoopResult:
    """POST the payloads (cycled) to URL/rank from `connections` clients for `duration` seconds."""
    import httpx

    url = url.rstrip("/") + "/rank"
    bodies = itertools.cycle(payloads)
    latencies: list[float] = []
    result = ClosedLoopResult(connections=connections, duration_s=duration)
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        start = time.perf_counter()
        stop = start + duration

        async def worker() -> None:
            while (t0 := time.perf_counter()) < stop:
                status = "error"
                try:
                    r = await client.post(url, content=next(bodies), headers=headers)
                    status = str(r.status_code)
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                result.requests += 1
                if status == "200":
                    result.ok += 1
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                else:
                    result.errors[status] = result.errors.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        result.duration_s = time.perf_counter() - start
    result.latency_ms = percentiles(latencies)
    return result
