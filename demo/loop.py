"""`din loop-demo` (`make loop-demo`): one turn of the loop, end to end, on the embedded Redis.

1. The demo model (`din demo`'s stages, reused when built) is served by `din serve --log-impressions`
   in a child process, on a private redis-server under OUT (its own, seeded with the synth users).
2. Simulated users (`din simulate`'s world and click model) rank and click: first in the world the
   model was trained on ("before drift"), then in the drifted world ("after drift": the model is
   stale), one Simulation throughout, so every user's history carries on.
3. `din log export` labels what was shown with the clicks; `din train --from-log --since DRIFT
   --init BUNDLE --valid-seconds S` retrains the live model on the impressions logged since the drift
   (the last S seconds validate); `din promote` puts it live only if it beats its parent there.
4. The same users go on ("after one turn") with whatever model is live.

It prints online CTR and AUC per phase, how much of the CTR the drift took that the turn won back,
and writes into OUT (default .din/loop): loop.json (per phase, per window, the promotion, the new
bundle's lineage), loop.png (the plot), outcomes.jsonl (every request: user, impression id, what was
shown with its scores, what was clicked), log/ (the exported impressions), retrained/ (the run and
its bundle), serve.log. Every step is the real command's code path:
the service over HTTP, the exporter against Redis, `din train` and `din promote` as child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.errors import InvalidArgument, StageFailed
from demo.pipeline import DEFAULT_WORKDIR, DEMO_EPOCHS, DEMO_ITEMS, DEMO_USERS, Demo, build
from loop.simulate import DRIFT_KINDS
from service import child
from service.ports import free_port

DEFAULT_LOOP_DIR = ".din/loop"
PREFIX = "din:"
EXPORT_WINDOW_S = 10.0  # the simulated users click within the step (its HTTP timeout is 10 s)
READY_TIMEOUT_S = 180.0


@dataclass
class LoopConfig:
    rate: float = 100.0  # simulated requests per second
    before_s: float = 20.0
    after_s: float = 60.0  # 6,000 answers, 60,000 logged rows: the turn's training data
    again_s: float = 30.0
    candidates: int = 50
    top_k: int = 10
    relevant: float = 0.2
    drift_kind: str = "trend"  # what minutes of traffic can teach (README: rings need far more)
    drift_fraction: float = 1.0
    drift_seed: int = 1
    seed: int = 0
    epochs: int = 4
    valid_share: float = 0.2  # of the after-drift phase, validates the retrained model
    window_s: float = 5.0
    export_window_s: float = EXPORT_WINDOW_S  # the attribution window of the exports

    def requests(self, seconds: float) -> int:
        return max(1, round(seconds * self.rate))

    def check(self) -> None:
        for name in ("rate", "before_s", "after_s", "again_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise InvalidArgument(f"{flag} must be positive, got {v}")
        if not 0.0 < self.valid_share < 1.0:
            raise InvalidArgument(f"--valid-share must be in (0, 1), got {self.valid_share}")
        if self.epochs < 1:
            raise InvalidArgument(f"--epochs must be at least 1, got {self.epochs}")


@dataclass
class Phase:
    name: str
    first: int  # step range [first, first + count)
    count: int
    model_version: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------- the service, a child process


@contextlib.contextmanager
def serving(bundle: Path, redis_url: str, log_path: Path) -> Iterator[str]:
    """`din serve --log-impressions` on a free port until the context exits (SIGTERM, then wait)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--bundle",
        str(bundle.resolve()),
        "--redis-url",
        redis_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-impressions",
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        with child.serving("din serve", cmd, url, log_path, timeout_s=READY_TIMEOUT_S, poll_s=0.25):
            yield url
    except child.NotReady as e:
        raise StageFailed(str(e)) from None


def live_version(url: str) -> str:
    import httpx

    return str(httpx.get(url + "/model", timeout=10.0).json()["model_version"])


# ---------------------------------------------------------------- the phases


def run_phase(sim: Any, url: str, phase: Phase, progress: bool) -> list[Any]:
    """The phase's steps against the live service; its outcomes in step order."""
    import httpx

    from loop.simulate import http_calls, progress_bar, simulate

    async def go() -> list[Any]:
        cfg = sim.cfg
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        bar, tick = progress_bar(phase.count, phase.name, enabled=progress)

        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as c:
            rank, events = http_calls(c, url, cfg.top_k)
            outcomes, _ = await simulate(sim, rank, events, tick, first=phase.first, count=phase.count)
        bar.close()
        return outcomes

    t0 = time.perf_counter()
    outcomes = asyncio.run(go())
    phase.seconds = time.perf_counter() - t0
    return outcomes


