"""End-to-end benchmark: din-rank against the seed-style baseline, over real Redis and real HTTP.

Measured in one run, on one machine, with the same trained checkpoint (din-rank serves its exported
bundle, the baseline its PyTorch checkpoint) and the same Redis data: `--users` users with full
T-item histories, `--candidates` candidates a request.

1. Closed loop, `--connections` clients: throughput, p50 / p99, errors; for din-rank, the baseline
   (bench/baseline_service.py) and the HTTP floor (bench/floor_service.py: the same stack answering
   with a constant). Ratios from the same run.
2. Open loop (`din loadtest`'s runner): the highest arrival rate whose p99 stays under `--p99-ms`,
   for din-rank and the baseline.

The load generator runs on the same cores as the servers (on a 2-core machine it takes a good share
of them): absolute figures are lower bounds, ratios are what to compare. Results: a table, and JSON
in --out.

    python bench/e2e.py                      # builds a demo-sized model in .din/demo if none is there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contracts.vocab import Vocab
from loadtest.closedloop import ClosedLoopResult, run_closed
from loadtest.openloop import find_max
from loadtest.report import fmt
from loadtest.sampling import Mix
from service import child
from service.ports import free_port
from service.store.client import RedisConfig, sync_client
from service.store.embedded import EmbeddedRedis
from service.store.keys import history_key

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def cpu_line() -> str:
    """The CPU model and its vector extensions (figures differ between AVX2 and AVX-512 machines)."""
    model, flags = platform.processor() or "?", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni")
    return f"{model}, {os.cpu_count()} cores, " + " ".join(f for f in wanted if f in flags)


def ensure_model(workdir: Path, epochs: int) -> tuple[Path, Path]:
    """(run dir, bundle) of a demo-sized model, built with `din demo`'s stages when missing."""
    from demo.pipeline import DEMO_ITEMS, DEMO_USERS, Demo, build

    demo = Demo(workdir)
    if not (demo.bundle / "manifest.json").is_file() or not (demo.run_dir / "checkpoint.pt").is_file():
        print(f"building a model in {workdir} (din demo's stages)...", flush=True)
        build(demo, users=DEMO_USERS, items=DEMO_ITEMS, epochs=epochs, seed=0)
    return demo.run_dir, demo.bundle


def seed_full_histories(url: str, users: int, items: list[str], T: int, seed: int) -> list[str]:
    """`users` users, each with a full history of T distinct items (newest first)."""
    rng = random.Random(seed)
    ids = [f"bench-user-{u}" for u in range(users)]
    client = sync_client(url, RedisConfig())
    try:
        with client.pipeline(transaction=False) as pipe:
            for user in ids:
                key = history_key("din:", user)
                pipe.delete(key)
                pipe.rpush(key, *rng.sample(items, T))
            pipe.execute()
    finally:
        client.close()
    return ids


@contextlib.contextmanager
def bench_data(bundle: Path, users: int, candidates: int) -> Iterator[tuple[str, Mix, int]]:
    """A private redis-server holding `users` full histories, and the request mix over them (every
    request: a seeded user, `candidates` distinct known items). Yields (Redis URL, mix, T).

    The server keeps nothing on disk (no append-only file, no snapshots; as the Redis most of these
    machines run): the benchmarks measure the service. With persistence on, the impression log's writes
    (~2.7 MB/s at 200 answers a second) set off an AOF rewrite every 64 MB, a child process writing the
    whole dataset that takes a core from everything on a small box for a second: a cost of Redis's
    persistence, landing on whichever round it falls in (README, impression log)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    T = int(manifest["max_history"])
    items = Vocab.from_file(bundle / "items.txt").known()
    with (
        tempfile.TemporaryDirectory(prefix="din-bench-") as tmp,
        EmbeddedRedis(Path(tmp) / "redis", port=0, unix_socket=False, appendonly=False) as redis_server,
    ):
        ids = seed_full_histories(redis_server.url, users, items, T, seed=0)
        mix = Mix(
            users=ids,
            items=items,
            candidates=candidates,
            candidates_sigma=0.0,
            max_candidates=candidates,
            unknown_users=0.0,
            unknown_items=0.0,
        )
        yield redis_server.url, mix, T


def din_serve(bundle: Path, redis_url: str, *flags: str) -> list[str]:
    """The `din serve` command the benchmarks run (no access log: the generator reads no pipe)."""
    return [
        PYTHON,
        "-m",
        "cli",
        "serve",
        "--bundle",
        str(bundle),
        "--redis-url",
        redis_url,
        "--log-level",
        "WARNING",
        *flags,
    ]


@contextlib.contextmanager
def running(name: str, cmd: list[str], port: int, log_dir: Path) -> Iterator[str]:
    """Start a server process, wait for /readyz, yield its URL, stop it."""
    url = f"http://127.0.0.1:{port}"
    log = log_dir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIN_")}
    try:
        with child.serving(name, cmd, url, log, env=env, cwd=ROOT):
            yield url
    except child.NotReady as e:
        raise RuntimeError(f"{e}:\n{log.read_text()[-2000:]}") from None


def max_rate_at_p99(
    url: str,
    mix: Mix,
    closed_rps: float,
    step_duration: float,
    p99_ms: float,
    *,
    up_to: float = 2.0,
    bisect_steps: int = 3,
) -> tuple[list[Any], Any]:
    """The open-loop search for the highest rate with p99 under `p99_ms` and no error, between half
    the closed-loop rate and `up_to` times it (`loadtest.openloop.find_max`): (steps, best or None)."""
    return asyncio.run(
        find_max(
            url,
            mix,
            start_rate=max(5.0, closed_rps / 2),
            max_rate=max(10.0, closed_rps * up_to),
            step_duration=step_duration,
            p99_ms=p99_ms,
            max_error_rate=0.0,
            bisect_steps=bisect_steps,
            max_requests=5000,
            connections=64,
            timeout=5.0,
            seed=7,
            log=lambda line: print("    " + line, flush=True),
        )
    )


def add_workload_options(ap: argparse.ArgumentParser, *, duration: float, duration_help: str) -> None:
    """The workload options the end-to-end benchmarks share; the defaults are `make bench`'s setting."""
    ap.add_argument(
        "--workdir", type=Path, default=ROOT / ".din" / "demo", help="where the model is (or is built)"
    )
    ap.add_argument("--users", type=int, default=500, help="users with full histories in Redis")
    ap.add_argument("--candidates", type=int, default=200, help="candidates a request")
    ap.add_argument("--connections", type=int, default=8, help="closed-loop clients")
    ap.add_argument("--duration", type=float, default=duration, help=duration_help)


