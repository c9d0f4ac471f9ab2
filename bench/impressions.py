"""What the impression log costs: `din serve` with `--log-impressions` against the same service without
it, in one run, at `make bench`'s end-to-end setting (200 candidates, full 100-item histories in Redis).

Each mode runs `--rounds` times, alternating (off, on, off, on, ...), so a drift of the machine over
the run lands on both; every round is a fresh `din serve` on the same Redis and a closed loop of
`--connections` clients for `--duration` seconds. Reported: throughput and p50 / p99 per mode (mean
over rounds), the cost as a throughput ratio and a p99 difference against the targets (at most 5% of
throughput, at most 2 ms of p99), and what the log did (records written, dropped, stream length).

    python bench/impressions.py            # builds a demo-sized model in .din/demo if none is there
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

# a sibling script (bench/ is not a package: the scripts run as `python bench/NAME.py`)
from e2e import ROOT, bench_data, cpu_line, din_serve, ensure_model, running, write_report

from loadtest.closedloop import run_closed
from loadtest.report import fmt
from service.ports import free_port
from service.store.client import RedisConfig, sync_client

MAX_THROUGHPUT_COST = 0.05  # the targets
MAX_P99_COST_MS = 2.0


def _metric(text: str, name: str) -> float:
    """The sum of a counter's samples in a /metrics page (every label set)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"
    )


def _stream_length(redis_url: str) -> int:
    client = sync_client(redis_url, RedisConfig(url=redis_url))
    try:
        return sum(int(client.xlen(key)) for key in client.scan_iter(match="din:log:imp*"))  # type: ignore[union-attr]
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir", type=Path, default=ROOT / ".din" / "demo", help="where the model is (or is built)"
    )
    ap.add_argument("--users", type=int, default=500, help="users with full histories in Redis")
    ap.add_argument("--candidates", type=int, default=200, help="candidates a request")
    ap.add_argument("--connections", type=int, default=8, help="closed-loop clients")
    ap.add_argument("--duration", type=float, default=12.0, help="closed-loop seconds per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per mode (alternating)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "impressions.json")
    args = ap.parse_args(argv)

    print(f"machine: {cpu_line()}")
    _, bundle = ensure_model(args.workdir, 1)
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with (
        tempfile.TemporaryDirectory(prefix="din-bench-") as tmp,
        bench_data(bundle, args.users, args.candidates) as (redis_url, mix, T),
    ):
        print(f"{args.users} users x {T} behaviours in Redis, {args.candidates} candidates a request")
        for r in range(args.rounds):
            for mode in ("off", "on"):
                flags = ["--log-impressions"] if mode == "on" else []
                port = free_port()
                with running(
                    f"din-rank-{mode}",
                    [*din_serve(bundle, redis_url, *flags), "--port", str(port)],
                    port,
                    Path(tmp),
                ) as url:
                    asyncio.run(run_closed(url, mix.payloads(30, seed=99), connections=2, duration=2.0))
                    closed = asyncio.run(
                        run_closed(
                            url,
                            mix.payloads(2000, seed=1),
                            connections=args.connections,
                            duration=args.duration,
                        )
                    )
                    metrics = httpx.get(url + "/metrics", timeout=5).text
                row = {
                    "throughput": closed.throughput,
                    "p50_ms": closed.latency_ms.get("p50"),
                    "p99_ms": closed.latency_ms.get("p99"),
                    "errors": sum((closed.errors or {}).values()),
                    "logged": _metric(metrics, "din_impressions_logged_total"),
                    "dropped": _metric(metrics, "din_impressions_dropped_total"),
                }
                rounds[mode].append(row)
                print(
                    f"  round {r + 1}, logging {mode}: {row['throughput']:,.1f} req/s, "
                    f"p50 {fmt(row['p50_ms'])} ms, p99 {fmt(row['p99_ms'])} ms, errors {row['errors']}, "
                    f"logged {row['logged']:.0f}, dropped {row['dropped']:.0f}",
                    flush=True,
                )
        stream_length = _stream_length(redis_url)

    mean = {
        mode: {
            k: statistics.fmean(float(x[k] or 0) for x in rows) for k in ("throughput", "p50_ms", "p99_ms")
        }
        for mode, rows in rounds.items()
    }
    cost = 1 - mean["on"]["throughput"] / mean["off"]["throughput"]
    p99_cost = mean["on"]["p99_ms"] - mean["off"]["p99_ms"]
    logged = sum(x["logged"] for x in rounds["on"])
    dropped = sum(x["dropped"] for x in rounds["on"])
    print()
    print(f"{'logging':<8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}   (mean of {args.rounds} rounds)")
    for mode in ("off", "on"):
        m = mean[mode]
        print(f"{mode:<8} {m['throughput']:>9,.1f} {fmt(m['p50_ms']):>7} {fmt(m['p99_ms']):>7}")
    errors = sum(x["errors"] for rows in rounds.values() for x in rows)
    holds = cost <= MAX_THROUGHPUT_COST and p99_cost <= MAX_P99_COST_MS and not errors
    print(
        f"\ncost of logging: {cost:+.1%} throughput (target <= {MAX_THROUGHPUT_COST:.0%}), "
        f"{p99_cost:+.2f} ms p99 (target <= {MAX_P99_COST_MS:g} ms), {errors} errors: "
        f"{'holds' if holds else 'MISSES'}"
    )
    print(
        f"log: {logged:.0f} impressions written, {dropped:.0f} dropped, "
        f"{stream_length} in the stream (trimmed)"
    )
    report = {
        "machine": cpu_line(),
        "python": platform.python_version(),
        "command": " ".join(
            ["python", "bench/impressions.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "users": args.users,
        "max_history": T,
        "candidates": args.candidates,
        "connections": args.connections,
        "rounds": rounds,
        "mean": mean,
        "throughput_cost": cost,
        "p99_cost_ms": p99_cost,
        "targets": {"throughput_cost": MAX_THROUGHPUT_COST, "p99_cost_ms": MAX_P99_COST_MS},
        "holds": holds,
        "logged": logged,
        "dropped": dropped,
        "stream_length": stream_length,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
