"""`din loadtest`: an open-loop load generator for POST /rank, with the server's own phase timings.

Requests are sent at a constant arrival rate on a fixed schedule, and each latency is measured from
the request's *scheduled* send time, not from when it actually left: a server (or a client) that
falls behind cannot hide its tail by slowing the sender down (coordinated omission). The request
mix is realistic: seeded user ids (plus a share of unknown ones), a lognormal number of candidates
drawn from the bundle's items (plus a share of unknown ones). /metrics is scraped before and after,
and the deltas give the server-side mean Redis / queue / inference times and batch sizes.

    din loadtest --url http://127.0.0.1:8000 --rate 100 --duration 10 --reviews RAW/reviews.json.gz \
        --bundle BUNDLE --out runs/loadtest
    din loadtest ... --find-max --p99-ms 50     # highest rate whose p99 meets the objective
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from model.data import read_vocab

PERCENTILES = (50, 90, 95, 99)
# Server histograms whose (sum, count) deltas give a mean per phase: (label, metric, label filter, unit).
PHASES: tuple[tuple[str, str, dict[str, str], str], ...] = (
    ("server /rank (end to end)", "din_request_latency_seconds", {"route": "/rank"}, "ms"),
    ("redis history read", "din_redis_latency_seconds", {}, "ms"),
    ("queue wait (per request)", "din_queue_wait_seconds", {}, "ms"),
    ("inference (per batch)", "din_inference_latency_seconds", {}, "ms"),
    ("batch size (requests)", "din_batch_requests", {}, "x"),
    ("batch size (candidates)", "din_batch_candidates", {}, "x"),
)
COUNTERS = ("din_degraded_responses", "din_queue_rejections", "din_batch_failures")


# ---------------------------------------------------------------------------------------- request mix


@dataclass
class Mix:
    """What the generated /rank requests look like."""

    users: list[str]
    items: list[str]
    candidates: int = 100  # median candidates per request
    candidates_sigma: float = 0.5  # lognormal spread (0 = always `candidates`)
    max_candidates: int = 500
    unknown_users: float = 0.05
    unknown_items: float = 0.02
    top_k: int | None = None

    def payloads(self, n: int, seed: int) -> list[bytes]:
        """n request bodies, generated up front so building them never delays a send."""
        rng = random.Random(seed)
        mu = math.log(max(1, self.candidates))
        out = []
        for i in range(n):
            if not self.users or rng.random() < self.unknown_users:
                user = f"loadtest-unknown-user-{seed}-{i}"
            else:
                user = rng.choice(self.users)
            k = (
                round(rng.lognormvariate(mu, self.candidates_sigma))
                if self.candidates_sigma > 0
                else self.candidates
            )
            k = max(1, min(self.max_candidates, k))
            if len(self.items) >= k:
                cands = rng.sample(self.items, k)
            elif self.items:
                cands = rng.choices(self.items, k=k)
            else:
                cands = [f"loadtest-unknown-item-{j}" for j in range(k)]
            cands = [
                f"loadtest-unknown-item-{rng.randrange(10**9)}" if rng.random() < self.unknown_items else c
                for c in cands
            ]
            body: dict[str, Any] = {"user_id": user, "candidates": cands}
            if self.top_k is not None:
                body["top_k"] = self.top_k
            out.append(orjson.dumps(body))
        return out


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def ids_from_reviews(path: Path, limit: int = 200_000) -> tuple[list[str], list[str]]:
    """Distinct (user ids, item ids) of a SNAP reviews file (JSON lines, .gz or plain)."""
    users: dict[str, None] = {}
    items: dict[str, None] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = orjson.loads(line)
            if isinstance(row, dict):
                if isinstance(row.get("reviewerID"), str):
                    users[row["reviewerID"]] = None
                if isinstance(row.get("asin"), str):
                    items[row["asin"]] = None
            if len(users) >= limit and len(items) >= limit:
                break
    return list(users), list(items)


def items_from_bundle(bundle: Path) -> list[str]:
    """The bundle's item ids (items.txt without the <pad> and <oov> lines)."""
    return read_vocab(bundle / "items.txt")[2:]


