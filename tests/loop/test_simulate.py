"""`din simulate`: the metrics against a hand count and a brute-force reference; the same seed gives the
same users, candidates and click draws; the drift changes the true click probabilities as documented;
against a real `din serve` on a real redis-server the clicks reach /events with their impression ids
(the feedback stream and the histories grow by exactly the clicks); bad arguments are one line, exit 2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
import torch

from contracts.errors import InvalidArgument
from loop.simulate import (
    TREND_EXPLORE,
    Outcome,
    SimConfig,
    Simulation,
    World,
    auc,
    click_probabilities,
    drift_truth,
    load_world,
    sample_candidates,
    simulate,
    summarise,
)
from model.din import DINConfig, build_model
from model.export import export_model
from model.synth import SynthParams, generate
from service.store.keys import feedback_key, history_key
from service.store.streams import FIELD
from tests.service.conftest import seed_histories, start_serve, stop_serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("world") / "raw"
    generate(path, SynthParams(users=40, items=240, categories=6, seed=5))
    return path


def _world(raw: Path, fraction: float = 1.0) -> World:
    return load_world(raw, users=None, drift_fraction=fraction, drift_seed=1)


def _stale_oracle(world: World) -> Any:
    """A ranker that knows the pre-drift world exactly (what a perfectly trained model serves)."""

    async def rank(user_id: str, candidates: list[str]) -> tuple[str | None, list[tuple[str, float]]]:
        u = world.user_ids.index(user_id)
        p = click_probabilities(world.truth, world.histories[u], world.truth.item_index(candidates))
        order = np.argsort(-p, kind="stable")
        return "imp", [(candidates[j], float(p[j])) for j in order]

    return rank


async def _no_events(evs: list[dict[str, Any]]) -> None:
    return None


# ---------------------------------------------------------------- metrics


def _auc_pairs(scores: list[float], labels: list[int]) -> float:
    """The definition: over every (clicked, not clicked) pair, 1 if ranked right, 1/2 if tied."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_by_hand_and_against_the_pair_count() -> None:
    # pairs (pos, neg): (.9,.8) 1, (.9,.1) 1, (.8,.8) 1/2, (.8,.1) 1 -> 3.5 / 4
    assert auc([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert auc([0.1, 0.2], [1, 0]) == 0.0
    assert auc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert auc([0.3, 0.4], [1, 1]) is None and auc([], []) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = np.round(rng.random(40), 1).tolist()  # many ties
        y = (rng.random(40) < 0.4).astype(int).tolist()
        assert auc(s, y) == pytest.approx(_auc_pairs(s, y))


def test_phase_and_window_summaries_by_hand() -> None:
    cfg = SimConfig(requests=4, rate=2.0, drift_step=2, window_s=1.0, top_k=2)

    def o(i: int, clicked: list[int], probs: list[float], scores: list[float], oracle: float) -> Outcome:
        return Outcome(
            step=i,
            user=0,
            after_drift=i >= 2,
            candidates=[],
            shown=["a", "b"],
            scores=scores,
            probs=probs,
            clicked=clicked,
            oracle=oracle,
        )

    outcomes = [
        o(0, [1, 0], [0.8, 0.2], [0.9, 0.1], 1.2),
        o(1, [0, 1], [0.4, 0.6], [0.7, 0.3], 1.0),
        o(2, [0, 0], [0.1, 0.1], [0.6, 0.5], 1.8),
        Outcome(step=3, user=0, after_drift=True, candidates=[], error="rank: HTTP 503"),
    ]
    r = summarise(outcomes, cfg)
    before, after = r.phases["before drift"], r.phases["after drift"]
    assert (before["requests"], before["shown"], before["clicks"]) == (2, 4, 2)
    assert before["ctr"] == pytest.approx(0.5)
    assert before["expected_ctr"] == pytest.approx(2.0 / 4)
    assert before["oracle_ctr"] == pytest.approx(2.2 / 4)
    assert before["auc"] == pytest.approx(_auc_pairs([0.9, 0.1, 0.7, 0.3], [1, 0, 0, 1]))  # 0.5
    assert (after["requests"], after["errors"], after["shown"], after["clicks"]) == (2, 1, 2, 0)
    assert after["ctr"] == 0.0 and after["oracle_ctr"] == pytest.approx(0.9) and after["auc"] is None
    assert r.total["requests"] == 4 and r.total["clicks"] == 2
    # 2 steps per 1 s window: steps 0-1 in the window at t=0, steps 2-3 at t=1 (after the drift)
    assert [(w["t"], w["phase"], w["requests"]) for w in r.windows] == [
        (0.0, "before drift", 2),
        (1.0, "after drift", 2),
    ]


# ---------------------------------------------------------------- the world


def _trace(raw: Path, seed: int) -> list[tuple[Any, ...]]:
    world = _world(raw)
    cfg = SimConfig(seed=seed, requests=60, rate=1e6, concurrency=8, drift_step=30, candidates=20)
    outs, _ = asyncio.run(simulate(Simulation(world, cfg), _stale_oracle(world), _no_events))
    return [(o.user, tuple(o.candidates), tuple(o.shown), tuple(o.clicked)) for o in outs]


def test_the_same_seed_gives_the_same_users_candidates_and_clicks(raw: Path) -> None:
    a, b = _trace(raw, seed=3), _trace(raw, seed=3)
    assert a == b
    assert sum(sum(t[3]) for t in a) > 0  # clicks happened, so histories grew along the way
    assert len({t[0] for t in a}) > 10  # many users
    assert _trace(raw, seed=4) != a


def test_clicks_grow_the_hidden_history_newest_last_clicked_first(raw: Path) -> None:
    world = _world(raw)
    before = [list(h) for h in world.histories]
    cfg = SimConfig(seed=1, requests=40, rate=1e6, candidates=20)
    outs, _ = asyncio.run(simulate(Simulation(world, cfg), _stale_oracle(world), _no_events))
    expected = [list(h) for h in before]
    for o in outs:  # replay: each step's clicks go to the front, in position order (last = newest)
        for item, c in zip(o.shown, o.clicked, strict=True):
            if c:
                expected[o.user] = [int(world.truth.item_index([item])[0]), *expected[o.user]][:100]
    assert world.histories == expected


def test_candidates_are_distinct_new_to_the_user_and_partly_next_item_draws(raw: Path) -> None:
    world = _world(raw)
    t, h = world.truth, world.histories[0]
    rng = np.random.default_rng(0)
    cand = sample_candidates(t, h, 30, 0.5, rng)
    assert len(set(cand.tolist())) == 30 and not set(cand.tolist()) & set(h)
    p = click_probabilities(t, h, cand)
    # the next-item draws (first half) are far more clickable than the uniform ones
    assert p[:15].mean() > p[15:].mean() + 0.2


def test_drift_reshuffles_the_rings_and_changes_the_true_click_probabilities(raw: Path) -> None:
    t = _world(raw).truth
    same = drift_truth(t, 0.0, seed=1)
    assert np.array_equal(same.ring_items, t.ring_items) and np.array_equal(same.item_cat, t.item_cat)
    d = drift_truth(t, 1.0, seed=1)
    # a permutation of the same items over the same slots: category sizes stay, items change categories
    assert sorted(d.ring_items.tolist()) == list(range(len(t.item_ids)))
    assert np.array_equal(np.bincount(d.item_cat), t.cat_size)
    assert (d.item_cat != t.item_cat).mean() > 0.5
    for c in range(len(t.cat_size)):  # item_cat / item_rank agree with the ring slots
        slots = d.ring_items[t.cat_start[c] : t.cat_start[c] + t.cat_size[c]]
        assert (d.item_cat[slots] == c).all() and d.item_rank[slots].tolist() == list(range(t.cat_size[c]))
    # the items a user would click most (the oracle's top 10 of the catalogue) change
    world = _world(raw)
    changed = 0
    for h in world.histories[:20]:
        items = np.setdiff1d(np.arange(len(t.item_ids)), h)
        top_before = set(items[np.argsort(-click_probabilities(t, h, items))[:10]].tolist())
        top_after = set(items[np.argsort(-click_probabilities(d, h, items))[:10]].tolist())
        changed += len(top_before & top_after) < 5
        assert np.allclose(click_probabilities(same, h, items), click_probabilities(t, h, items))
    assert changed >= 18
    # a stale perfect ranker: near the oracle before the drift, far below it after
    world = _world(raw)
    cfg = SimConfig(seed=2, requests=300, rate=1e6, drift_step=150, candidates=30)
    outs, _ = asyncio.run(simulate(Simulation(world, cfg), _stale_oracle(world), _no_events))
    r = summarise(outs, cfg)
    before, after = r.phases["before drift"], r.phases["after drift"]
    assert before["expected_ctr"] == pytest.approx(before["oracle_ctr"], rel=0.02)
    assert after["expected_ctr"] < 0.75 * after["oracle_ctr"]
    assert before["auc"] > 0.7 and after["auc"] < before["auc"] - 0.15


def test_a_trend_drift_redraws_popularity_keeps_the_rings_and_stales_the_ranking(raw: Path) -> None:
    t = _world(raw).truth
    d = drift_truth(t, 0.5, seed=1, kind="trend")
    assert np.array_equal(d.ring_items, t.ring_items) and np.array_equal(d.item_cat, t.item_cat)
    assert d.pop.sum() == pytest.approx(1.0) and d.explore == TREND_EXPLORE > t.explore
    moved = d.pop != t.pop
    assert moved.sum() == pytest.approx(0.5 * len(t.pop), abs=1)  # the chosen half, and only it
    # the new hits: the spread of the redrawn share is wider than the old one's
    assert np.std(np.log(d.pop[moved])) > np.std(np.log(t.pop[moved])) * 1.4
    with pytest.raises(InvalidArgument, match="drift kind must be one of rings, trend"):
        drift_truth(t, 0.5, seed=1, kind="fashion")
    world = load_world(raw, users=None, drift_fraction=1.0, drift_seed=1, drift_kind="trend")
    cfg = SimConfig(seed=2, requests=300, rate=1e6, drift_step=150, candidates=30)
    outs, _ = asyncio.run(simulate(Simulation(world, cfg), _stale_oracle(world), _no_events))
    r = summarise(outs, cfg)
    before, after = r.phases["before drift"], r.phases["after drift"]
    assert before["expected_ctr"] == pytest.approx(before["oracle_ctr"], rel=0.02)
    assert after["expected_ctr"] < 0.9 * after["oracle_ctr"]


def test_position_bias_lowers_the_click_probability_down_the_list(raw: Path) -> None:
    world = _world(raw)
    cfg = SimConfig(seed=2, requests=30, rate=1e6, candidates=20, top_k=5, position_bias=1.0)
    outs, _ = asyncio.run(simulate(Simulation(world, cfg), _stale_oracle(world), _no_events))
    assert sum(len(o.shown) for o in outs) == 30 * 5
    for o in outs:
        # probs are the true probability times 1/(p+1): never above the examination probability
        assert all(p <= 1.0 / (i + 1) + 1e-12 for i, p in enumerate(o.probs))


# ---------------------------------------------------------------- against a real din serve


def _bundle(raw: Path, path: Path) -> None:
    """A random DIN over the world's own items and categories (mechanics, not quality)."""
    world = _world(raw)
    t = world.truth
    items = ["<pad>", "<oov>", *t.item_ids.tolist()]
    categories = ["<pad>", "<oov>", *t.category_names.tolist()]
    item_cate = torch.tensor([0, 1, *(t.item_cat + 2).tolist()], dtype=torch.int64)
    cfg = DINConfig(n_items=len(items), n_categories=len(categories), max_history=20)
    model = build_model(cfg, item_cate, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.eval()
    export_model(model, items, path, model_version="sim-v1", metrics={"auc": 0.5}, categories=categories)


@pytest.fixture(scope="module")
def sim_bundle(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    _bundle(raw, path)
    return path


@pytest.fixture
def served(raw: Path, sim_bundle: Path, redis_url: str, tmp_path: Path) -> Iterator[str]:
    world = _world(raw)
    seed_histories(
        redis_url,
        {u: world.truth.item_ids[h].tolist() for u, h in zip(world.user_ids, world.histories, strict=True)},
    )
    proc, url = start_serve(
        "--bundle", str(sim_bundle), "--redis-url", redis_url, "--log-impressions", log=tmp_path / "serve.log"
    )
    try:
        yield url
    finally:
        stop_serve(proc)


def _din(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_clicks_reach_events_with_their_impression_ids(
    served: str, raw: Path, redis_url: str, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    world = _world(raw)
    before = {u: r.llen(history_key("din:", u)) for u in world.user_ids}
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    proc = _din(
        "simulate", "--url", served, "--raw", str(raw), "--requests", "80", "--rate", "40",
        "--concurrency", "4", "--candidates", "20", "--drift-after", "40", "--window", "0.5",
        "--out", str(out), "--plot", str(plot), "--no-progress", "--seed", "9",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "before drift" in proc.stdout and "after drift" in proc.stdout and "oracle CTR" in proc.stdout
    report = json.loads(out.read_text())
    total = report["total"]
    assert total["requests"] == 80 and total["errors"] == 0 and total["shown"] == 80 * 10
    assert total["clicks"] > 0
    assert [p["requests"] for p in report["phases"].values()] == [40, 40]
    assert sum(w["requests"] for w in report["windows"]) == 80 and len(report["windows"]) == 4
    try:
        import matplotlib  # noqa: F401

        assert plot.stat().st_size > 1000
    except ImportError:
        pass
    # every click is one feedback record naming a /rank answer's impression, for the right user
    feedback = [orjson.loads(f[FIELD]) for _, f in r.xrange(feedback_key("din:"))]
    assert len(feedback) == total["clicks"]
    assert all(len(f["impression_id"]) == 32 and f["user_id"] in before for f in feedback)
    assert len({f["event_id"] for f in feedback}) == len(feedback)
    # and each user's newest history entries are their clicks, the last click newest
    by_user: dict[str, list[str]] = {}
    for f in feedback:
        by_user.setdefault(f["user_id"], []).append(f["item_id"])
    for u, clicked in by_user.items():  # (the server keeps the bundle's T = 20 newest)
        newest = r.lrange(history_key("din:", u), 0, len(clicked) - 1)
        assert len(newest) == min(len(clicked), 20) and newest == clicked[::-1][: len(newest)]
    r.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "--rate must be a positive number"),
        (["--requests", "0"], "at least 1 request"),
        (["--duration", "-1"], "--duration must be"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--relevant", "1.5"], "--relevant must be in [0, 1]"),
        (["--drift-fraction", "2"], "drift fraction must be in [0, 1]"),
        (["--drift-at", "-3"], "--drift-at must be"),
        (["--raw", "/nonexistent/raw"], "no such directory"),
        (["--url", "http://127.0.0.1:9"], "cannot reach"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str, raw: Path) -> None:
    base = ["simulate", "--url", "http://127.0.0.1:9", "--raw", str(raw), "--no-progress"]
    proc = _din(*base, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("din simulate: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_the_simulator_never_imports_torch() -> None:
    code = "import sys, loop.simulate, cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
