"""`make compose-test`: the real stack under Docker, end to end, as a user or a release job runs it.

    build -> up -d -> the balancer's /readyz -> /rank for seeded users == `din score` on the same run
    -> --scale ranker=3, requests reach all three -> open-loop load through the balancer while one
    ranker is killed and then Redis is stopped for 15 s: only 200s (degraded meanwhile), histories
    kept -> a ranker stopped by SIGTERM exits cleanly -> down -v -> the `cluster` profile: a master
    stopped under load -> down -v

It runs in its own Compose project (COMPOSE_PROJECT_NAME=dincomposetest) on free host ports, so a stack
a user already runs is not touched. It skips (exit 0, a clear message) where no Docker engine answers.
Images, indexes and the Compose command come from the environment as for `docker compose` itself
(PYTHON_IMAGE, REDIS_IMAGE, HAPROXY_IMAGE, PIP_INDEX_URL, TORCH_INDEX_URL; COMPOSE: the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "dincomposetest"
TOL = 1e-5  # scores against the PyTorch model, as everywhere in the project
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


class Failed(Exception):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


def compose_command() -> list[str] | None:
    if os.environ.get("COMPOSE"):
        return shlex.split(os.environ["COMPOSE"])
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@dataclass
class Stack:
    cmd: list[str]
    env: dict[str, str]
    steps: list[tuple[str, float, str]] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 900, stdin: str | None = None) -> str:
        full = [*self.cmd, *args]
        r = subprocess.run(
            full, cwd=ROOT, env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise Failed(f"{' '.join(full)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r.stdout

    def step(self, name: str, started: float, result: str) -> None:
        seconds = time.monotonic() - started
        self.steps.append((name, seconds, result))
        say(f"{name}: {result} ({seconds:.1f} s)")

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).split()


def docker(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failed(f"docker {' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def wait_ready(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=3)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise Failed(f"{what} not ready after {timeout:.0f} s: {last}")


def wait_healthy(stack: Stack, service: str, n: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = stack.containers(service)
        states = [docker("inspect", "--format", "{{.State.Health.Status}}", c).strip() for c in ids]
        if len(ids) == n and all(s == "healthy" for s in states):
            return ids
        time.sleep(1)
    raise Failed(f"{n} healthy {service} containers not seen in {timeout:.0f} s")


# ------------------------------------------------------------------------------ load


@dataclass
class Answer:
    t: float  # seconds since the load began
    status: int  # 0: no HTTP answer at all
    degraded: bool
    history_length: int
    error: str = ""


def open_loop(
    url: str, bodies: list[dict[str, Any]], rate: float, seconds: float, events: list[Any]
) -> list[Answer]:
    """`rate` requests a second for `seconds`, sent on schedule whether or not earlier ones answered;
    `events` are (at seconds, callable) run on their own thread at that time."""
    answers: list[Answer] = []
    lock = threading.Lock()
    client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64))
    start = time.monotonic()

    def send(i: int) -> None:
        t = time.monotonic() - start
        try:
            r = client.post("/rank", json=bodies[i % len(bodies)])
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            a = Answer(t, r.status_code, bool(body.get("degraded")), int(body.get("history_length", -1)))
            if r.status_code != 200:
                a.error = r.text[:200]
        except httpx.HTTPError as exc:
            a = Answer(t, 0, False, -1, repr(exc))
        with lock:
            answers.append(a)

    def run_events() -> None:
        for at, action in events:
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            action()

    side = threading.Thread(target=run_events, daemon=True)
    side.start()
    with ThreadPoolExecutor(max_workers=64) as pool:
        n = int(rate * seconds)
        for i in range(n):
            time.sleep(max(0.0, i / rate - (time.monotonic() - start)))
            pool.submit(send, i)
    side.join(timeout=120)
    client.close()
    return sorted(answers, key=lambda a: a.t)


def summarise(answers: list[Answer]) -> str:
    statuses = Counter(a.status for a in answers)
    degraded = sum(a.degraded for a in answers)
    return f"{len(answers)} requests, statuses {dict(sorted(statuses.items()))}, {degraded} degraded"


def only_200(answers: list[Answer], what: str) -> None:
    bad = [a for a in answers if a.status != 200]
    check(not bad, f"{what}: {len(bad)} of {len(answers)} not 200, e.g. {bad[:3]}")


# ------------------------------------------------------------------------------ the runs


def seeded(stack: Stack, service: str, n: int, cluster: bool = False) -> dict[str, list[str]]:
    """n users and their histories (newest first), read from the stack's Redis (`service`'s keys)."""
    cli = ["exec", "-T", service, "redis-cli", *(["-c"] if cluster else [])]
    keys = stack(*cli, "--scan", "--pattern", "din:hist:*").split()
    check(len(keys) >= n, f"only {len(keys)} histories in Redis")
    out = {}
    for key in sorted(keys)[:n]:
        items = stack(*cli, "lrange", key, "0", "-1").split()
        out[key.removeprefix("din:hist:")] = items
    return out


def default_profile(stack: Stack, url: str, args: argparse.Namespace) -> None:
    t = time.monotonic()
    stack("build", timeout=1800)
    sizes = []
    for tag in ("din-rank:serve", "din-rank:train"):
        size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).strip())
        sizes.append(f"{tag} {size / 1e6:.0f} MB")
    stack.step("build (serve, train)", t, ", ".join(sizes))

    t = time.monotonic()
    probe = "id -u; command -v gcc cc g++ || true; python -c 'import torch' 2>/dev/null && echo torch || true"
    facts = docker("run", "--rm", "--entrypoint", "sh", "din-rank:serve", "-c", probe).split()
    check(facts[0] != "0", f"the serve image runs as root: {facts}")
    check(facts[1:] == [], f"the serve image has a compiler or torch: {facts[1:]}")
    health = docker("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", "din-rank:serve")
    check("/readyz" in health, f"no healthcheck on /readyz: {health}")
    stack.step("serve image", t, f"uid {facts[0]}, no compiler, no torch, healthcheck on /readyz")

    t = time.monotonic()
    stack("up", "-d", timeout=1800)
    wait_ready(url, 300, "the balancer")
    stack.step("up -d (bootstrap: train + seed) until the balancer is ready", t, "ready")

    t = time.monotonic()
    ready = httpx.get(f"{url}/readyz", timeout=5).json()
    check(ready.get("status") == "ready" and ready.get("redis") == "up", f"/readyz: {ready}")
    histories = seeded(stack, "redis", 40)  # one scan: 40 users' items, the first 3 users ranked
    users = dict(list(histories.items())[:3])
    catalogue = sorted({i for h in histories.values() for i in h})
    rows, answers = [], []
    for n, (user, history) in enumerate(users.items()):
        candidates = catalogue[n * 7 : n * 7 + 12]
        r = httpx.post(f"{url}/rank", json={"user_id": user, "candidates": candidates}, timeout=10)
        check(r.status_code == 200, f"/rank {r.status_code}: {r.text}")
        body = r.json()
        check(not body["degraded"] and body["history_length"] == len(history), f"/rank for {user}: {body}")
        rows.append({"history": history, "candidates": candidates})
        answers.append({i["item_id"]: i["score"] for i in body["items"]})
    script = "cat > /tmp/in.jsonl && din score /models/run --input /tmp/in.jsonl --output /tmp/out.jsonl >&2"
    script += " && cat /tmp/out.jsonl"
    out = stack(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "bootstrap", "-c", script,
        stdin="".join(json.dumps(r) + "\n" for r in rows),
    )  # fmt: skip
    reference = [json.loads(line)["scores"] for line in out.splitlines() if line.startswith("{")]
    check(len(reference) == len(rows), f"din score answered {len(reference)} rows of {len(rows)}")
    worst = 0.0
    for row, served, ref in zip(rows, answers, reference, strict=True):
        for item, score in zip(row["candidates"], ref, strict=True):
            worst = max(worst, abs(served[item] - score))
    check(worst <= TOL, f"/rank and din score differ by {worst:.2e} (> {TOL})")
    stack.step("/rank through the balancer == din score (PyTorch)", t, f"36 scores, worst |diff| {worst:.1e}")

    t = time.monotonic()
    stack("up", "-d", "--scale", "ranker=3", timeout=600)
    rankers = wait_healthy(stack, "ranker", 3, 300)
    bodies = [{"user_id": u, "candidates": catalogue[:50]} for u in users]
    before = {c: _served(c) for c in rankers}
    deadline = time.monotonic() + 60
    while True:  # the balancer re-resolves the replicas every few seconds and checks each twice
        for i in range(30):
            httpx.post(f"{url}/rank", json=bodies[i % len(bodies)], timeout=10).raise_for_status()
        per = {c: _served(c) - before[c] for c in rankers}
        if all(v > 0 for v in per.values()) or time.monotonic() > deadline:
            break
    check(all(v > 0 for v in per.values()), f"requests did not reach all three rankers: {per}")
    stack.step("--scale ranker=3", t, "requests per replica " + "/".join(str(int(v)) for v in per.values()))

    t = time.monotonic()
    redis_keys = int(stack("exec", "-T", "redis", "redis-cli", "dbsize").strip())
    redis_id = stack.containers("redis")[0]
    outage: dict[str, float] = {}
    victim = rankers[0]

    def kill_ranker() -> None:
        docker("kill", victim)
        say(f"  killed ranker {victim[:12]}")

    def stop_redis() -> None:
        outage["from"] = time.monotonic()
        docker("stop", "-t", "5", redis_id)
        say("  stopped redis")

    def start_redis() -> None:
        docker("start", redis_id)
        outage["to"] = time.monotonic()
        say("  started redis")

    load_start = time.monotonic()
    events = [
        (args.kill_at, kill_ranker),
        (args.redis_at, stop_redis),
        (args.redis_at + args.outage_s, start_redis),
    ]
    answers_ = open_loop(url, bodies, args.rate, args.load_s, events)
    say(f"  {summarise(answers_)}")
    only_200(answers_, "load with a ranker killed and Redis stopped")
    during = [a for a in answers_ if outage["from"] - load_start + 1 < a.t < outage["to"] - load_start]
    check(bool(during) and all(a.degraded for a in during), "answers during the outage were not all degraded")
    tail = [a for a in answers_ if a.t > args.load_s - 3]
    check(
        bool(tail) and not any(a.degraded for a in tail),
        "still degraded 3 s before the end, Redis back long since",
    )
    after = int(stack("exec", "-T", "redis", "redis-cli", "dbsize").strip())
    check(after >= redis_keys, f"Redis held {redis_keys} keys before the outage, {after} after")
    result = (
        f"{summarise(answers_)}; {len(during)} during the outage, all degraded; keys {redis_keys} -> {after}"
    )
    stack.step(f"open loop {args.rate:.0f}/s: ranker killed, Redis stopped {args.outage_s:.0f} s", t, result)

    t = time.monotonic()
    target = next(c for c in stack.containers("ranker") if c != victim)
    docker("stop", "-t", "30", target, timeout=60)
    code = docker("inspect", "--format", "{{.State.ExitCode}}", target).strip()
    check(code == "0", f"a ranker stopped with SIGTERM exited {code}, not 0")
    stack.step("docker stop of a ranker (SIGTERM: drain, then exit)", t, f"exit code {code}")

    t = time.monotonic()
    stack("down", "-v", "--remove-orphans", timeout=300)
    stack.step("down -v", t, "removed")


def _served(container: str) -> float:
    """The replica's own count of /rank answers (din_requests_total), read inside its container."""
    code = (
        "import urllib.request as u;"
        "t=u.urlopen('http://127.0.0.1:8000/metrics',timeout=5).read().decode();"
        "print(sum(float(l.split()[-1]) for l in t.splitlines()"
        " if l.startswith('din_requests_total{') and 'route=\"/rank\"' in l))"
    )
    return float(docker("exec", container, "python", "-c", code).strip() or 0)


