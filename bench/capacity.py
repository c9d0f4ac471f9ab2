"""Capacity of one replica: the highest request rate one `din serve` sustains with p99 <= 50 ms, for a
few candidate counts; its memory; and the Redis memory one user's history takes. The README's
capacity plan (replicas, Redis shards, memory for a target QPS x candidates and a user count) is
computed from these figures.

Per candidate count: a private redis-server with `--users` full T-item histories (bench/e2e.py's
set-up), `din serve` on it, then `din loadtest`'s open-loop search (requests on a fixed schedule,
latency from the scheduled send) for the highest rate whose p99 meets `--p99-ms` with no errors. The
load generator shares the machine's cores with the server: on a small machine the figures are lower
bounds. Results: a table, and JSON in --out.

    python bench/capacity.py                         # 50, 200, 500 candidates, the demo model
    python bench/capacity.py --candidates 200 --step-duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# a sibling script (bench/ is not a package: the scripts run as `python bench/NAME.py`)
from e2e import ROOT, bench_data, cpu_line, din_serve, ensure_model, max_rate_at_p99, running, write_report

from loadtest.closedloop import run_closed
from loadtest.report import fmt
from service.ports import free_port
from service.store.client import RedisConfig, sync_client
from service.store.keys import history_key


def server_rss_mib(port: int) -> float | None:
    """Peak resident memory (VmHWM) of the process serving `port`, found by its command line."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"serve" in cmd and str(port).encode() in cmd:
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def redis_bytes_per_user(url: str, users: int) -> dict[str, float]:
    """MEMORY USAGE of a few full histories, and the server's used_memory per user."""
    client = sync_client(url, RedisConfig())
    try:
        keys = [history_key("din:", f"bench-user-{u}") for u in range(0, users, max(1, users // 20))]
        sizes = [int(client.memory_usage(k, samples=0) or 0) for k in keys]
        used = int(client.info("memory")["used_memory"])
        empty = 1_000_000  # ~ what an empty redis-server reports; the per-user figure is an upper bound
        return {
            "memory_usage_per_key": sum(sizes) / len(sizes),
            "used_memory_per_user": max(0.0, (used - empty) / users),
        }
    finally:
        client.close()


def measure(bundle: Path, candidates: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with bench_data(bundle, args.users, candidates) as (redis_url, mix, T):
        port = free_port()
        cmd = [*din_serve(bundle, redis_url), "--port", str(port)]
        with running(f"din-serve-{candidates}", cmd, port, log_dir) as url:
            asyncio.run(run_closed(url, mix.payloads(30, seed=99), connections=2, duration=2.0))  # warm up
            closed = asyncio.run(
                run_closed(url, mix.payloads(2000, seed=1), connections=8, duration=args.closed_duration)
            )
            steps, best = max_rate_at_p99(
                url,
                mix,
                closed.throughput,
                args.step_duration,
                args.p99_ms,
                up_to=1.5,
                bisect_steps=args.bisect_steps,
            )
            rss = server_rss_mib(port)
        per_user = redis_bytes_per_user(redis_url, args.users)
    rate = best.offered_rate if best else None
    return {
        "candidates": candidates,
        "max_history": T,
        "closed_loop_rps": closed.throughput,
        "closed_loop_p99_ms": closed.latency_ms.get("p99"),
        "max_rate_at_p99": rate,
        "p99_ms_at_max_rate": best.latency_ms.get("p99") if best else None,
        "candidates_per_s_at_p99": rate * candidates if rate else None,
        "server_peak_rss_mib": rss,
        "redis": per_user,
        "steps": [s.to_json() for s in steps],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir", type=Path, default=ROOT / ".din" / "demo", help="the model (built if missing)"
    )
    ap.add_argument("--epochs", type=int, default=1, help="training epochs when the model is built here")
    ap.add_argument("--candidates", type=int, nargs="+", default=[50, 200, 500])
    ap.add_argument("--users", type=int, default=500, help="users with full histories in Redis")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="the latency objective")
    ap.add_argument("--step-duration", type=float, default=4.0, help="open-loop seconds per rate tried")
    ap.add_argument("--bisect-steps", type=int, default=3)
    ap.add_argument(
        "--closed-duration", type=float, default=5.0, help="closed-loop seconds (the search's start)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "capacity.json")
    args = ap.parse_args(argv)

    machine = cpu_line()
    print(f"machine: {machine}")
    _, bundle = ensure_model(args.workdir, args.epochs)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="din-capacity-") as tmp:
        for n in args.candidates:
            print(f"{n} candidates a request, {args.users} users with full histories", flush=True)
            rows.append(measure(bundle, n, args, Path(tmp)))
    print()
    header = (
        "candidates",
        "closed-loop req/s",
        f"max req/s @ p99<={args.p99_ms:g}ms",
        "candidates/s",
        "RSS MiB",
    )
    table = [header]
    for r in rows:
        table.append(
            (
                str(r["candidates"]),
                fmt(r["closed_loop_rps"]),
                fmt(r["max_rate_at_p99"]),
                fmt(r["candidates_per_s_at_p99"]),
                fmt(r["server_peak_rss_mib"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    per_key = rows[0]["redis"]["memory_usage_per_key"]
    print(f"\nRedis: one full history (T={rows[0]['max_history']}) takes {per_key:,.0f} bytes (MEMORY USAGE)")
    report = {
        "machine": machine,
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/capacity.py", *(argv if argv is not None else sys.argv[1:])]),
        "p99_objective_ms": args.p99_ms,
        "users": args.users,
        "seconds": time.perf_counter() - t0,
        "results": rows,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