# ---------------------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, match: dict[str, str]
) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all((k, x) in labels for k, x in match.items())
    )


def server_phases(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[str, Any]:
    """Means of the server's phase histograms over the run (delta of _sum / delta of _count)."""
    phases = []
    for label, metric, match, unit in PHASES:
        count = _total(after, metric + "_count", match) - _total(before, metric + "_count", match)
        total = _total(after, metric + "_sum", match) - _total(before, metric + "_sum", match)
        mean = total / count if count > 0 else None
        if mean is not None and unit == "ms":
            mean *= 1000.0
        phases.append({"phase": label, "metric": metric, "count": int(count), "mean": mean, "unit": unit})
    counters = {}
    for name in COUNTERS:
        counters[name] = _total(after, name + "_total", {}) - _total(before, name + "_total", {})
    return {"phases": phases, "counters": counters}


# ---------------------------------------------------------------------------------------- the generator


@dataclass
class StepResult:
    """One constant-rate run."""

    offered_rate: float
    duration_s: float
    requests: int
    completed: int = 0
    ok: int = 0
    achieved_rate: float = 0.0  # successful responses per second over the whole step
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # actual - scheduled send (client health)
    server: dict[str, Any] | None = None
    # per request, for plots: scheduled offset (s), latency (ms), status ("200", "503", "timeout", ...)
    samples: list[tuple[float, float, str]] = field(default_factory=list, repr=False)

    @property
    def error_rate(self) -> float:
        return 1.0 - self.ok / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        d["error_rate"] = self.error_rate
        return d


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}
    out.update(min=float(a.min()), mean=float(a.mean()), max=float(a.max()))
    return out