def _din(argv: Sequence[str], *, progress: bool) -> None:
    cmd = [sys.executable, "-m", "cli", *argv]
    if not progress:
        cmd.append("--no-progress")
    print("$ din " + " ".join(argv), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise StageFailed(f"`din {' '.join(argv)}` failed with exit code {code}")


def export(redis_url: str, log_dir: Path, window_s: float, progress: bool) -> Any:
    from loop.export import ExportOptions, export_log
    from service.store.client import RedisConfig, sync_client

    time.sleep(window_s + 0.5)  # every impression's window is over
    client = sync_client(redis_url, RedisConfig(url=redis_url, prefix=PREFIX))
    try:
        opts = ExportOptions(window_s=window_s, prefix=PREFIX, progress=progress)
        stats = export_log(client, log_dir, opts)
    finally:
        client.close()
    print(f"$ din log export --out {log_dir} --window-s {window_s:g}")
    print(stats.table(), flush=True)
    return stats


# ---------------------------------------------------------------- the turn


def run_loop(demo: Demo, loop_dir: Path, cfg: LoopConfig, progress: bool = True) -> dict[str, Any]:
    from loop.promote import Refused, Service, promote
    from loop.simulate import SimConfig, Simulation, Tally, load_world
    from service.store.client import RedisConfig, redis_endpoint
    from service.store.seed import seed_reviews

    cfg.check()
    shutil.rmtree(loop_dir, ignore_errors=True)
    loop_dir.mkdir(parents=True)
    log_dir, run_dir = loop_dir / "log", loop_dir / "retrained"
    n1, n2, n3 = cfg.requests(cfg.before_s), cfg.requests(cfg.after_s), cfg.requests(cfg.again_s)
    phases = [
        Phase("before drift", 0, n1),
        Phase("after drift", n1, n2),
        Phase("after one turn", n1 + n2, n3),
    ]
    sim_cfg = SimConfig(
        seed=cfg.seed,
        requests=n1 + n2 + n3,
        rate=cfg.rate,
        candidates=cfg.candidates,
        relevant=cfg.relevant,
        top_k=cfg.top_k,
        drift_step=n1,
        window_s=cfg.window_s,
    )
    world = load_world(
        demo.raw,
        users=None,
        drift_fraction=cfg.drift_fraction,
        drift_seed=cfg.drift_seed,
        drift_kind=cfg.drift_kind,
    )
    sim = Simulation(world, sim_cfg)
    max_history = int(json.loads((demo.bundle / "manifest.json").read_text())["max_history"])
    outcomes: list[Any] = []
    promotion: dict[str, Any] = {}
    redis_cfg = RedisConfig(url=None, data_dir=loop_dir / "redis", prefix=PREFIX)
    with redis_endpoint(redis_cfg) as endpoint:
        stats = seed_reviews(demo.raw / "reviews.json.gz", endpoint.url, max_history, PREFIX)
        print(f"din loop-demo: {stats.summary()}", flush=True)
        with serving(demo.bundle, endpoint.url, loop_dir / "serve.log") as url:
            print(f"din loop-demo: serving {demo.bundle} on {url}, impressions logged", flush=True)
            first, drifted, after = phases
            first.model_version = live_version(url)
            outcomes += run_phase(sim, url, first, progress)
            # yesterday's log: the turn trains on the drift's
            export(endpoint.url, log_dir, cfg.export_window_s, progress)
            drift_ts = time.time()
            drifted.model_version = live_version(url)
            outcomes += run_phase(sim, url, drifted, progress)
            export(endpoint.url, log_dir, cfg.export_window_s, progress)
            valid_s = max(1.0, cfg.valid_share * drifted.seconds)
            _din(
                [
                    "train",
                    "--from-log",
                    str(log_dir),
                    "--since",
                    f"{drift_ts:.3f}",
                    "--init",
                    str(demo.bundle.resolve()),
                    "--valid-seconds",
                    f"{valid_s:.1f}",
                    "--epochs",
                    str(cfg.epochs),
                    "--seed",
                    str(cfg.seed),
                    "--out",
                    str(run_dir),
                ],
                progress=progress,
            )
            bundle = (run_dir / "bundle").resolve()
            print(f"$ din promote {bundle} --url {url}", flush=True)
            try:
                promotion = {"promoted": True, "message": promote(bundle, Service(url))}
            except Refused as e:
                promotion = {"promoted": False, "message": str(e)}
            print(f"din promote: {promotion['message']}", flush=True)
            after.model_version = live_version(url)
            outcomes += run_phase(sim, url, after, progress)
    for phase in phases:
        tally = Tally()
        for o in outcomes[phase.first : phase.first + phase.count]:
            tally.add(o)
        phase.summary = tally.summary()
    with open(loop_dir / "outcomes.jsonl", "w") as f:  # what each simulated user was shown and clicked
        for o in outcomes:
            f.write(json.dumps(o.__dict__) + "\n")
    lineage = json.loads((run_dir / "bundle" / "manifest.json").read_text()).get("lineage")
    result = {
        "config": cfg.__dict__,
        "phases": [phase.__dict__ for phase in phases],
        "recovered": recovered(phases),
        "promotion": promotion,
        "lineage": lineage,
        "windows": windows(outcomes, phases, cfg),
    }
    (loop_dir / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def recovered(phases: Sequence[Phase]) -> dict[str, float | None]:
    """The share of what the drift took that the turn won back, on the online CTR and on the expected
    CTR (its noise-free twin): (after one turn - after drift) / (before drift - after drift)."""
    out: dict[str, float | None] = {}
    for key in ("ctr", "expected_ctr", "auc"):
        a, b, c = (p.summary.get(key) for p in phases)
        out[key] = None if a is None or b is None or c is None or a == b else (c - b) / (a - b)
    return out


def windows(outcomes: Sequence[Any], phases: Sequence[Phase], cfg: LoopConfig) -> list[dict[str, Any]]:
    """CTR and AUC per `window_s` of the schedule (request i at i / rate), each window in one phase."""
    from loop.simulate import Tally

    series = []
    for phase in phases:
        per = max(1, round(cfg.window_s * cfg.rate))
        for start in range(phase.first, phase.first + phase.count, per):
            tally = Tally()
            for o in outcomes[start : min(start + per, phase.first + phase.count)]:
                tally.add(o)
            series.append({"t": start / cfg.rate, "phase": phase.name} | tally.summary())
    return series


# ---------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'phase':<16}{'model':<24}{'requests':>9}{'shown':>8}{'clicks':>8}{'CTR':>7}{'exp. CTR':>10}"
        f"{'oracle CTR':>12}{'AUC':>7}"
    )
    rows = [head, "-" * len(head)]
    for p in result["phases"]:
        s = p["summary"]
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(
            f"{p['name']:<16}{p['model_version'][:23]:<24}{s['requests']:>9,}{s['shown']:>8,}{s['clicks']:>8,}"
            f"{f(s['ctr']):>7}{f(s['expected_ctr']):>10}{f(s['oracle_ctr']):>12}{f(s['auc']):>7}"
        )
    rec = result["recovered"]
    if rec.get("ctr") is not None:
        rows.append(
            f"one turn of the loop won back {rec['ctr']:.0%} of the online CTR the drift took "
            f"({rec['expected_ctr']:.0%} of the expected CTR)"
        )
    return "\n".join(rows)


def write_plot(result: dict[str, Any], path: Path) -> bool:
    from loop.simulate import plot_windows

    rate = result["config"]["rate"]
    drift, turn = (p["first"] / rate for p in result["phases"][1:])
    promoted = result["promotion"].get("promoted")
    marks = [
        (drift, "drift", "grey"),
        (turn, "export, retrain, " + ("promote" if promoted else "refused"), "green" if promoted else "red"),
    ]
    return plot_windows(
        result["windows"],
        path,
        title="din loop-demo: drift, then one turn of the loop",
        xlabel=f"seconds of the simulation's schedule ({result['config']['window_s']:g} s windows)",
        marks=marks,
        who="din loop-demo",
    )


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoopConfig()
    parser.add_argument(
        "--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="the demo's (built when missing)"
    )
    parser.add_argument("--users", type=int, default=DEMO_USERS, help="synthetic users, when it is built")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS, help="synthetic items, when it is built")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_LOOP_DIR), help="this run's directory")
    parser.add_argument("--rate", type=float, default=d.rate, help="simulated requests per second")
    parser.add_argument("--before", type=float, default=d.before_s, help="seconds before the drift")
    parser.add_argument("--after", type=float, default=d.after_s, help="seconds after it, the stale model")
    parser.add_argument("--again", type=float, default=d.again_s, help="seconds after the turn")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="candidates per request")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="items shown (and logged)")
    parser.add_argument("--relevant", type=float, default=d.relevant, help="as din simulate's")
    parser.add_argument("--drift-kind", choices=DRIFT_KINDS, default=d.drift_kind, help="as din simulate's")
    parser.add_argument("--drift-fraction", type=float, default=d.drift_fraction, help="as din simulate's")
    parser.add_argument("--drift-seed", type=int, default=d.drift_seed)
    parser.add_argument("--seed", type=int, default=d.seed, help="the simulation's and the retrain's")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="retraining epochs (best one kept)")
    parser.add_argument(
        "--valid-share",
        type=float,
        default=d.valid_share,
        help="the last share of the drift phase that validates the retrained model",
    )
    parser.add_argument("--window", type=float, default=d.window_s, help="seconds per point of the plot")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    cfg = LoopConfig(
        rate=args.rate,
        before_s=args.before,
        after_s=args.after,
        again_s=args.again,
        candidates=args.candidates,
        top_k=args.top_k,
        relevant=args.relevant,
        drift_kind=args.drift_kind,
        drift_fraction=args.drift_fraction,
        drift_seed=args.drift_seed,
        seed=args.seed,
        epochs=args.epochs,
        valid_share=args.valid_share,
        window_s=args.window,
    )
    demo = Demo(args.workdir)
    try:
        cfg.check()
        build(demo, users=args.users, items=args.items, epochs=DEMO_EPOCHS, seed=0)
        result = run_loop(demo, args.out, cfg, progress=not args.no_progress)
    except InvalidArgument as e:
        print(f"din loop-demo: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"din loop-demo: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(result))
    print(f"wrote {args.out / 'loop.json'}")
    if write_plot(result, args.out / "loop.png"):
        print(f"wrote {args.out / 'loop.png'}")
    return 0
