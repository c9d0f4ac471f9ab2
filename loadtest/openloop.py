"""`din loadtest`: an open-loop load generator for POST /rank, with the server's own phase timings.

Requests are sent at a constant arrival rate on a fixed schedule, and each latency is measured from
the request's *scheduled* send time, not from when it actually left: a server (or a client) that
falls behind cannot hide its tail by slowing the sender down (coordinated omission). The request
mix is realistic: seeded user ids (plus a share of unknown ones), a lognormal number of candidates
drawn from the bundle's items (plus a share of unknown ones). /metrics is scraped before and after,
and the deltas give the server-side mean Redis / queue / inference times and batch sizes.

This module is the runner (one constant-rate step, the find-max ramp) and the `din loadtest`
command (`add_arguments` / `run`, dispatched by `cli`); the request mix is `loadtest.sampling`, the
/metrics deltas `loadtest.metrics`, the tables, report.json and plot `loadtest.report`.

    din loadtest --url http://127.0.0.1:8000 --rate 100 --duration 10 --reviews RAW/reviews.json.gz \
        --bundle BUNDLE --out runs/loadtest
    din loadtest ... --find-max --p99-ms 50     # highest rate whose p99 meets the objective
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from loadtest.metrics import Samples, parse_metrics, server_phases
from loadtest.report import (
    StepResult,
    fmt,
    format_step,
    percentiles,
    step_header,
    step_row,
    write_plot,
    write_report,
)
from loadtest.sampling import DEFAULT_USER_RANGE, Mix, load_ids

# ---------------------------------------------------------------------------------------- the generator


async def _scrape(client: Any, url: str) -> Samples | None:
    try:
        r = await client.get(url + "/metrics", timeout=5.0)
        return parse_metrics(r.text) if r.status_code == 200 else None
    except Exception:
        return None


async def run_step(
    url: str,
    rate: float,
    duration: float,
    payloads: list[bytes],
    *,
    connections: int = 64,
    timeout: float = 5.0,
) -> StepResult:
    """Send len(payloads) requests at `rate`/s on a fixed schedule; latency from the scheduled time."""
    import httpx

    url = url.rstrip("/")
    n = len(payloads)
    result = StepResult(offered_rate=rate, duration_s=duration, requests=n)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # The pool wait counts towards latency (it is measured from the schedule); `timeout` bounds it all.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        before = await _scrape(client, url)
        lags: list[float] = []
        records: list[tuple[float, float, str]] = [(0.0, 0.0, "")] * n
        headers = {"content-type": "application/json"}
        loop = asyncio.get_running_loop()

        async def one(i: int, t_sched: float) -> None:
            status = "error"
            try:
                async with asyncio.timeout_at(t_sched + timeout):
                    r = await client.post(url + "/rank", content=payloads[i], headers=headers)
                    await r.aread()
                    status = str(r.status_code)
            except TimeoutError:
                status = "timeout"
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.ConnectError:
                status = "connect_error"
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records[i] = (t_sched - t0, (loop.time() - t_sched) * 1000.0, status)

        tasks = []
        t0 = loop.time() + 0.05
        for i in range(n):
            t_sched = t0 + i / rate
            delay = t_sched - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, loop.time() - t_sched) * 1000.0)
            tasks.append(asyncio.create_task(one(i, t_sched)))
        await asyncio.gather(*tasks)
        wall = max(loop.time() - t0, 1e-9)
        after = await _scrape(client, url)

    result.samples = records
    latencies = [lat for _, lat, _ in records]
    for _, _, status in records:
        if status != "200":
            result.errors[status] = result.errors.get(status, 0) + 1
    result.completed = sum(1 for _, _, s in records if s.isdigit())
    result.ok = sum(1 for _, _, s in records if s == "200")
    result.achieved_rate = result.ok / max(wall, duration)
    result.latency_ms = percentiles(latencies)
    result.send_lag_ms = percentiles(lags)
    if before is not None and after is not None:
        result.server = server_phases(before, after)
    return result


def passes(step: StepResult, p99_ms: float, max_error_rate: float) -> bool:
    """Whether a step met the objective: p99 and error rate within bounds, and the server kept up
    (achieved >= 90% of offered; a p99 alone can look fine while responses fall behind)."""
    p99 = step.latency_ms.get("p99", math.inf)
    return (
        p99 <= p99_ms and step.error_rate <= max_error_rate and step.achieved_rate >= 0.9 * step.offered_rate
    )


def ramp(start_rate: float, max_rate: float, bisect_steps: int) -> Generator[float, bool, float | None]:
    """The find-max search, free of I/O: yields the next rate to try and is sent whether a step at that
    rate met the objective; returns the highest passing rate (None when none did).

    Double from `start_rate` until a step fails or the next rate passes `max_rate` (then try `max_rate`
    itself); if the very first step fails, halve down to start_rate / 8 looking for any passing rate;
    then bisect between the highest pass and the lowest fail, `bisect_steps` times at most, stopping
    once they are within 10%. Drive it with `search` (a plain predicate) or `find_max` (real steps).
    """
    lo, hi = 0.0, math.inf  # highest passing rate so far (0: none), lowest failing rate (inf: none)
    rate = start_rate
    while rate <= max_rate:
        if (yield rate):
            lo = rate
            rate *= 2
        else:
            hi = rate
            break
    # The first step failed: halve a few times to find a passing rate at all.
    while lo == 0 and rate > start_rate / 8:
        rate /= 2
        if (yield rate):
            lo = rate
        else:
            hi = rate
    if math.isinf(hi) and 0 < lo < max_rate:
        if (yield max_rate):
            lo = max_rate
        else:
            hi = max_rate
    for _ in range(bisect_steps):
        if math.isinf(hi) or lo == 0 or (hi - lo) / lo < 0.1:
            break
        mid = (lo + hi) / 2
        if (yield mid):
            lo = mid
        else:
            hi = mid
    return lo if lo > 0 else None


def search(
    attempt: Callable[[float], bool], *, start_rate: float, max_rate: float, bisect_steps: int
) -> float | None:
    """Run `ramp` with a synchronous `attempt(rate) -> passed`; the highest passing rate or None."""
    gen = ramp(start_rate, max_rate, bisect_steps)
    try:
        rate = next(gen)
        while True:
            rate = gen.send(attempt(rate))
    except StopIteration as stop:
        result: float | None = stop.value
        return result


async def find_max(
    url: str,
    mix: Mix,
    *,
    start_rate: float,
    max_rate: float,
    step_duration: float,
    p99_ms: float,
    max_error_rate: float,
    bisect_steps: int,
    max_requests: int,
    connections: int,
    timeout: float,
    seed: int,
    log: Any = print,
) -> tuple[list[StepResult], StepResult | None]:
    """Run `ramp` with real steps of about `step_duration` seconds each. Returns (steps, best): every
    step in the order run, and the passing step with the highest rate (None when none passed)."""
    steps: list[StepResult] = []
    best: StepResult | None = None

    async def attempt(r: float) -> bool:
        nonlocal best
        n = max(1, min(max_requests, round(r * step_duration)))
        # A new seed per step: each step sends fresh bodies, not a replay of the previous one.
        step = await run_step(
            url, r, n / r, mix.payloads(n, seed + len(steps)), connections=connections, timeout=timeout
        )
        steps.append(step)
        ok = passes(step, p99_ms, max_error_rate)
        log(step_row(step, ok))
        if ok and (best is None or r > best.offered_rate):
            best = step
        return ok

    log(step_header())
    # The same loop as `search`, with an await: a generator cannot await, so the driver does.
    gen = ramp(start_rate, max_rate, bisect_steps)
    try:
        rate = next(gen)
        while True:
            rate = gen.send(await attempt(rate))
    except StopIteration:
        pass
    return steps, best


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--rate", type=float, default=50.0, help="offered requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (per step)")
    parser.add_argument("--max-requests", type=int, default=50_000, help="cap on requests per step")
    parser.add_argument("--connections", type=int, default=64, help="HTTP connection pool size")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="per-request timeout (s, from the schedule)"
    )
    parser.add_argument("--seed", type=int, default=0)
    mix = parser.add_argument_group("request mix")
    mix.add_argument("--reviews", type=Path, help="SNAP reviews file: user ids (and item ids) to use")
    mix.add_argument("--users-file", type=Path, help="user ids, one per line")
    mix.add_argument(
        "--user-range", type=int, default=DEFAULT_USER_RANGE, help="without a users source: ids 'user-0..N-1'"
    )
    mix.add_argument("--bundle", type=Path, help="bundle directory: candidate ids from its items.txt")
    mix.add_argument("--items-file", type=Path, help="candidate item ids, one per line")
    mix.add_argument("--candidates", type=int, default=100, help="median candidates per request")
    mix.add_argument("--candidates-sigma", type=float, default=0.5, help="lognormal sigma of the count")
    mix.add_argument("--max-candidates", type=int, default=500, help="cap on candidates per request")
    mix.add_argument("--unknown-users", type=float, default=0.05, help="share of unknown user ids")
    mix.add_argument("--unknown-items", type=float, default=0.02, help="share of unknown candidate ids")
    mix.add_argument("--top-k", type=int, help="top_k in each request")
    fm = parser.add_argument_group("find the highest rate meeting a p99 objective")
    fm.add_argument("--find-max", action="store_true", help="ramp the rate (double, then bisect)")
    fm.add_argument("--p99-ms", type=float, default=50.0, help="p99 objective (ms)")
    fm.add_argument("--max-error-rate", type=float, default=0.001, help="errors allowed per step")
    fm.add_argument("--start-rate", type=float, default=25.0)
    fm.add_argument("--max-rate", type=float, default=5000.0)
    fm.add_argument("--bisect-steps", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/loadtest"), help="report.json + latency.png here"
    )


def build_mix(args: argparse.Namespace) -> tuple[Mix, list[str]]:
    """The request mix from the flags, and notes on where the ids came from."""
    users, items, notes = load_ids(
        reviews=args.reviews,
        users_file=args.users_file,
        bundle=args.bundle,
        items_file=args.items_file,
        user_range=args.user_range,
    )
    mix = Mix(
        users=users,
        items=items,
        candidates=args.candidates,
        candidates_sigma=args.candidates_sigma,
        max_candidates=args.max_candidates,
        unknown_users=args.unknown_users,
        unknown_items=args.unknown_items,
        top_k=args.top_k,
    )
    return mix, notes


def _check(args: argparse.Namespace) -> str | None:
    if args.rate <= 0 or args.duration <= 0 or args.max_requests < 1 or args.connections < 1:
        return "--rate, --duration, --max-requests and --connections must be positive"
    if not (0 <= args.unknown_users <= 1 and 0 <= args.unknown_items <= 1):
        return "--unknown-users and --unknown-items are shares in [0, 1]"
    if args.candidates < 1 or args.max_candidates < 1:
        return "--candidates and --max-candidates must be >= 1"
    if args.find_max and not (0 < args.start_rate <= args.max_rate):
        return "--find-max needs 0 < --start-rate <= --max-rate"
    for path in (args.reviews, args.users_file, args.items_file):
        if path is not None and not path.is_file():
            return f"{path}: no such file"
    if args.bundle is not None and not (args.bundle / "items.txt").is_file():
        return f"{args.bundle}/items.txt: no such file"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"din loadtest: {problem}", file=sys.stderr)
        return 2
    mix, notes = build_mix(args)
    for note in notes:
        print(f"din loadtest: {note}", file=sys.stderr)
    url = args.url.rstrip("/")
    report: dict[str, Any] = {
        "url": url,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "mix": {"users": len(mix.users), "items": len(mix.items), "notes": notes},
    }
    t0 = time.perf_counter()
    if args.find_max:
        steps, best = asyncio.run(
            find_max(
                url,
                mix,
                start_rate=args.start_rate,
                max_rate=args.max_rate,
                step_duration=args.duration,
                p99_ms=args.p99_ms,
                max_error_rate=args.max_error_rate,
                bisect_steps=args.bisect_steps,
                max_requests=args.max_requests,
                connections=args.connections,
                timeout=args.timeout,
                seed=args.seed,
            )
        )
        report["objective"] = {"p99_ms": args.p99_ms, "max_error_rate": args.max_error_rate}
        report["steps"] = [
            s.to_json() | {"passed": passes(s, args.p99_ms, args.max_error_rate)} for s in steps
        ]
        report["max_rate"] = best.offered_rate if best else None
        shown = best or steps[-1]
        print()
        if best is None:
            print(f"no step met p99 <= {args.p99_ms:g} ms; the first step:")
        else:
            print(f"highest rate meeting p99 <= {args.p99_ms:g} ms: {best.offered_rate:,.1f} req/s")
        print(format_step(shown))
        report["result"] = shown.to_json()
    else:
        n = max(1, min(args.max_requests, round(args.rate * args.duration)))
        payloads = mix.payloads(n, args.seed)
        shown = asyncio.run(
            run_step(
                url, args.rate, n / args.rate, payloads, connections=args.connections, timeout=args.timeout
            )
        )
        print(format_step(shown))
        report["result"] = shown.to_json()
    report["wall_s"] = time.perf_counter() - t0

    report_path = write_report(report, args.out)
    title = f"{url}/rank at {shown.offered_rate:,.1f} req/s, p99 {fmt(shown.latency_ms.get('p99'))} ms"
    plotted = write_plot(shown, args.out / "latency.png", title)
    print(f"\nreport: {report_path}" + (f", plot: {args.out / 'latency.png'}" if plotted else ""))
    if shown.ok == 0:
        print("din loadtest: no request succeeded", file=sys.stderr)
        return 1
    return 0
