"""`din simulate`: a world to close the loop in. Simulated users of the `din synth` world ask a running
service for rankings, click what they are shown with their TRUE click probability, and send the clicks
back to /events with the answer's impression_id; at a chosen point their preferences drift.

The world is the generator's own (model/synth.py), loaded from a `din synth` directory (`--raw`; the
demo's is .din/demo/raw) or rebuilt from its parameters and seed: the same catalogue, rings, popularity
and users the demo model was trained on. A user's hidden state is their history in that world (their
synthetic reviews, newest first, then every click the simulation makes).

Each step i (its own random stream, seeded by (--seed, i), so a run is the same sequence of users,
candidates and click draws whatever the timing):

- User: one of the population, uniformly.
- Candidates (--candidates N): a share (--relevant) drawn as the generator draws the user's next
  item (a recency-weighted trigger among their past items and a ring walk from it, or an exploration
  draw by popularity: synth's `next_item_draws`), the rest uniformly from the catalogue (as the
  training negatives were); distinct, none already in the history.
- Ranking: POST /rank with top_k = --top-k: the answer (and the impression the service logs) is what
  the user is shown, and looks at.
- Click model: the shown item j at position p (0 = top) is clicked with probability
      examine(p) * P(j | h) / (P(j | h) + 1/M)
  where P(j | h) is the generator's exact probability that j is the user's next item (synth's oracle,
  no-repeat rule included), M the catalogue size, and examine(p) = (p + 1)^(-η) the position bias
  (--position-bias η; 0, the default, means every shown item is examined). The fraction is the
  posterior that a (history, item) pair is a true next item rather than a uniform negative drawn one
  for one, i.e. exactly what the demo model was trained to predict: a perfect model's score IS the
  click probability. One uniform draw per position decides, from the step's stream.
- Feedback: the clicks go to POST /events ({user_id, item_id, event_id, impression_id}, in position
  order, so the last is the newest), and into the user's hidden history in the same order.
- A user is never in two steps at once: a step waits for that user's previous step, so histories grow
  in step order.

Drift (--drift-at SECONDS or --drift-after REQUESTS; both are a step index: the schedule is fixed by
--rate): the world's rings are redrawn. A share (--drift-fraction F, default 1) of the catalogue's ring
slots, chosen by --drift-seed, have their items shuffled among them: an item that moves takes its new
slot's category and ring neighbours. Users keep their histories, but what each history makes them want
next follows the new rings: the categories and neighbourhoods a user prefers shuffle, while the
catalogue (the item ids, the categories the bundle was built with, popularity) stays as it was. A model
trained before the drift knows the old rings, so its ranking goes stale; with F = 1 it is a new world
over the same items.

Metrics, per phase (before / after the drift) and per window (--window seconds of the schedule): steps,
shown items, clicks, online CTR (clicks / shown), the expected CTR (mean true click probability of what
was shown, the noise-free twin of the CTR), the oracle CTR (the expected CTR had the top k been ranked
by true probability: the ceiling), and the online AUC of the served scores against the clicks over the
shown items (ties get half credit). `--out FILE.json` keeps the totals and the window series,
`--plot FILE.png` draws them (matplotlib, the `dev` extra, imported only then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from contracts.errors import InvalidArgument
from model.synth import SynthParams, Truth, generate, load_truth, next_item_draws, oracle_for_history

MAX_HIDDEN_HISTORY = 100  # what the generator's triggers can reach in practice: λ^100 is negligible
_CANDIDATE_TRIES = 20  # rounds of next-item draws before the relevant share is topped up uniformly

# A rank call: (user_id, candidate item ids) -> (impression_id or None, [(item_id, score)] in served order)
RankFn = Callable[[str, list[str]], Awaitable[tuple[str | None, list[tuple[str, float]]]]]
# A feedback call: (events) -> None; raises on failure
EventsFn = Callable[[list[dict[str, Any]]], Awaitable[None]]


# ---------------------------------------------------------------- the world


DRIFT_KINDS = ("rings", "trend")
TREND_EXPLORE = 0.5  # a trend drift: the share of next items drawn by (the new) popularity
TREND_SIGMA = 1.5  # and the log-normal spread of the popularity redrawn: a few new hits


def drift_truth(truth: Truth, fraction: float, seed: int, kind: str = "rings") -> Truth:
    """The world after the drift, by `kind`:

    - "rings": a `fraction` of the ring slots (chosen by `seed`) swap their items. Category sizes,
      popularity and item ids stay; an item that moves takes its new slot's category and ring position,
      so the next-item process (and the click probabilities) follow the new rings.
    - "trend": a `fraction` of the items get a new popularity, drawn log-normal with spread
      TREND_SIGMA (new hits), and the share of next items drawn by popularity rises to TREND_EXPLORE
      (if lower): what is in fashion changes, the rings stay."""
    if not 0.0 <= fraction <= 1.0:
        raise InvalidArgument(f"drift fraction must be in [0, 1], got {fraction}")
    if kind not in DRIFT_KINDS:
        raise InvalidArgument(f"drift kind must be one of {', '.join(DRIFT_KINDS)}, got {kind!r}")
    rng = np.random.default_rng([seed, 0xD81F7])
    if kind == "trend":
        pop = truth.pop.copy()
        chosen = rng.choice(len(pop), size=round(fraction * len(pop)), replace=False)
        fresh = rng.lognormal(0.0, TREND_SIGMA, len(chosen))
        pop[chosen] = fresh / fresh.mean() * pop[chosen].mean()  # the chosen share keeps its total
        return replace(truth, pop=pop, explore=max(truth.explore, TREND_EXPLORE))  # the total stays 1
    m = len(truth.ring_items)
    slots = np.sort(rng.choice(m, size=round(fraction * m), replace=False))
    ring_items = truth.ring_items.copy()
    ring_items[slots] = truth.ring_items[rng.permutation(slots)]
    cat_of_slot = np.repeat(np.arange(len(truth.cat_size)), truth.cat_size)
    item_cat = np.empty_like(truth.item_cat)
    item_rank = np.empty_like(truth.item_rank)
    item_cat[ring_items] = cat_of_slot
    item_rank[ring_items] = np.arange(m) - truth.cat_start[cat_of_slot]
    return replace(truth, ring_items=ring_items, item_cat=item_cat, item_rank=item_rank)


def click_probabilities(
    truth: Truth, history: Sequence[int], items: np.ndarray, examine: np.ndarray | None = None
) -> np.ndarray:
    """True click probability of each item (truth indices) for a user with `history` (newest first).

    P(j | h) / (P(j | h) + 1/M), times examine[position] when given (one entry per item)."""
    p = oracle_for_history(truth, history[:MAX_HIDDEN_HISTORY], items)
    q = 1.0 / len(truth.item_ids)
    out = p / (p + q)
    return out * examine if examine is not None else out


def sample_candidates(
    truth: Truth, history: Sequence[int], n: int, relevant: float, rng: np.random.Generator
) -> np.ndarray:
    """n distinct truth indices, none in `history`: round(relevant * n) drawn by the generator's next-item
    step for this history (synth's own draw), the rest uniformly from the catalogue."""
    m = len(truth.item_ids)
    seen = set(history)
    free = m - len(seen)
    if n > free:
        raise InvalidArgument(f"{n} candidates asked but only {free} items are new to a user")
    picked: list[int] = []
    taken = set(seen)
    want = round(relevant * n)
    h = list(history[:MAX_HIDDEN_HISTORY])
    if want and h:
        for _ in range(_CANDIDATE_TRIES):
            for j in next_item_draws(truth, h, 2 * want, rng).tolist():
                if j not in taken and len(picked) < want:
                    picked.append(j)
                    taken.add(j)
            if len(picked) >= want:
                break
    while len(picked) < n:
        for j in rng.integers(0, m, size=2 * (n - len(picked))).tolist():
            if j not in taken and len(picked) < n:
                picked.append(j)
                taken.add(j)
    return np.array(picked, dtype=np.int64)


@dataclass
class World:
    """The synthetic world: its truth before and after the drift, and each user's hidden history."""

    truth: Truth
    drifted: Truth
    user_ids: list[str]
    histories: list[list[int]]  # truth indices, newest first, at most MAX_HIDDEN_HISTORY

    def truth_at(self, after_drift: bool) -> Truth:
        return self.drifted if after_drift else self.truth


def load_world(
    raw: Path, *, users: int | None, drift_fraction: float, drift_seed: int, drift_kind: str = "rings"
) -> World:
    """The `din synth` world in `raw` (truth.npz + reviews.json.gz); the first `users` users (file order)."""
    from model.data import read_reviews

    if not (raw / "truth.npz").is_file() or not (raw / "reviews.json.gz").is_file():
        raise InvalidArgument(f"{raw} is not a `din synth` directory (no truth.npz / reviews.json.gz)")
    truth = load_truth(raw)
    r = read_reviews(raw / "reviews.json.gz")
    item = truth.item_index(r.item_ids)[r.item]
    order = np.lexsort((-r.time, r.user))  # per user, newest first (synth's days are strictly increasing)
    counts = np.bincount(r.user, minlength=len(r.user_ids))
    ends = np.cumsum(counts)
    n_users = len(r.user_ids) if users is None else min(users, len(r.user_ids))
    histories = [
        item[order[ends[u] - counts[u] : ends[u]]][:MAX_HIDDEN_HISTORY].tolist() for u in range(n_users)
    ]
    drifted = drift_truth(truth, drift_fraction, drift_seed, drift_kind)
    return World(truth, drifted, r.user_ids[:n_users], histories)


# ---------------------------------------------------------------- metrics


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Mann-Whitney AUC (tied scores get half credit); None when one class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) over each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass
class Tally:
    """What a phase or a window saw."""

    steps: int = 0
    errors: int = 0
    shown: int = 0
    clicks: int = 0
    expected: float = 0.0  # sum of the true click probabilities of what was shown
    oracle: float = 0.0  # the same had the top k been the k most probable
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.steps += 1
        if o.error is not None:
            self.errors += 1
            return
        self.shown += len(o.shown)
        self.clicks += sum(o.clicked)
        self.expected += float(sum(o.probs))
        self.oracle += o.oracle
        self.scores += o.scores
        self.labels += o.clicked

    def summary(self) -> dict[str, Any]:
        def ratio(x: float) -> float | None:
            return x / self.shown if self.shown else None

        return {
            "requests": self.steps,
            "errors": self.errors,
            "shown": self.shown,
            "clicks": self.clicks,
            "ctr": ratio(self.clicks),
            "expected_ctr": ratio(self.expected),
            "oracle_ctr": ratio(self.oracle),
            "auc": auc(self.scores, self.labels),
        }


