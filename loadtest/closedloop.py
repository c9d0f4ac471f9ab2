"""Lean load for benchmarks, over `loadtest.rawhttp` (a generator on the server's cores costs it little).

- `run_closed`: `connections` clients, each sending its next request as soon as the previous one
  answered, for a fixed time: a server's throughput at a fixed concurrency (what `make bench` compares
  services with).
- `run_open`: requests at a fixed arrival rate whatever the answers, latency from the scheduled time:
  behaviour under overload (`bench/overload.py`). `din loadtest` is the full-featured open-loop tool.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.rawhttp import RawClient
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
    """POST the payloads (cycled) to URL/rank from `connections` clients for `duration` seconds, over
    the lean client (`loadtest.rawhttp`): little of the machine goes to the load itself."""
    client = RawClient(url, max_connections=connections)
    requests = itertools.cycle([client.request_bytes("/rank", body) for body in payloads])
    latencies: list[float] = []
    result = ClosedLoopResult(connections=connections, duration_s=duration)
    start = time.perf_counter()
    stop = start + duration

    async def worker() -> None:
        while (t0 := time.perf_counter()) < stop:
            try:
                async with asyncio.timeout(timeout):
                    status = str((await client.send(next(requests)))[0])
            except TimeoutError:
                status = "timeout"
            except (OSError, asyncio.IncompleteReadError) as exc:
                status = type(exc).__name__
            result.requests += 1
            if status == "200":
                result.ok += 1
                latencies.append((time.perf_counter() - t0) * 1000.0)
            else:
                result.errors[status] = result.errors.get(status, 0) + 1

    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
    finally:
        await client.close()
    result.duration_s = time.perf_counter() - start
    result.latency_ms = percentiles(latencies)
    return result


async def run_open(
    url: str, payloads: list[bytes], *, rate: float, connections: int = 256, timeout: float = 10.0
) -> list[tuple[float, float, str]]:
    """Send the payloads at `rate` per second on a fixed schedule, whatever the answers (open loop),
    over the lean client. Returns (scheduled offset s, latency ms from the scheduled time, status) per
    request in the order they were sent (answers may come back in another), so a generator or server
    that falls behind cannot hide it (no coordinated omission)."""
    client = RawClient(url, max_connections=connections)
    loop = asyncio.get_running_loop()
    out: list[tuple[float, float, str]] = []

    async def one(request: bytes, t_sched: float) -> None:
        try:
            async with asyncio.timeout_at(t_sched + timeout):
                status = str((await client.send(request))[0])
        except TimeoutError:
            status = "timeout"
        except (OSError, asyncio.IncompleteReadError) as exc:
            status = type(exc).__name__
        out.append((t_sched - t0, (loop.time() - t_sched) * 1000.0, status))

    requests = [client.request_bytes("/rank", body) for body in payloads]
    tasks = []
    t0 = loop.time() + 0.05
    try:
        for i, request in enumerate(requests):
            t_sched = t0 + i / rate
            if (delay := t_sched - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, t_sched)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return sorted(out)
