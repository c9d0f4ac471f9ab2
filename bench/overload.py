"""Overload benchmark: `din serve` offered 1x, 2x and 5x its measured capacity, open loop.

Capacity is measured first (closed loop, `--connections` clients), then each level runs; all of it
`--rounds` times (the share of capacity moves between runs on a shared VM: the median is reported,
with every round's figure). Then requests arrive at a fixed
rate whatever the answers (the load generator does not slow down when the server does; it is the lean
client of `loadtest.rawhttp`, on the same cores as the server): goodput (200s
per second), the latency of the 200s against the deadline (DIN_REQUEST_TIMEOUT_MS), how fast the shed
503s come back, and anything else that came back. Same model, data and request shape as bench/e2e.py.

    python bench/overload.py                 # JSON in bench/results/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# a sibling script (bench/ is not a package: the scripts run as `python bench/NAME.py`)
from e2e import ROOT, bench_data, cpu_line, din_serve, ensure_model, running, write_report

from loadtest.closedloop import run_closed, run_open
from service.ports import free_port


def _ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(samples: list[tuple[float, float, str]], seconds: float) -> dict[str, Any]:
    ok = [lat for _, lat, s in samples if s == "200"]
    shed = [lat for _, lat, s in samples if s == "503"]
    other: dict[str, int] = {}
    for _, _, s in samples:
        if s not in ("200", "503"):
            other[s] = other.get(s, 0) + 1
    return {
        "sent": len(samples),
        "goodput": len(ok) / seconds,
        "ok": len(ok),
        "ok_p50_ms": _ms(ok, 50),
        "ok_p99_ms": _ms(ok, 99),
        "ok_max_ms": max(ok) if ok else None,
        "shed": len(shed),
        "shed_p50_ms": _ms(shed, 50),
        "shed_p99_ms": _ms(shed, 99),
        "other": other,
    }


def run_levels(
    url: str, mix: Any, levels: list[float], capacity: float, seconds: float, rnd: int
) -> list[dict[str, Any]]:
    """Offer each level (a multiple of `capacity`) open loop for `seconds`: one row per level."""
    rows = []
    for k, level in enumerate(levels):
        rate = level * capacity
        payloads = mix.payloads(int(rate * seconds), seed=10 + k + 100 * rnd)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        samples = asyncio.run(run_open(url, payloads, rate=rate))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"round": rnd + 1, "level": level, "offered": rate, **summarise(samples, seconds)}
        # the load generator's own share of the machine (it runs on the server's cores)
        used = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        row["generator_cores"] = used / seconds
        row["capacity"] = capacity
        row["goodput_share"] = row["goodput"] / capacity
        rows.append(row)
        print(f"  {level:g}x offered: goodput {row['goodput']:,.1f} req/s, {row['shed']:,} shed")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".din" / "demo")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--connections", type=int, default=8, help="closed-loop clients for the capacity")
    ap.add_argument("--seconds", type=float, default=10.0, help="per load level")
    ap.add_argument("--levels", default="1,2,5", help="offered load, as multiples of the capacity")
    ap.add_argument("--timeout-ms", type=float, default=250.0, help="DIN_REQUEST_TIMEOUT_MS")
    ap.add_argument("--rounds", type=int, default=3, help="capacity then every level, this many times")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = ap.parse_args(argv)

    print(f"machine: {cpu_line()}")
    _, bundle = ensure_model(args.workdir, epochs=1)
    levels = [float(x) for x in args.levels.split(",")]
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="din-bench-") as tmp,
        bench_data(bundle, args.users, args.candidates) as (redis_url, mix, _),
    ):
        port = free_port()
        cmd = din_serve(bundle, redis_url, "--request-timeout-ms", str(args.timeout_ms), "--port", str(port))
        with running("din-rank", cmd, port, Path(tmp)) as url:
            asyncio.run(run_closed(url, mix.payloads(50, seed=99), connections=2, duration=2.0))
            for rnd in range(args.rounds):
                payloads = mix.payloads(2000, seed=1)
                closed = asyncio.run(
                    run_closed(url, payloads, connections=args.connections, duration=args.seconds)
                )
                capacity = closed.throughput
                print(f"round {rnd + 1}: capacity (closed loop x{args.connections}): {capacity:,.1f} req/s")
                rows += run_levels(url, mix, levels, capacity, args.seconds, rnd)

    header = (
        "round",
        "generator cores",
        "offered",
        "req/s",
        "goodput",
        "of capacity",
        "200 p50",
        "200 p99",
        "200 max",
        "503s",
        "503 p50",
        "503 p99",
        "other",
    )
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        table.append(
            (
                str(r["round"]),
                f"{r['generator_cores']:.2f}",
                f"{r['level']:g}x",
                f"{r['offered']:,.0f}",
                f"{r['goodput']:,.1f}",
                f"{r['goodput_share']:.0%}",
                *(
                    f"{r[k]:,.0f}" if r[k] is not None else "-"
                    for k in ("ok_p50_ms", "ok_p99_ms", "ok_max_ms")
                ),
                f"{r['shed']:,}",
                *(f"{r[k]:,.1f}" if r[k] is not None else "-" for k in ("shed_p50_ms", "shed_p99_ms")),
                str(sum(r["other"].values())),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"\ndeadline {args.timeout_ms:g} ms; latencies in ms from the scheduled send")
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    # The share of capacity moves between runs on a shared VM: the median over rounds, with its range.
    summary = []
    for level in levels:
        shares = sorted(r["goodput_share"] for r in rows if r["level"] == level)
        summary.append({"level": level, "median_share": float(np.median(shares)), "shares": shares})
        spread = ", ".join(f"{x:.0%}" for x in shares)
        print(f"{level:g}x: goodput {np.median(shares):.0%} of capacity (median of {len(shares)}: {spread})")
    report = {
        "machine": cpu_line(),
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/overload.py", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds,
        "summary": summary,
        "deadline_ms": args.timeout_ms,
        "candidates": args.candidates,
        "levels": rows,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