def warm_up(url: str, mix: Mix) -> None:
    """2 closed-loop clients for 2 s: what every measured round starts with."""
    asyncio.run(run_closed(url, mix.payloads(30, seed=99), connections=2, duration=2.0))


def closed_loop(url: str, mix: Mix, connections: int, duration: float) -> ClosedLoopResult:
    """A warm-up (`warm_up`), then `connections` closed-loop clients for `duration` seconds."""
    warm_up(url, mix)
    return asyncio.run(
        run_closed(url, mix.payloads(2000, seed=1), connections=connections, duration=duration)
    )


def measure(name: str, url: str, mix: Mix, args: argparse.Namespace, open_loop: bool) -> dict[str, Any]:
    closed = closed_loop(url, mix, args.connections, args.duration)
    print(
        f"  {name}: closed loop x{args.connections}: {closed.throughput:,.1f} req/s, "
        f"p50 {fmt(closed.latency_ms.get('p50'))} ms, p99 {fmt(closed.latency_ms.get('p99'))} ms, "
        f"errors {closed.errors or 0}",
        flush=True,
    )
    out: dict[str, Any] = {"closed_loop": closed.to_json()}
    if open_loop:
        steps, best = max_rate_at_p99(url, mix, closed.throughput, args.step_duration, args.p99_ms)
        out["open_loop"] = {
            "p99_objective_ms": args.p99_ms,
            "max_rate": best.offered_rate if best else None,
            "best": best.to_json() if best else None,
            "steps": [s.to_json() for s in steps],
        }
    return out


def write_report(out: Path, report: dict[str, Any]) -> None:
    """A benchmark's JSON report, where `make bench` keeps them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap, duration=15.0, duration_help="closed-loop seconds per service")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs when the model is built here")
    ap.add_argument("--step-duration", type=float, default=4.0, help="open-loop seconds per rate tried")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="open-loop objective")
    ap.add_argument("--no-open-loop", action="store_true", help="closed loop only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    args = ap.parse_args(argv)

    print(f"machine: {cpu_line()}")
    run_dir, bundle = ensure_model(args.workdir, args.epochs)
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="din-bench-") as tmp,
        bench_data(bundle, args.users, args.candidates) as (redis_url, mix, T),
    ):
        print(f"{args.users} users x {T} behaviours in Redis, {args.candidates} candidates a request")
        services = {
            "din-rank": din_serve(bundle, redis_url),
            "baseline": [
                PYTHON,
                "bench/baseline_service.py",
                "--run",
                str(run_dir),
                "--redis-url",
                redis_url,
            ],
            "http floor": [PYTHON, "bench/floor_service.py"],
        }
        for name, cmd in services.items():
            port = free_port()
            with running(name, [*cmd, "--port", str(port)], port, Path(tmp)) as url:
                results[name] = measure(
                    name, url, mix, args, open_loop=not args.no_open_loop and name != "http floor"
                )

    ours, base, floor = (results[k]["closed_loop"] for k in ("din-rank", "baseline", "http floor"))
    ratio = ours["throughput"] / base["throughput"] if base["throughput"] else float("inf")
    rows = [
        ("service", "req/s", "p50 ms", "p99 ms", "errors", f"max rate @ p99<{args.p99_ms:g}ms"),
    ]
    for name in ("din-rank", "baseline", "http floor"):
        c = results[name]["closed_loop"]
        ol = results[name].get("open_loop") or {}
        rows.append(
            (
                name,
                f"{c['throughput']:,.1f}",
                fmt(c["latency_ms"].get("p50")),
                fmt(c["latency_ms"].get("p99")),
                str(sum(c["errors"].values())),
                fmt(ol.get("max_rate")) if ol else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print(
            "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        )
    print(f"\ndin-rank / baseline throughput: {ratio:.1f}x (closed loop, {args.connections} connections)")
    share = floor["throughput"] and ours["throughput"] / floor["throughput"]
    print(f"din-rank / HTTP floor throughput: {share:.2f} (1.0 = the model and Redis cost nothing)")
    report = {
        "machine": cpu_line(),
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/e2e.py", *(argv if argv is not None else sys.argv[1:])]),
        "users": args.users,
        "max_history": T,
        "candidates": args.candidates,
        "connections": args.connections,
        "ratio_vs_baseline": ratio,
        "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
