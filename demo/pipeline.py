"""`din demo`: synthetic data -> prepare -> train -> export -> embedded Redis -> seed -> serve, end to end.

Every stage writes into --workdir (default .din/demo) and is skipped when its output is already
there, so a second run goes straight to serving. Stages write to a `.partial` directory first and
rename it when they succeed: an interrupted stage never looks done. Serving is `din serve` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contracts.errors import StageFailed
from contracts.vocab import Vocab, read_vocab

DEFAULT_WORKDIR = ".din/demo"
# The default `din synth` set (about 120k reviews, 220k training samples): two epochs train in
# about a minute on a 2-core machine and reach a test AUC near 0.91 (README, Measured results).
DEMO_USERS = 4000
DEMO_ITEMS = 3000
DEMO_EPOCHS = 2
SEED_MARKER = "seeded.json"


@dataclass
class StageResult:
    name: str
    seconds: float
    reused: bool
    output: str


@dataclass
class Demo:
    """Where a demo lives, and what each stage did."""

    workdir: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def raw(self) -> Path:
        return self.workdir / "raw"

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle"

    @property
    def redis_data(self) -> Path:
        return self.workdir / "redis"

    def stage(
        self, name: str, output: Path | str, done: Callable[[], bool], work: Callable[[], None]
    ) -> None:
        t0 = time.perf_counter()
        reused = done()
        if reused:
            print(f"din demo: {name}: reusing {output}", flush=True)
        else:
            print(f"din demo: {name} -> {output}", flush=True)
            work()
        self.stages.append(StageResult(name, time.perf_counter() - t0, reused, str(output)))

    def table(self) -> str:
        lines = [f"{'stage':<8} {'seconds':>8}  {'':<7} output"]
        for s in self.stages:
            lines.append(f"{s.name:<8} {s.seconds:>8.1f}  {'reused' if s.reused else 'ran':<7} {s.output}")
        total = sum(s.seconds for s in self.stages)
        lines.append(f"{'total':<8} {total:>8.1f}")
        return "\n".join(lines)


def _din(*argv: str) -> None:
    """Run one `din` subcommand in a child process (torch's memory goes away with it)."""
    cmd = [sys.executable, "-m", "cli", *argv]
    if argv[0] in ("synth", "prepare", "train") and not sys.stderr.isatty():
        cmd.append("--no-progress")
    code = subprocess.call(cmd)
    if code != 0:
        raise StageFailed(f"`din {' '.join(argv)}` failed with exit code {code}")


def _atomic(final: Path, make: Callable[[Path], None]) -> None:
    """make(partial) then rename partial -> final."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    make(partial)
    partial.rename(final)


def build(demo: Demo, *, users: int, items: int, epochs: int, seed: int) -> None:
    """Synth, prepare, train and export: each stage only when its output is missing."""
    demo.workdir.mkdir(parents=True, exist_ok=True)
    demo.stage(
        "synth",
        demo.raw,
        lambda: (demo.raw / "reviews.json.gz").is_file() and (demo.raw / "meta.json.gz").is_file(),
        lambda: _atomic(
            demo.raw,
            lambda p: _din(
                "synth", "--out", str(p), "--users", str(users), "--items", str(items), "--seed", str(seed)
            ),
        ),
    )
    demo.stage(
        "prepare",
        demo.data,
        lambda: (demo.data / "meta.json").is_file(),
        lambda: _atomic(
            demo.data,
            lambda p: _din(
                "prepare",
                "--reviews",
                str(demo.raw / "reviews.json.gz"),
                "--meta",
                str(demo.raw / "meta.json.gz"),
                "--out",
                str(p),
                "--seed",
                str(seed),
            ),
        ),
    )
    demo.stage(
        "train",
        demo.run_dir,
        lambda: (demo.run_dir / "checkpoint.pt").is_file(),
        lambda: _atomic(
            demo.run_dir,
            lambda p: _din(
                "train",
                "--data",
                str(demo.data),
                "--out",
                str(p),
                "--epochs",
                str(epochs),
                "--seed",
                str(seed),
            ),
        ),
    )
    demo.stage(
        "export",
        demo.bundle,
        lambda: (demo.bundle / "manifest.json").is_file(),
        lambda: _atomic(demo.bundle, lambda p: _din("export", str(demo.run_dir), "--out", str(p))),
    )


def example_request(demo: Demo, n_candidates: int = 5) -> dict[str, object]:
    """A /rank body with a real seeded user and real item ids of the bundle."""
    users = read_vocab(demo.data / "users.txt")
    items = Vocab.from_file(demo.bundle / "items.txt").known()
    step = max(1, len(items) // n_candidates)
    return {"user_id": users[0], "candidates": items[::step][:n_candidates], "top_k": 3}


def seed(demo: Demo, redis_url: str | None, prefix: str, cluster: bool = False) -> str | None:
    """Seed the users' histories into Redis (embedded in workdir/redis unless a URL is given).

    Returns the URL of a server that is still running (someone else's) or None."""
    from service.store.client import RedisConfig, redis_endpoint, sync_client
    from service.store.keys import history_key

    manifest = json.loads((demo.bundle / "manifest.json").read_text())
    max_history = int(manifest["max_history"])
    user = str(example_request(demo)["user_id"])
    marker = demo.workdir / SEED_MARKER
    reviews = demo.raw / "reviews.json.gz"
    cfg = RedisConfig(url=redis_url, data_dir=demo.redis_data, prefix=prefix, cluster=cluster)
    # A `din demo` / `din serve` already running on the data dir: use that server. A private one
    # started here stops (its data flushed) before `din serve` starts its own on the same dir.
    with redis_endpoint(cfg, share_running=True) as endpoint:
        client = sync_client(endpoint.url, cfg)
        try:
            seeded = marker.is_file() and bool(client.exists(history_key(prefix, user)))
        finally:
            client.close()
        demo.stage(
            "seed",
            endpoint.url if redis_url else demo.redis_data,
            lambda: seeded,
            lambda: _seed(reviews, endpoint.url, max_history, prefix, marker, cluster),
        )
    return None if endpoint.private else endpoint.url


def _seed(reviews: Path, url: str, max_history: int, prefix: str, marker: Path, cluster: bool) -> None:
    from service.store.seed import seed_reviews

    stats = seed_reviews(reviews, url, max_history, prefix, cluster=cluster)
    print(f"din demo: {stats.summary()}", flush=True)
    marker.write_text(
        json.dumps({"reviews": str(reviews), "prefix": prefix, "max_history": max_history}) + "\n"
    )


def curl_command(body: dict[str, object], host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/rank"
    return f"curl -s -X POST {url} -H 'content-type: application/json' -d {shlex.quote(json.dumps(body))}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="where every stage writes"
    )
    parser.add_argument("--users", type=int, default=DEMO_USERS, help="synthetic users")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS, help="synthetic items")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on")
    parser.add_argument("--redis-url", help="use this Redis instead of the embedded one in WORKDIR/redis")
    parser.add_argument(
        "--redis-cluster", action="store_true", help="--redis-url names one node of a Redis Cluster"
    )
    parser.add_argument("--prefix", default="din:", help="Redis key prefix")
    parser.add_argument("--fresh", action="store_true", help="delete WORKDIR first: redo every stage")
    parser.add_argument("--no-serve", action="store_true", help="stop after seeding")


def run(args: argparse.Namespace) -> int:
    if min(args.users, args.items, args.epochs) < 1:
        print("din demo: --users, --items and --epochs must be >= 1", file=sys.stderr)
        return 2
    if args.redis_cluster and not args.redis_url:
        print("din demo: --redis-cluster needs --redis-url (a node of the cluster)", file=sys.stderr)
        return 2
    workdir: Path = args.workdir
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    demo = Demo(workdir)
    t0 = time.perf_counter()
    try:
        build(demo, users=args.users, items=args.items, epochs=args.epochs, seed=args.seed)
        running = seed(demo, args.redis_url, args.prefix, args.redis_cluster)
    except StageFailed as exc:
        print(f"din demo: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # redis / file problems: one clear line
        print(f"din demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"\n{demo.table()}\n(ready in {time.perf_counter() - t0:.1f}s)\n")

    serve_argv = ["--bundle", str(demo.bundle), "--host", args.host, "--port", str(args.port)]
    redis_url = args.redis_url or running
    serve_argv += ["--redis-url", redis_url] if redis_url else ["--redis-data", str(demo.redis_data)]
    serve_argv += ["--redis-cluster"] if args.redis_cluster else []
    serve_argv += ["--log-impressions"]  # the demo shows the loop's first half: what was shown, logged
    curl = curl_command(example_request(demo), args.host, args.port)
    if args.no_serve:
        print("serve it with:\n  din serve " + " ".join(shlex.quote(a) for a in serve_argv))
        print(f"then try:\n  {curl}")
        return 0
    print(
        f"serving on http://{args.host}:{args.port} (Ctrl-C to stop). Once ready, try:\n\n  {curl}\n",
        flush=True,
    )

    from service import server  # the very code path of `din serve`

    parser = argparse.ArgumentParser(prog="din serve")
    server.add_arguments(parser)
    os.environ.setdefault("DIN_LOG_LEVEL", "INFO")
    try:
        return int(server.run(parser.parse_args(serve_argv)) or 0)
    except KeyboardInterrupt:
        return 0
