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

With --ab (`make ab-demo`, OUT default .din/loop-ab), between 3's retrain and its `din promote`, an A/B
test of the stale bundle against the retrained one: `din models route --arm control=LIVE:0.5 --arm
treatment=RETRAINED:0.5 --salt SALT` (a fixed salt: the same users in the same arms every run), the
same drifted users for --ab-seconds, each answer showing --ab-top-k items (default 1: `din report`'s CTR
is clicked impressions / impressions, and with 10 items shown nearly every impression is clicked in
either arm, so the comparison could not tell the models apart); `din log export` into the same log and
`din report --since/--until` the phase (the log holds the phases before it: its impressions have no
arm); `din models promote treatment`, then `din models rollback`, each checked on one answer for each of
--checks users of the phase (all treatment and the retrained version; then both arms again, every
user in their A/B arm). Then `din models clear` ends the experiment and `din promote` goes on as
without --ab. OUT also gets ab.json (`din report --json`) and ab.png (`--plot`); loop.json an `ab`
entry (the figures, every check with the answers it saw, each arm's simulated tally). Exit 1 when a
check fails.

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
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.errors import InvalidArgument, StageFailed
from demo.pipeline import DEFAULT_WORKDIR, DEMO_EPOCHS, DEMO_ITEMS, DEMO_USERS, Demo, build
from loop.simulate import DRIFT_KINDS
from service import child
from service.ports import free_port

DEFAULT_LOOP_DIR = ".din/loop"
DEFAULT_AB_DIR = ".din/loop-ab"
PREFIX = "din:"
REQUEST_TIMEOUT_MS = 2000  # din serve's deadline here (its default: 250)
EXPORT_WINDOW_S = 10.0  # the simulated users click within the step (its HTTP timeout is 10 s)
READY_TIMEOUT_S = 180.0
CONTROL, TREATMENT = "control", "treatment"  # the A/B arms: the live (stale) bundle, the retrained one
AB_SALT = "din-loop-demo-ab"  # fixed: every run assigns the same users to the same arm
AB_SECONDS = 180.0
AB_TOP_K = 1
CHECK_ANSWERS = 100
AB_PHASE = "A/B test"


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
    ab: bool = False  # an A/B test of the stale model against the retrained one before `din promote`
    ab_s: float = AB_SECONDS
    ab_top_k: int = AB_TOP_K  # items each A/B answer shows (and logs)
    ab_salt: str = AB_SALT
    checks: int = CHECK_ANSWERS  # answers asked for after `din models promote` and after `rollback`

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
        if self.ab:
            if not (self.ab_s > 0 and math.isfinite(self.ab_s)):
                raise InvalidArgument(f"--ab-seconds must be positive, got {self.ab_s}")
            if self.ab_top_k < 1:
                raise InvalidArgument(f"--ab-top-k must be at least 1, got {self.ab_top_k}")
            if self.checks < 2:
                raise InvalidArgument(f"--checks must be at least 2, got {self.checks}")
            if not self.ab_salt:
                raise InvalidArgument("--ab-salt must not be empty")


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
        # the loop is what this measures, not shedding: a busy two-core box (CI: the tests beside it) may
        # hold a request past the default 250 ms now and then, and a shed step is a lost impression
        "--request-timeout-ms",
        str(REQUEST_TIMEOUT_MS),
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


def run_phase(
    sim: Any,
    url: str,
    phase: Phase,
    progress: bool,
    on_answer: Callable[[dict[str, Any]], None] | None = None,
) -> list[Any]:
    """The phase's steps against the live service; its outcomes in step order. `on_answer`: sees every
    /rank answer (the A/B phase keeps each impression's arm)."""
    import httpx

    from loop.simulate import http_calls, progress_bar, simulate

    async def go() -> list[Any]:
        cfg = sim.cfg
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        bar, tick = progress_bar(phase.count, phase.name, enabled=progress)

        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as c:
            rank, events = http_calls(c, url, cfg.top_k, on_answer)
            outcomes, _ = await simulate(sim, rank, events, tick, first=phase.first, count=phase.count)
        bar.close()
        return outcomes

    t0 = time.perf_counter()
    outcomes = asyncio.run(go())
    phase.seconds = time.perf_counter() - t0
    return outcomes


def _din(argv: Sequence[str], *, progress: bool, has_progress: bool = True) -> None:
    """`din ARGV` as a child process (this interpreter, `python -m cli`: the same tree), printed first;
    StageFailed unless it exits 0. `has_progress`: the command takes --no-progress."""
    cmd = [sys.executable, "-m", "cli", *argv]
    if not progress and has_progress:
        cmd.append("--no-progress")
    print("$ din " + shlex.join(argv), flush=True)
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
    from dataclasses import replace

    from loop.promote import Refused, Service, promote
    from loop.simulate import SimConfig, Simulation, Tally, load_world
    from service.store.client import RedisConfig, redis_endpoint
    from service.store.seed import seed_reviews

    cfg.check()
    shutil.rmtree(loop_dir, ignore_errors=True)
    loop_dir.mkdir(parents=True)
    log_dir, run_dir = loop_dir / "log", loop_dir / "retrained"
    n1, n2, n3 = cfg.requests(cfg.before_s), cfg.requests(cfg.after_s), cfg.requests(cfg.again_s)
    n_ab = cfg.requests(cfg.ab_s) if cfg.ab else 0
    phases = [
        Phase("before drift", 0, n1),
        Phase("after drift", n1, n2),
        *([Phase(AB_PHASE, n1 + n2, n_ab)] if cfg.ab else []),
        Phase("after one turn", n1 + n2 + n_ab, n3),
    ]
    sim_cfg = SimConfig(
        seed=cfg.seed,
        requests=n1 + n2 + n_ab + n3,
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
    # the A/B phase's users are the same (one world: their histories carry on); its answers show ab_top_k
    sim_ab = Simulation(world, replace(sim_cfg, top_k=cfg.ab_top_k)) if cfg.ab else None
    max_history = int(json.loads((demo.bundle / "manifest.json").read_text())["max_history"])
    outcomes: list[Any] = []
    promotion: dict[str, Any] = {}
    ab: dict[str, Any] | None = None
    redis_cfg = RedisConfig(url=None, data_dir=loop_dir / "redis", prefix=PREFIX)
    with redis_endpoint(redis_cfg) as endpoint:
        stats = seed_reviews(demo.raw / "reviews.json.gz", endpoint.url, max_history, PREFIX)
        print(f"din loop-demo: {stats.summary()}", flush=True)
        with serving(demo.bundle, endpoint.url, loop_dir / "serve.log") as url:
            print(f"din loop-demo: serving {demo.bundle} on {url}, impressions logged", flush=True)
            first, drifted, after = phases[0], phases[1], phases[-1]
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
            if sim_ab is not None:
                ab_phase = phases[2]
                ab = run_ab(
                    sim_ab, url, endpoint.url, ab_phase, cfg, demo.bundle.resolve(), bundle, log_dir, progress
                )
                outcomes += ab.pop("outcomes")
                # the experiment is over: no routing, then `din promote` makes the retrained bundle the
                # service's own, as without --ab (gated on the held-out hour)
                _din(["models", "clear", "--url", url], progress=progress, has_progress=False)
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
    if ab is not None:
        result["ab"] = ab
    (loop_dir / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------- the A/B test


def _version(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["model_version"])


def run_ab(
    sim: Any,
    url: str,
    redis_url: str,
    phase: Phase,
    cfg: LoopConfig,
    live: Path,
    retrained: Path,
    log_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """The stale bundle (arm control) against the retrained one (arm treatment), half the users each
    (`din models route`), for the phase's steps of the drifted world's users; `din log export` of what
    they were shown and clicked into the loop's log, `din report` on the phase's impressions only
    (--since/--until: the log holds the earlier phases too), then `din models promote treatment` and
    `din models rollback`, each checked on the answers that follow. Returns the report's figures, the
    checks, each arm's simulated tally and the phase's outcomes (`outcomes`, popped by the caller)."""
    from loop.simulate import Tally

    versions = {CONTROL: _version(live), TREATMENT: _version(retrained)}
    _models(
        url,
        "route",
        "--arm",
        f"{CONTROL}={live}:0.5",
        "--arm",
        f"{TREATMENT}={retrained}:0.5",
        "--salt",
        cfg.ab_salt,
        "--note",
        "din loop-demo: the stale model vs the retrained one",
        progress=progress,
    )
    answers: dict[str, dict[str, Any]] = {}  # impression id -> what its /rank answer said

    def keep(a: dict[str, Any]) -> None:
        answers[a["impression_id"]] = {
            "user_id": a["user_id"],
            "arm": a.get("arm"),
            "model_version": a["model_version"],
            "revision": a.get("routing_revision"),
        }

    since = time.time()  # the routing is in force on this (the only) replica once `route` has answered
    outcomes = run_phase(sim, url, phase, progress, on_answer=keep)
    until = time.time()
    phase.model_version = f"{CONTROL} | {TREATMENT}"
    served = [answers[o.impression_id] for o in outcomes if o.impression_id in answers]
    revisions = sorted({a["revision"] for a in served if a["revision"] is not None})
    user_arm = {a["user_id"]: a["arm"] for a in served}
    checks = [
        _check(
            "A/B answers carry both arms, each its own version",
            bool(served)
            and {a["arm"] for a in served} == {CONTROL, TREATMENT}
            and all(a["arm"] in versions and a["model_version"] == versions[a["arm"]] for a in served),
            _arms_text(served, versions),
        ),
        _check(
            "a user stays in one arm",
            all(user_arm[a["user_id"]] == a["arm"] for a in served),
            f"{len(user_arm):,} users, {len(revisions)} routing revision(s) {revisions}",
        ),
    ]
    arms: dict[str, Any] = {}
    for arm in (CONTROL, TREATMENT):
        tally = Tally()
        for o in outcomes:
            if answers.get(o.impression_id or "", {}).get("arm") == arm:
                tally.add(o)
        arms[arm] = {"model_version": versions[arm], "summary": tally.summary()}

    export(redis_url, log_dir, cfg.export_window_s, progress)
    report_json, report_plot = log_dir.parent / "ab.json", log_dir.parent / "ab.png"
    _din(
        [
            "report",
            "--log",
            str(log_dir),
            "--control",
            CONTROL,
            "--since",
            f"{since:.3f}",
            "--until",
            f"{until:.3f}",
            "--json",
            str(report_json),
            "--plot",
            str(report_plot),
        ],
        progress=progress,
        has_progress=False,
    )
    report = json.loads(report_json.read_text())
    figures = ab_figures(report)
    print(format_figures(figures), flush=True)

    # who is asked after each change: users of the phase, in step order, with what they were offered
    probe: dict[str, list[str]] = {}
    for o in outcomes:
        if o.impression_id in answers and len(probe) < cfg.checks:
            probe.setdefault(answers[o.impression_id]["user_id"], o.candidates)
    _models(url, "promote", TREATMENT, progress=progress)
    got = ask(url, probe, cfg.ab_top_k)
    checks.append(
        _check(
            f"after `din models promote {TREATMENT}` every answer is arm {TREATMENT}, "
            f"version {versions[TREATMENT]}",
            all(a["arm"] == TREATMENT and a["model_version"] == versions[TREATMENT] for a in got),
            _arms_text(got, versions),
            got,
        )
    )
    _models(url, "rollback", progress=progress)
    got = ask(url, probe, cfg.ab_top_k)
    checks.append(
        _check(
            "after `din models rollback` the answers are split across both arms again, each user in "
            "the arm of the A/B test",
            {a["arm"] for a in got} == {CONTROL, TREATMENT}
            and all(a["arm"] == user_arm[a["user_id"]] for a in got)
            and all(a["model_version"] == versions[a["arm"]] for a in got),
            _arms_text(got, versions),
            got,
        )
    )
    return {
        "salt": cfg.ab_salt,
        "top_k": cfg.ab_top_k,
        "since": since,
        "until": until,
        "versions": versions,
        "routing_revisions": revisions,
        "arms": arms,
        "figures": figures,
        "report": report,
        "checks": checks,
        "outcomes": outcomes,
    }


def _models(url: str, verb: str, *args: str, progress: bool) -> None:
    _din(["models", verb, *args, "--url", url], progress=progress, has_progress=False)


def ask(url: str, users: dict[str, list[str]], top_k: int) -> list[dict[str, Any]]:
    """One /rank per user (no click, no event): what the routing in force answers them."""
    import httpx

    out = []
    with httpx.Client(timeout=10.0) as c:
        for user, candidates in users.items():
            r = c.post(url + "/rank", json={"user_id": user, "candidates": candidates, "top_k": top_k})
            r.raise_for_status()
            a = r.json()
            out.append(
                {
                    "user_id": user,
                    "arm": a.get("arm"),
                    "model_version": a["model_version"],
                    "revision": a.get("routing_revision"),
                }
            )
    return out


def _arms_text(answers: Sequence[dict[str, Any]], versions: dict[str, str]) -> str:
    count: dict[tuple[Any, Any], int] = {}
    for a in answers:
        key = (a["arm"], a["model_version"])
        count[key] = count.get(key, 0) + 1
    revs = sorted({a["revision"] for a in answers if a["revision"] is not None})
    parts = [f"{n:,} {arm} ({version})" for (arm, version), n in sorted(count.items(), key=str)]
    return f"{len(answers):,} answers: " + ", ".join(parts) + f"; routing revision {revs}"


def _check(
    name: str, ok: bool, detail: str, answers: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A printed check; `answers` (the ones it looked at) are kept with it in loop.json."""
    print(f"check: {name}: {detail}: {'ok' if ok else 'FAILED'}", flush=True)
    return {"check": name, "ok": ok, "detail": detail} | (
        {} if answers is None else {"answers": list(answers)}
    )


def ab_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The A/B's key numbers from `din report --json`: per arm CTR with its interval, the treatment's
    difference against control with its interval and p, and whether the interval excludes zero."""
    arms = {a["arm"]: a for a in report["arms"]}
    out: dict[str, Any] = {"impressions": report["impressions"]}
    for name in (CONTROL, TREATMENT):
        a = arms.get(name)
        out[name] = (
            None
            if a is None
            else {k: a[k] for k in ("versions", "impressions", "clicks", "ctr")}
            | {
                "ctr_ci": [a["ctr_low"], a["ctr_high"]],
                "auc": a["auc"],
                "gauc": a["gauc"],
            }
        )
    t = arms.get(TREATMENT)
    diff = None if t is None else t["diff"]
    low, high = (None, None) if t is None else (t["diff_low"], t["diff_high"])
    out["diff"], out["diff_ci"], out["p_value"] = diff, [low, high], None if t is None else t["p_value"]
    out["treatment_ahead"] = low is not None and low > 0
    out["excludes_zero"] = low is not None and high is not None and (low > 0 or high < 0)
    return out


def format_figures(f: dict[str, Any]) -> str:
    def arm(name: str) -> str:
        a = f[name]
        if a is None:
            return f"{name}: no impressions"
        low, high = a["ctr_ci"]
        return f"{name} CTR {a['ctr']:.2%} [{low:.2%}, {high:.2%}] ({a['impressions']:,} impressions)"

    lines = [
        "A/B (din report: CTR = clicked impressions / impressions, 95% intervals):",
        f"  {arm(CONTROL)}",
        f"  {arm(TREATMENT)}",
    ]
    if f["diff"] is not None:
        low, high = f["diff_ci"]
        verdict = (
            "the retrained arm is ahead: the interval excludes zero"
            if f["treatment_ahead"]
            else "the retrained arm is behind: the interval excludes zero"
            if f["excludes_zero"]
            else "no difference shown: the interval holds zero"
        )
        lines.append(
            f"  difference {TREATMENT} - {CONTROL} {f['diff']:+.2%} [{low:+.2%}, {high:+.2%}] (Newcombe), "
            f"p = {f['p_value']:.2g}: {verdict}"
        )
    return "\n".join(lines)


def recovered(phases: Sequence[Phase]) -> dict[str, float | None]:
    """The share of what the drift took that the turn won back, on the online CTR and on the expected
    CTR (its noise-free twin): (after one turn - after drift) / (before drift - after drift). (An A/B
    phase between them shows fewer items per answer: its CTR is not comparable, it is left out.)"""
    out: dict[str, float | None] = {}
    for key in ("ctr", "expected_ctr", "auc"):
        a, b, c = (p.summary.get(key) for p in (phases[0], phases[1], phases[-1]))
        out[key] = None if a is None or b is None or c is None or a == b else (c - b) / (a - b)
    return out


def windows(outcomes: Sequence[Any], phases: Sequence[Phase], cfg: LoopConfig) -> list[dict[str, Any]]:
    """CTR and AUC per `window_s` of the schedule (request i at i / rate), each window in one phase. The
    A/B phase is left out (its answers show `ab_top_k` items: another CTR; `din report` measures it)."""
    from loop.simulate import Tally

    series = []
    for phase in phases:
        if phase.name == AB_PHASE:
            continue
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
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for p in result["phases"]:
        lines = [(p["name"], p["model_version"], p["summary"])]
        if p["name"] == AB_PHASE and "ab" in result:  # a row per arm
            lines = [
                (f"A/B {arm}", a["model_version"], a["summary"]) for arm, a in result["ab"]["arms"].items()
            ]
        for name, version, s in lines:
            rows.append(
                f"{name:<16}{version[:23]:<24}{s['requests']:>9,}{s['shown']:>8,}{s['clicks']:>8,}"
                f"{f(s['ctr']):>7}{f(s['expected_ctr']):>10}{f(s['oracle_ctr']):>12}{f(s['auc']):>7}"
            )
    if "ab" in result:
        rows.append(
            f"(the A/B rows: top {result['ab']['top_k']} shown per answer, the other phases top "
            f"{result['config']['top_k']})"
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
    phases = result["phases"]
    drift, turn = phases[1]["first"] / rate, phases[-1]["first"] / rate
    promoted = result["promotion"].get("promoted")
    marks = [(drift, "drift", "grey")]
    series = list(result["windows"])
    ab = [p for p in phases if p["name"] == AB_PHASE]
    if ab:  # a gap in the lines: the A/B's CTR per arm is din report's plot (ab.png)
        start = ab[0]["first"] / rate
        marks.append((start, "retrain, A/B (ab.png)", "purple"))
        gap = {"t": start, "ctr": None, "oracle_ctr": None, "auc": None}
        series = [w for w in series if w["t"] < start] + [gap] + [w for w in series if w["t"] >= start]
    marks.append(
        (
            turn,
            ("" if ab else "export, retrain, ") + ("promote" if promoted else "refused"),
            "green" if promoted else "red",
        )
    )
    return plot_windows(
        series,
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
    parser.add_argument(
        "--out",
        type=Path,
        help=f"this run's directory (default {DEFAULT_LOOP_DIR}, with --ab {DEFAULT_AB_DIR})",
    )
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
    parser.add_argument(
        "--ab",
        action="store_true",
        help="before `din promote`, an A/B test: `din models route` half the users to the stale bundle "
        "(arm control), half to the retrained one (arm treatment), the drifted users for --ab-seconds, "
        "`din report` on its impressions, then `din models promote treatment` and `din models rollback`, "
        "each checked on the next answers",
    )
    parser.add_argument("--ab-seconds", type=float, default=d.ab_s, help="seconds of the A/B test")
    parser.add_argument(
        "--ab-top-k",
        type=int,
        default=d.ab_top_k,
        help="items each A/B answer shows (din report's CTR is clicked impressions: with 10 items shown "
        "nearly every impression is clicked in either arm)",
    )
    parser.add_argument(
        "--ab-salt", default=d.ab_salt, help="the A/B routing's salt (fixed: same arms each run)"
    )
    parser.add_argument(
        "--checks", type=int, default=d.checks, help="answers checked after the promotion and the rollback"
    )
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
        ab=args.ab,
        ab_s=args.ab_seconds,
        ab_top_k=args.ab_top_k,
        ab_salt=args.ab_salt,
        checks=args.checks,
    )
    out = args.out if args.out is not None else Path(DEFAULT_AB_DIR if args.ab else DEFAULT_LOOP_DIR)
    demo = Demo(args.workdir)
    try:
        cfg.check()
        build(demo, users=args.users, items=args.items, epochs=DEMO_EPOCHS, seed=0)
        result = run_loop(demo, out, cfg, progress=not args.no_progress)
    except InvalidArgument as e:
        print(f"din loop-demo: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"din loop-demo: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(result))
    failed = 0
    if "ab" in result:
        ab = result["ab"]
        print()
        print(format_figures(ab["figures"]))
        for c in ab["checks"]:
            print(f"check: {c['check']}: {'ok' if c['ok'] else 'FAILED'}")
        failed = sum(not c["ok"] for c in ab["checks"])
        print(f"wrote {out / 'ab.json'} (din report --json) and {out / 'ab.png'} (din report --plot)")
    print(f"wrote {out / 'loop.json'}")
    if write_plot(result, out / "loop.png"):
        print(f"wrote {out / 'loop.png'}")
    if failed:
        print(f"din loop-demo: {failed} A/B check(s) failed (above)", file=sys.stderr)
        return 1
    return 0
