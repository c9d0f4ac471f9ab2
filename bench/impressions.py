"""What the impression log costs: `din serve` with `--log-impressions` against the same service without
it, in one run, at `make bench`'s end-to-end setting (200 candidates, full 100-item histories in Redis).

Two `din serve` processes per mode run side by side on the same Redis (started once: a start costs
more than a round); rounds, `--rounds` per mode, go in blocks of off, on, on, off (then on, off, off,
on, ...), so that a drift of the machine over the run lands on both modes alike, each mode's rounds
taking its two processes in turn. A round is a closed loop of `--connections` clients for `--duration`
seconds on one process (after a 2 s warm-up), the others idle.

Reported, per mode: throughput, p50 and p99, each the median over its rounds (a round that a neighbour
on the machine slowed moves a median less than a mean); the cost: the throughput ratio and the p99
difference of the medians, against the targets (at most 5% of throughput, at most 2 ms of p99); and the
noise floor: the same figures between the two halves of the logging-off rounds (one off process's
rounds against the other's), i.e. how far apart two sets of rounds of the *same* service land on this
machine in this run (a cautious figure: each half has half the rounds). A cost below its noise floor is not
resolved: the run cannot tell it from nothing. Also
what the log did (records written, dropped, stream length).

    python bench/impressions.py            # builds a demo-sized model in .din/demo if none is there
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

# a sibling script (bench/ is not a package: the scripts run as `python bench/NAME.py`)
from e2e import (
    ROOT,
    add_workload_options,
    bench_data,
    closed_loop,
    cpu_line,
    din_serve,
    ensure_model,
    running,
    write_report,
)

from loadtest.report import fmt
from service.ports import free_port
from service.store.client import RedisConfig, sync_client

MAX_THROUGHPUT_COST = 0.05  # the targets
MAX_P99_COST_MS = 2.0
FIGURES = ("throughput", "p50_ms", "p99_ms")


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


def schedule(rounds: int) -> list[str]:
    """The modes in the order they run: blocks of (off, on, on, off) and (on, off, off, on), alternating,
    `rounds` of each mode (an odd count ends on a plain off, on pair)."""
    order: list[str] = []
    blocks = (("off", "on", "on", "off"), ("on", "off", "off", "on"))
    for b in range(rounds // 2):
        order.extend(blocks[b % 2])
    if rounds % 2:
        order.extend(("off", "on"))
    return order


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(float(x[k] or 0) for x in rows) for k in FIGURES}


def cost(on: dict[str, float], off: dict[str, float]) -> tuple[float, float]:
    """(throughput lost, as a fraction of `off`'s; p99 added, ms)."""
    return 1 - on["throughput"] / off["throughput"], on["p99_ms"] - off["p99_ms"]


def noise_floor(off_rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The 'cost' of logging off against logging off: the median of alternate off rounds (one off
    process's) against the others' (absolute values). None with fewer than 2 off rounds."""
    if len(off_rows) < 2:
        return None
    throughput, p99 = cost(medians(off_rows[0::2]), medians(off_rows[1::2]))
    spread = [float(x["p99_ms"] or 0) for x in off_rows]
    return {
        "throughput_cost": abs(throughput),
        "p99_cost_ms": abs(p99),
        "p99_ms_min": min(spread),
        "p99_ms_max": max(spread),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap, duration=8.0, duration_help="closed-loop seconds per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per mode (interleaved: off,on,on,off,...)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "impressions.json")
    args = ap.parse_args(argv)

    print(f"machine: {cpu_line()}")
    _, bundle = ensure_model(args.workdir, 1)
    order = schedule(args.rounds)
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with (
        tempfile.TemporaryDirectory(prefix="din-bench-") as tmp,
        bench_data(bundle, args.users, args.candidates) as (redis_url, mix, T),
    ):
        print(
            f"{args.users} users x {T} behaviours in Redis, {args.candidates} candidates a request; "
            f"{len(order)} rounds of {args.duration:g} s: {', '.join(order)}"
        )
        servers: dict[str, list[str]] = {"off": [], "on": []}
        with contextlib.ExitStack() as stack:
            for name in ("off", "on", "on", "off"):
                flags = ["--log-impressions"] if name == "on" else []
                port = free_port()
                cmd = [*din_serve(bundle, redis_url, *flags), "--port", str(port)]
                label = f"din-rank-{name}-{len(servers[name]) + 1}"
                servers[name].append(stack.enter_context(running(label, cmd, port, Path(tmp))))
            for r, mode in enumerate(order):
                url = servers[mode][len(rounds[mode]) % 2]
                before = httpx.get(url + "/metrics", timeout=5).text
                closed = closed_loop(url, mix, args.connections, args.duration)
                after = httpx.get(url + "/metrics", timeout=5).text
                row = {
                    "round": r + 1,
                    "process": len(rounds[mode]) % 2 + 1,
                    "throughput": closed.throughput,
                    "p50_ms": closed.latency_ms.get("p50"),
                    "p99_ms": closed.latency_ms.get("p99"),
                    "errors": sum((closed.errors or {}).values()),
                    **{
                        what: _metric(after, name) - _metric(before, name)
                        for what, name in (
                            ("logged", "din_impressions_logged_total"),
                            ("dropped", "din_impressions_dropped_total"),
                        )
                    },
                }
                rounds[mode].append(row)
                print(
                    f"  round {r + 1:>2}, logging {mode:<3} ({row['process']}): "
                    f"{row['throughput']:,.1f} req/s, p50 {fmt(row['p50_ms'])} ms, "
                    f"p99 {fmt(row['p99_ms'])} ms, errors {row['errors']}, "
                    f"logged {row['logged']:.0f}, dropped {row['dropped']:.0f}",
                    flush=True,
                )
            time.sleep(1.0)  # the last records on their way
            totals = [httpx.get(url + "/metrics", timeout=5).text for url in servers["on"]]
        stream_length = _stream_length(redis_url)

    median = {mode: medians(rows) for mode, rows in rounds.items()}
    mean = {
        mode: {k: statistics.fmean(float(x[k] or 0) for x in rows) for k in FIGURES}
        for mode, rows in rounds.items()
    }
    throughput_cost, p99_cost = cost(median["on"], median["off"])
    floor = noise_floor(rounds["off"])
    logged = sum(_metric(text, "din_impressions_logged_total") for text in totals)
    dropped = sum(_metric(text, "din_impressions_dropped_total") for text in totals)
    errors = sum(x["errors"] for rows in rounds.values() for x in rows)

    print()
    print(f"{'logging':<8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7}   (median of {args.rounds} rounds)")
    for mode in ("off", "on"):
        m = median[mode]
        print(f"{mode:<8} {m['throughput']:>9,.1f} {fmt(m['p50_ms']):>7} {fmt(m['p99_ms']):>7}")
    holds = throughput_cost <= MAX_THROUGHPUT_COST and p99_cost <= MAX_P99_COST_MS and not errors
    print(
        f"\ncost of logging: {throughput_cost:+.1%} throughput (target <= {MAX_THROUGHPUT_COST:.0%}), "
        f"{p99_cost:+.2f} ms p99 (target <= {MAX_P99_COST_MS:g} ms), {errors} errors: "
        f"{'holds' if holds else 'MISSES'}"
    )
    resolves = None
    if floor is not None:
        resolves = floor["p99_cost_ms"] <= MAX_P99_COST_MS
        print(
            f"noise floor (off process 1's rounds against off process 2's): "
            f"{floor['throughput_cost']:.1%} throughput, {floor['p99_cost_ms']:.2f} ms p99 "
            f"(off rounds' p99 from {floor['p99_ms_min']:.1f} to {floor['p99_ms_max']:.1f} ms): "
            + (
                f"a {MAX_P99_COST_MS:g} ms p99 difference is above it"
                if resolves
                else f"this run cannot resolve {MAX_P99_COST_MS:g} ms of p99 (more rounds, a quieter machine)"
            )
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
        "duration_s": args.duration,
        "order": order,
        "rounds": rounds,
        "median": median,
        "mean": mean,
        # since the interleaved rounds: from the medians (before: from the means of 2 rounds each)
        "throughput_cost": throughput_cost,
        "p99_cost_ms": p99_cost,
        "noise_floor": floor,
        "resolves_p99_target": resolves,
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