# ---------------------------------------------------------------- one step


@dataclass
class SimConfig:
    seed: int = 0
    requests: int = 1000
    rate: float = 20.0  # steps per second, on a fixed schedule
    concurrency: int = 16
    candidates: int = 50
    relevant: float = 0.2
    top_k: int = 10
    position_bias: float = 0.0
    drift_step: int | None = None  # the first step after the drift
    window_s: float = 5.0

    def check(self) -> None:
        if self.requests < 1:
            raise InvalidArgument("--requests (or --duration x --rate) must give at least 1 request")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise InvalidArgument(f"--rate must be a positive number, got {self.rate}")
        if self.concurrency < 1:
            raise InvalidArgument(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.candidates < 1:
            raise InvalidArgument(f"--candidates must be at least 1, got {self.candidates}")
        if not 0.0 <= self.relevant <= 1.0:
            raise InvalidArgument(f"--relevant must be in [0, 1], got {self.relevant}")
        if self.top_k < 1:
            raise InvalidArgument(f"--top-k must be at least 1, got {self.top_k}")
        if not (self.position_bias >= 0 and math.isfinite(self.position_bias)):
            raise InvalidArgument(f"--position-bias must be >= 0, got {self.position_bias}")
        if not self.window_s > 0:
            raise InvalidArgument(f"--window must be positive, got {self.window_s}")


@dataclass
class Outcome:
    """One step: who, what was offered, what was shown and clicked (or the error)."""

    step: int
    user: int
    after_drift: bool
    candidates: list[str]
    impression_id: str | None = None
    shown: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    clicked: list[int] = field(default_factory=list)
    oracle: float = 0.0
    error: str | None = None


class Simulation:
    """The population and its step loop; HTTP comes in through `rank` and `events`."""

    def __init__(self, world: World, cfg: SimConfig) -> None:
        cfg.check()
        self.world, self.cfg = world, cfg
        self.examine = (1.0 + np.arange(cfg.top_k)) ** (-cfg.position_bias)
        self._user_tail: dict[int, asyncio.Future[None]] = {}

    def after_drift(self, i: int) -> bool:
        return self.cfg.drift_step is not None and i >= self.cfg.drift_step

    async def step(self, i: int, rank: RankFn, events: EventsFn) -> Outcome:
        """Step i. Call in step order: it queues behind the same user's previous step before any await."""
        rng = np.random.default_rng([self.cfg.seed, i])
        user = int(rng.integers(len(self.world.user_ids)))
        prev = self._user_tail.get(user)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._user_tail[user] = mine
        try:
            if prev is not None:
                await prev
            return await self._step(i, user, rng, rank, events)
        finally:
            mine.set_result(None)
            if self._user_tail.get(user) is mine:
                del self._user_tail[user]

    async def _step(
        self, i: int, user: int, rng: np.random.Generator, rank: RankFn, events: EventsFn
    ) -> Outcome:
        w, cfg = self.world, self.cfg
        drifted = self.after_drift(i)
        truth = w.truth_at(drifted)
        hist = w.histories[user]
        cand = sample_candidates(truth, hist, cfg.candidates, cfg.relevant, rng)
        u = rng.random(cfg.top_k)  # one draw per position, drawn whatever the answer
        ids = truth.item_ids[cand].tolist()
        o = Outcome(step=i, user=user, after_drift=drifted, candidates=ids)
        true_p = click_probabilities(truth, hist, cand)
        k = min(cfg.top_k, len(cand))
        o.oracle = float((np.sort(true_p)[::-1][:k] * self.examine[:k]).sum())
        try:
            o.impression_id, items = await rank(w.user_ids[user], ids)
        except Exception as e:  # counted, the step is lost; the user's hidden state is untouched
            o.error = f"rank: {e}"
            return o
        shown = items[: cfg.top_k]
        by_id = dict(zip(ids, true_p.tolist(), strict=True))
        o.shown = [s for s, _ in shown]
        o.scores = [float(sc) for _, sc in shown]
        o.probs = [by_id.get(s, 0.0) * float(self.examine[p]) for p, s in enumerate(o.shown)]
        o.clicked = [int(u[p] < pr) for p, pr in enumerate(o.probs)]
        clicks = [s for s, c in zip(o.shown, o.clicked, strict=True) if c]
        if clicks:
            evs: list[dict[str, Any]] = [
                {"user_id": w.user_ids[user], "item_id": s, "event_id": f"sim-{cfg.seed}-{i}-{s}"}
                | ({"impression_id": o.impression_id} if o.impression_id else {})
                for s in clicks
            ]
            try:
                await events(evs)
            except Exception as e:
                o.error = f"events: {e}"
                return o
            new = truth.item_index(clicks).tolist()
            w.histories[user] = (new[::-1] + hist)[:MAX_HIDDEN_HISTORY]
        return o


# ---------------------------------------------------------------- the run


@dataclass
class Report:
    total: dict[str, Any]
    phases: dict[str, dict[str, Any]]
    windows: list[dict[str, Any]]
    config: dict[str, Any]
    seconds: float
    behind_schedule: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(outcomes: Sequence[Outcome], cfg: SimConfig, seconds: float = 0.0, behind: int = 0) -> Report:
    total, before, after = Tally(), Tally(), Tally()
    windows: dict[int, Tally] = {}
    for o in outcomes:
        total.add(o)
        (after if o.after_drift else before).add(o)
        windows.setdefault(int(o.step / cfg.rate // cfg.window_s), Tally()).add(o)
    phases = {"before drift": before.summary()}
    if cfg.drift_step is not None:
        phases["after drift"] = after.summary()
    series = []
    for wi in sorted(windows):
        t0 = wi * cfg.window_s
        drifted = cfg.drift_step is not None and math.ceil(t0 * cfg.rate) >= cfg.drift_step
        series.append(
            {"t": t0, "phase": "after drift" if drifted else "before drift"} | windows[wi].summary()
        )
    return Report(total.summary(), phases, series, asdict(cfg), round(seconds, 3), behind)


async def simulate(
    sim: Simulation,
    rank: RankFn,
    events: EventsFn,
    progress: Callable[[Outcome], None] | None = None,
    *,
    first: int = 0,
    count: int | None = None,
) -> tuple[list[Outcome], int]:
    """Steps first..first+count-1 (default: 0..requests-1), step i started at (i - first) / rate after
    the call (at most `concurrency` in flight). Returns the outcomes in step order and how many steps
    started more than a second behind their schedule. The same Simulation may run consecutive ranges
    (a loop in phases): its users' histories carry over."""
    cfg = sim.cfg
    count = cfg.requests - first if count is None else count
    gate = asyncio.Semaphore(cfg.concurrency)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    behind = 0
    tasks: list[asyncio.Task[Outcome]] = []

    async def one(i: int) -> Outcome:
        try:
            o = await sim.step(i, rank, events)
        finally:
            gate.release()
        if progress is not None:
            progress(o)
        return o

    for i in range(first, first + count):
        due = t0 + (i - first) / cfg.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await gate.acquire()
        if loop.time() - due > 1.0:
            behind += 1
        tasks.append(asyncio.create_task(one(i)))  # created in step order: users queue in step order
    return list(await asyncio.gather(*tasks)), behind


def http_calls(
    client: Any,
    url: str,
    top_k: int | None = None,
    on_answer: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[RankFn, EventsFn]:
    """RankFn / EventsFn over an httpx.AsyncClient. `top_k`: ask for only the items the user will see
    (so the answer, and the impression it logs, is what was shown). `on_answer`: called with every /rank
    answer's JSON (`din loop-demo --ab` keeps each impression's arm and model version)."""
    import orjson

    url = url.rstrip("/")
    headers = {"content-type": "application/json"}

    async def rank(user_id: str, candidates: list[str]) -> tuple[str | None, list[tuple[str, float]]]:
        req: dict[str, Any] = {"user_id": user_id, "candidates": candidates}
        if top_k is not None:
            req["top_k"] = min(top_k, len(candidates))
        body = orjson.dumps(req)
        r = await client.post(url + "/rank", content=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        a = orjson.loads(r.content)
        if on_answer is not None:
            on_answer(a)
        return a.get("impression_id"), [(it["item_id"], float(it["score"])) for it in a["items"]]

    async def events(evs: list[dict[str, Any]]) -> None:
        r = await client.post(url + "/events", content=orjson.dumps({"events": evs}), headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")

    return rank, events


# ---------------------------------------------------------------- output


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(report: Report) -> str:
    head = (
        f"{'phase':<14}{'requests':>10}{'errors':>8}{'shown':>9}{'clicks':>8}{'CTR':>8}{'exp. CTR':>10}"
        f"{'oracle CTR':>12}{'AUC':>8}"
    )
    rows = [head, "-" * len(head)]
    named = [*report.phases.items(), ("all", report.total)] if len(report.phases) > 1 else []
    named = named or [("all", report.total)]
    for name, s in named:
        rows.append(
            f"{name:<14}{s['requests']:>10,}{s['errors']:>8,}{s['shown']:>9,}{s['clicks']:>8,}"
            f"{_f(s['ctr']):>8}{_f(s['expected_ctr']):>10}{_f(s['oracle_ctr']):>12}{_f(s['auc']):>8}"
        )
    return "\n".join(rows)


def plot_windows(
    windows: Sequence[dict[str, Any]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    marks: Sequence[tuple[float, str, str]] = (),
    who: str = "din simulate",
) -> bool:
    """Online CTR, oracle CTR (the ceiling) and online AUC per window (dicts with `t` and those keys),
    each mark (x, text, colour) a dashed line. False (and a note) without matplotlib."""
    try:
        # Imported here: matplotlib is in the `dev` extra only, and is slow to import.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{who}: matplotlib is not installed (the `dev` extra): no plot", file=sys.stderr)
        return False
    t = [w["t"] for w in windows]
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for key, label in (("ctr", "online CTR"), ("oracle_ctr", "oracle CTR (ceiling)"), ("auc", "online AUC")):
        ax.plot(t, [math.nan if w[key] is None else w[key] for w in windows], marker=".", label=label)
    for x, text, colour in marks:
        ax.axvline(x, color=colour, linestyle="--")
        ax.text(x, 0.02, " " + text, color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plot(report: Report, path: Path) -> bool:
    """CTR, oracle CTR and AUC per window, the drift marked."""
    cfg = report.config
    marks = [] if cfg["drift_step"] is None else [(cfg["drift_step"] / cfg["rate"], "drift", "grey")]
    xlabel = f"seconds of the schedule ({cfg['window_s']:g} s windows)"
    return plot_windows(report.windows, path, title="din simulate", xlabel=xlabel, marks=marks)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, w = SimConfig(), SynthParams()
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="a `din synth` directory (the demo's: .din/demo/raw); default: rebuild the world from "
        "--world-seed/--world-users/--world-items",
    )
    parser.add_argument("--world-seed", type=int, default=w.seed, help="din synth --seed of the world")
    parser.add_argument("--world-users", type=int, default=w.users, help="din synth --users of the world")
    parser.add_argument("--world-items", type=int, default=w.items, help="din synth --items of the world")
    parser.add_argument("--users", type=int, default=None, help="simulate the first N users (default all)")
    parser.add_argument("--seed", type=int, default=d.seed, help="the simulation's seed")
    parser.add_argument("--rate", type=float, default=d.rate, help="requests per second (fixed schedule)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=None, help="seconds (requests = duration x rate)")
    length.add_argument("--requests", type=int, default=None, help=f"requests (default {d.requests})")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="steps in flight at most")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="candidates per request")
    parser.add_argument(
        "--relevant", type=float, default=d.relevant, help="share of candidates drawn as the user's next item"
    )
    parser.add_argument("--top-k", type=int, default=d.top_k, help="items the user looks at")
    parser.add_argument(
        "--position-bias", type=float, default=d.position_bias, help="η: position p examined with (p+1)^-η"
    )
    drift = parser.add_mutually_exclusive_group()
    drift.add_argument("--drift-at", type=float, default=None, help="drift at this second of the schedule")
    drift.add_argument("--drift-after", type=int, default=None, help="drift after this many requests")
    parser.add_argument(
        "--drift-kind",
        choices=DRIFT_KINDS,
        default="rings",
        help="rings: ring slots reshuffled (tastes move); trend: popularity redrawn, more next items by it",
    )
    parser.add_argument(
        "--drift-fraction", type=float, default=1.0, help="share of ring slots (or items, trend) redrawn"
    )
    parser.add_argument("--drift-seed", type=int, default=1, help="which slots, which shuffle")
    parser.add_argument("--window", type=float, default=d.window_s, help="seconds per window of the series")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call")
    parser.add_argument("--api-key", default=None, help="Bearer key when the service has DIN_API_KEYS")
    parser.add_argument("--out", type=Path, default=None, help="write totals, phases and windows as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of CTR / AUC per window")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    d = SimConfig()
    if args.duration is not None and not (args.duration > 0 and math.isfinite(args.duration)):
        raise InvalidArgument(f"--duration must be a positive number of seconds, got {args.duration}")
    if not (args.rate > 0 and math.isfinite(args.rate)):
        raise InvalidArgument(f"--rate must be a positive number, got {args.rate}")
    requests = (
        args.requests
        if args.requests is not None
        else max(1, round(args.duration * args.rate))
        if args.duration is not None
        else d.requests
    )
    drift_step: int | None = None
    if args.drift_at is not None:
        if not (args.drift_at >= 0 and math.isfinite(args.drift_at)):
            raise InvalidArgument(f"--drift-at must be a number of seconds >= 0, got {args.drift_at}")
        drift_step = math.ceil(args.drift_at * args.rate)
    elif args.drift_after is not None:
        if args.drift_after < 0:
            raise InvalidArgument(f"--drift-after must be >= 0, got {args.drift_after}")
        drift_step = args.drift_after
    if args.users is not None and args.users < 1:
        raise InvalidArgument(f"--users must be at least 1, got {args.users}")
    cfg = SimConfig(
        seed=args.seed,
        requests=requests,
        rate=args.rate,
        concurrency=args.concurrency,
        candidates=args.candidates,
        relevant=args.relevant,
        top_k=args.top_k,
        position_bias=args.position_bias,
        drift_step=drift_step,
        window_s=args.window,
    )
    cfg.check()
    return cfg


def _world(args: argparse.Namespace, tmp: str) -> World:
    raw = args.raw
    if raw is None:
        raw = Path(tmp) / "raw"
        params = SynthParams(users=args.world_users, items=args.world_items, seed=args.world_seed)
        generate(raw, params)
    elif not raw.is_dir():
        raise InvalidArgument(f"--raw {raw}: no such directory (a `din synth --out` directory)")
    return load_world(
        raw,
        users=args.users,
        drift_fraction=args.drift_fraction,
        drift_seed=args.drift_seed,
        drift_kind=args.drift_kind,
    )


def progress_bar(total: int, desc: str, *, enabled: bool) -> tuple[Any, Callable[[Outcome], None]]:
    """A tqdm bar on stderr and the callback that advances it per step, showing the running CTR."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=" req", disable=not enabled, file=sys.stderr, mininterval=0.5)
    clicks = shown = 0

    def tick(o: Outcome) -> None:
        nonlocal clicks, shown
        clicks += sum(o.clicked)
        shown += len(o.shown)
        bar.update(1)
        if bar.n % 20 == 0 or bar.n == total:
            bar.set_postfix_str(f"CTR {clicks / shown:.3f}" if shown else "CTR -", refresh=False)

    return bar, tick


async def _run(sim: Simulation, args: argparse.Namespace) -> tuple[list[Outcome], int, float]:
    import httpx

    cfg = sim.cfg
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    bar, progress = progress_bar(cfg.requests, "simulate", enabled=not args.no_progress)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout), headers=headers) as c:
        try:
            r = await c.get(args.url.rstrip("/") + "/readyz")
        except httpx.HTTPError as e:
            raise InvalidArgument(f"cannot reach {args.url}: {e}") from None
        if r.status_code != 200:
            raise InvalidArgument(f"{args.url}/readyz answered {r.status_code}: the service is not ready")
        rank, events = http_calls(c, args.url, cfg.top_k)
        t0 = time.perf_counter()
        outcomes, behind = await simulate(sim, rank, events, progress)
        seconds = time.perf_counter() - t0
    bar.close()
    return outcomes, behind, seconds


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        with tempfile.TemporaryDirectory(prefix="din-simulate-") as tmp:
            sim = Simulation(_world(args, tmp), cfg)
        outcomes, behind, seconds = asyncio.run(_run(sim, args))
    except (InvalidArgument, OSError) as e:
        print(f"din simulate: error: {e}", file=sys.stderr)
        return 2
    report = summarise(outcomes, cfg, seconds, behind)
    drift = "" if cfg.drift_step is None else f", drift at request {cfg.drift_step:,}"
    print(f"din simulate: {cfg.requests:,} requests at {cfg.rate:g}/s in {seconds:.1f} s{drift}")
    print(format_table(report))
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
        print(f"{len(errors):,} step(s) failed, first: {errors[0]}", file=sys.stderr)
    if behind:
        print(f"{behind:,} step(s) started over 1 s behind schedule (raise --concurrency?)", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot is not None and write_plot(report, args.plot):
        print(f"wrote {args.plot}")
    return 1 if errors and len(errors) == len(outcomes) else 0