async def _scrape(client: Any, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
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
    result.latency_ms = _percentiles(latencies)
    result.send_lag_ms = _percentiles(lags)
    if before is not None and after is not None:
        result.server = server_phases(before, after)
    return result


def passes(step: StepResult, p99_ms: float, max_error_rate: float) -> bool:
    p99 = step.latency_ms.get("p99", math.inf)
    return (
        p99 <= p99_ms and step.error_rate <= max_error_rate and step.achieved_rate >= 0.9 * step.offered_rate
    )


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
    """Double the rate until the objective fails (or max_rate), then bisect. Returns (steps, best)."""
    steps: list[StepResult] = []
    best: StepResult | None = None
    lo, hi = 0.0, math.inf
    rate = start_rate

    async def attempt(r: float) -> bool:
        nonlocal best
        n = max(1, min(max_requests, round(r * step_duration)))
        step = await run_step(
            url, r, n / r, mix.payloads(n, seed + len(steps)), connections=connections, timeout=timeout
        )
        steps.append(step)
        ok = passes(step, p99_ms, max_error_rate)
        log(_step_row(step, ok))
        if ok and (best is None or r > best.offered_rate):
            best = step
        return ok

    log(_step_header())
    while rate <= max_rate:
        if await attempt(rate):
            lo = rate
            rate *= 2
        else:
            hi = rate
            break
    # The first step failed: halve a few times to find a passing rate at all.
    while lo == 0 and rate > start_rate / 8:
        rate /= 2
        if await attempt(rate):
            lo = rate
        else:
            hi = rate
    if math.isinf(hi) and 0 < lo < max_rate:
        if await attempt(max_rate):
            lo = max_rate
        else:
            hi = max_rate
    for _ in range(bisect_steps):
        if math.isinf(hi) or lo == 0 or (hi - lo) / lo < 0.1:
            break
        mid = (lo + hi) / 2
        if await attempt(mid):
            lo = mid
        else:
            hi = mid
    return steps, best


# ---------------------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _step_header() -> str:
    return f"{'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}  ok"


def _step_row(s: StepResult, ok: bool) -> str:
    lat = s.latency_ms
    return (
        f"{s.offered_rate:>10,.1f} {s.achieved_rate:>10,.1f} {_fmt(lat.get('p50')):>8} "
        f"{_fmt(lat.get('p99')):>8} {_fmt(lat.get('max')):>8} {s.requests - s.ok:>7}  {'yes' if ok else 'NO'}"
    )


def format_step(s: StepResult) -> str:
    lat = s.latency_ms
    lines = [
        f"requests   {s.requests:,} in {s.duration_s:.1f}s: offered {s.offered_rate:,.1f}/s, "
        f"achieved {s.achieved_rate:,.1f}/s ({s.ok:,} ok)",
        "latency ms (from the scheduled send time)",
        "  " + "  ".join(f"{k} {_fmt(lat.get(k))}" for k in ("p50", "p90", "p95", "p99", "max")),
    ]
    if s.send_lag_ms.get("p99", 0.0) > 5.0:
        lines.append(
            f"  note: the generator itself sent late (p99 lag {s.send_lag_ms['p99']:.1f} ms): "
            "client-bound, latencies include that"
        )
    if s.errors:
        lines.append("errors     " + ", ".join(f"{k}: {v:,}" for k, v in sorted(s.errors.items())))
    else:
        lines.append("errors     none")
    if s.server is None:
        lines.append("server     /metrics not available")
    else:
        lines.append(f"{'server phase':<28} {'count':>8} {'mean':>10}")
        for p in s.server["phases"]:
            unit = " ms" if p["unit"] == "ms" else ""
            lines.append(f"{p['phase']:<28} {p['count']:>8,} {_fmt(p['mean'], 2) + unit:>10}")
        extra = {k: v for k, v in s.server["counters"].items() if v}
        if extra:
            lines.append("counters   " + ", ".join(f"{k} +{v:,.0f}" for k, v in extra.items()))
    return "\n".join(lines)


def write_plot(step: StepResult, path: Path, title: str) -> bool:
    """Latency over time + CDF as a PNG. False (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "din loadtest: matplotlib is not installed (pip install 'din-rank[dev]'): no plot written",
            file=sys.stderr,
        )
        return False
    t = np.array([s[0] for s in step.samples])
    lat = np.array([s[1] for s in step.samples])
    ok = np.array([s[2] == "200" for s in step.samples], dtype=bool)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.scatter(t[ok], lat[ok], s=4, alpha=0.5, label="200")
    if (~ok).any():
        ax1.scatter(t[~ok], lat[~ok], s=6, color="red", label="error")
    for p, style in ((50, ":"), (99, "--")):
        v = step.latency_ms.get(f"p{p}")
        if v is not None:
            ax1.axhline(v, linestyle=style, color="gray", linewidth=1, label=f"p{p} {v:.1f} ms")
    ax1.set_xlabel("scheduled send time (s)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("latency over time")
    xs = np.sort(lat)
    ys = np.arange(1, len(xs) + 1) / max(1, len(xs))
    ax2.plot(xs, ys)
    ax2.set_xscale("log")
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title("CDF")
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    mix.add_argument("--user-range", type=int, default=1000, help="without a users source: ids 'user-0..N-1'")
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
    notes = []
    users: list[str] = []
    items: list[str] = []
    if args.reviews is not None:
        users, items = ids_from_reviews(args.reviews)
        notes.append(f"{len(users):,} users and {len(items):,} items from {args.reviews}")
    if args.users_file is not None:
        users = _read_lines(args.users_file)
        notes.append(f"{len(users):,} users from {args.users_file}")
    if args.bundle is not None:
        items = items_from_bundle(args.bundle)
        notes.append(f"{len(items):,} items from {args.bundle}/items.txt")
    if args.items_file is not None:
        items = _read_lines(args.items_file)
        notes.append(f"{len(items):,} items from {args.items_file}")
    if not users:
        users = [f"user-{i}" for i in range(args.user_range)]
        notes.append(f"no users source: ids user-0..{args.user_range - 1} (probably unknown to the server)")
    if not items:
        notes.append("no items source (--bundle / --items-file / --reviews): every candidate is unknown")
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

    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    title = f"{url}/rank at {shown.offered_rate:,.1f} req/s, p99 {_fmt(shown.latency_ms.get('p99'))} ms"
    plotted = write_plot(shown, args.out / "latency.png", title)
    print(f"\nreport: {report_path}" + (f", plot: {args.out / 'latency.png'}" if plotted else ""))
    if shown.ok == 0:
        print("din loadtest: no request succeeded", file=sys.stderr)
        return 1
    return 0