def cluster_profile(stack: Stack, url: str, args: argparse.Namespace) -> None:
    t = time.monotonic()
    stack("--profile", "cluster", "up", "-d", "--scale", "ranker-cluster=2", "lb-cluster", timeout=1800)
    wait_ready(url, 300, "the cluster balancer")
    stack.step("cluster profile up -d (6 nodes, bootstrap, 2 rankers, lb)", t, "ready")

    t = time.monotonic()
    nodes = stack("exec", "-T", "redis-node-1", "redis-cli", "cluster", "nodes")
    masters = [line.split()[1].split(",")[-1] for line in nodes.splitlines() if "master" in line.split()[2]]
    check(len(masters) == 3, f"expected 3 masters: {nodes}")
    victim_host = sorted(masters)[0]
    victim = stack.containers(victim_host)[0]
    ready = httpx.get(f"{url}/readyz", timeout=5).json()
    check(ready.get("redis") == "up", f"/readyz: {ready}")
    histories = seeded(stack, "redis-node-1", 20, cluster=True)  # node 1's share of the users
    catalogue = sorted({i for h in histories.values() for i in h})[:60]
    bodies = [{"user_id": u, "candidates": catalogue} for u in histories]

    def stop_master() -> None:
        docker("stop", "-t", "5", victim)
        say(f"  stopped master {victim_host}")

    answers = open_loop(url, bodies, args.rate, args.cluster_load_s, [(5.0, stop_master)])
    say(f"  {summarise(answers)}")
    only_200(answers, "the cluster with a master stopped")
    tail = [a for a in answers if a.t > args.cluster_load_s - 3]
    recovered = sum(not a.degraded for a in tail)
    check(
        recovered == len(tail) > 0,
        f"{len(tail) - recovered} of the last {len(tail)} still degraded after failover",
    )
    stack.step(f"open loop {args.rate:.0f}/s, master {victim_host} stopped", t, summarise(answers))

    t = time.monotonic()
    stack("--profile", "cluster", "down", "-v", "--remove-orphans", timeout=300)
    stack.step("cluster down -v", t, "removed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rate", type=float, default=40.0, help="open-loop requests a second through the balancer"
    )
    ap.add_argument("--load-s", type=float, default=40.0, help="the default profile's load phase")
    ap.add_argument("--kill-at", type=float, default=5.0, help="when a ranker is killed (s into the load)")
    ap.add_argument("--redis-at", type=float, default=12.0, help="when Redis is stopped")
    ap.add_argument("--outage-s", type=float, default=15.0, help="how long Redis stays stopped")
    ap.add_argument("--cluster-load-s", type=float, default=30.0, help="the cluster profile's load phase")
    ap.add_argument("--skip-cluster", action="store_true", help="only the default profile")
    ap.add_argument("--skip-default", action="store_true", help="only the cluster profile")
    args = ap.parse_args()

    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        print("compose-test: SKIPPED: no Docker engine answers here (`docker info` failed); nothing was run")
        return 0
    cmd = compose_command()
    if cmd is None:
        print("compose-test: SKIPPED: neither `docker compose` nor `docker-compose` is installed")
        return 0
    lb, lb_cluster = free_port(), free_port()
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT, "DIN_LB_PORT": str(lb)}
    env["DIN_LB_CLUSTER_PORT"] = str(lb_cluster)
    stack = Stack(cmd, env)
    say(f"compose-test with {' '.join(cmd)}, project {PROJECT}, balancers on :{lb} and :{lb_cluster}")
    ok = False
    try:
        stack("down", "-v", "--remove-orphans", timeout=300)  # a previous run's leftovers
        if not args.skip_default:
            default_profile(stack, f"http://127.0.0.1:{lb}", args)
        if not args.skip_cluster:
            cluster_profile(stack, f"http://127.0.0.1:{lb_cluster}", args)
        ok = True
    except Failed as exc:
        say(f"FAILED: {exc}")
        for service in ("bootstrap", "ranker", "lb", "bootstrap-cluster", "ranker-cluster"):
            try:
                logs = stack(
                    "--profile", "cluster", "logs", "--no-color", "--tail", "15", service, timeout=60
                )
                print(f"--- {service} (last lines)\n{logs}")
            except Failed:
                pass
    finally:
        for profile in (["--profile", "cluster"], []):
            subprocess.run(
                [*cmd, *profile, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env, capture_output=True
            )
    print()
    print("| step | seconds | result |\n|---|---:|---|")
    for name, seconds, result in stack.steps:
        print(f"| {name} | {seconds:.1f} | {result} |")
    print(f"\ncompose-test: {'PASSED' if ok else 'FAILED'} in {time.monotonic() - T0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
