"""What `explain` costs, and how close a cheap additive approximation of the contributions comes.

One random DIN of the demo's size (3,000 items, 32 categories, E = 128, T = 100; weights scaled so
scores spread) exported by `din export`: model.onnx (what every request runs) and explain.onnx (what an
explained request runs on the items it returns). One user with a full 100-behaviour history; for each
shape (candidates scored, items returned and explained), timed through `Ranker`, interleaved round after
round in a shuffled order, median and p10-p90 of `--rounds`, one ONNX Runtime thread (a worker's):

- score: `score_batch` (the graph every request runs);
- explain: `explain_batch` on the returned items (ctr, attention, and every behaviour's exact
  leave-one-out contribution: one more head pass per (item, behaviour));
- score twice: the same call twice in a row (how far apart two measurements of one thing land);

then the handler's own work (`reasons`: each item's `because` and `against`).

The approximation: gradient x input in the interest vector, c_t ~ d ctr / d u . (w_t k_t) (first order in
what removing behaviour t takes out of u; one backward pass an item instead of T head passes), against
the exact contributions on the same rows: max and mean absolute error, and how often the top 3 of
`because` and of `against` come out the same.

    python bench/explain.py            # writes bench/results/explain.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.bundle import load_bundle
from contracts.vocab import FIRST_ID
from model.din import DIN, DINConfig, build_model
from model.export import export_model
from service.explain import Explanation, reasons
from service.ranker import Ranker

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(10, 10), (200, 10), (1000, 10), (200, 100), (200, 200)]  # (candidates scored, items explained)


def cpu_line() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def make_model(T: int) -> tuple[DIN, list[str]]:
    n_items, n_cate = 3000, 32
    g = torch.Generator().manual_seed(0)
    item_cate = torch.randint(FIRST_ID, n_cate, (n_items,), generator=g)
    item_cate[0], item_cate[1] = 0, 1
    model = build_model(DINConfig(n_items=n_items, n_categories=n_cate, max_history=T), item_cate, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # spread the scores, as a trained model's are
    return model.eval(), ["<pad>", "<oov>", *(f"i{k}" for k in range(FIRST_ID, n_items))]


def summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3}


def gradient_x_input(model: DIN, target: torch.Tensor, hist: torch.Tensor) -> np.ndarray:
    """The first-order estimate of each behaviour's contribution: target (n,), hist (n, T) full -> (n, T)."""
    n, T = hist.shape
    q = model.embed(target)  # (n, E)
    k = model.embed(hist)  # (n, T, E)
    w = model.attention(target, hist, torch.full((n,), T))  # (n, T)
    u = torch.einsum("nt,nte->ne", w, k).detach().requires_grad_(True)
    torch.sigmoid(model._head(u, q)).sum().backward()
    assert u.grad is not None
    return torch.einsum("ne,nt,nte->nt", u.grad, w, k).detach().numpy()


def approximation(model: DIN, ranker: Ranker, T: int, users: int = 20, per_user: int = 10) -> dict[str, Any]:
    """The estimate against the exact contributions (explain.onnx, which export checked against
    DIN.leave_one_out), on `users` random full histories with `per_user` random items each."""
    rng = np.random.default_rng(1)
    known = ranker.vocab.known()
    exact, approx = [], []
    for _ in range(users):
        hist, cands = rng.choice(known, T).tolist(), rng.choice(known, per_user).tolist()
        exact.append(ranker.explain_batch([(cands, hist)])[0].contribution)
        h = torch.from_numpy(ranker.encode(hist)).repeat(per_user, 1)
        approx.append(gradient_x_input(model, torch.from_numpy(ranker.encode(cands)), h))
    e, a = np.concatenate(exact), np.concatenate(approx)
    err = np.abs(e - a)

    def top3(x: np.ndarray, sign: float) -> list[set[int]]:
        return [set(np.argsort(-sign * row, kind="stable")[:3].tolist()) for row in x]

    same_up = np.mean([p == q for p, q in zip(top3(e, 1), top3(a, 1), strict=True)])
    same_down = np.mean([p == q for p, q in zip(top3(e, -1), top3(a, -1), strict=True)])
    sign = np.mean(np.sign(e) == np.sign(a))
    return {
        "rows": int(e.shape[0]),
        "behaviours": T,
        "exact_mean_abs": float(np.abs(e).mean()),
        "exact_max_abs": float(np.abs(e).max()),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "same_sign_share": float(sign),
        "same_top3_because_share": float(same_up),
        "same_top3_against_share": float(same_down),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100, help="timed rounds per shape and variant")
    ap.add_argument("--history", type=int, default=100, help="T, and the user's history length")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0 = ORT default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "explain.json")
    args = ap.parse_args()
    T = args.history
    model, items = make_model(T)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, items, Path(tmp) / "b", model_version="bench-explain")
        kw: dict[str, Any] = {"providers": ["CPUExecutionProvider"], "intra_op_threads": args.threads}
        ranker = Ranker(load_bundle(Path(tmp) / "b"), **kw)
    assert ranker.can_explain
    rng = np.random.default_rng(0)
    known = ranker.vocab.known()
    history = rng.choice(known, T).tolist()
    results: list[dict[str, Any]] = []
    print(f"CPU: {cpu_line()}; T = {T}; {args.rounds} rounds; ORT threads {args.threads or 'default'}")
    head = ("scored", "explained", "score", "explain", "score+explain", "explain/score", "score vs score")
    print("{:>7} {:>10} {:>10} {:>10} {:>14} {:>14} {:>15}".format(*head))
    for cands, explained in SHAPES:
        candidates = rng.choice(known, cands, replace=False).tolist()
        variants: dict[str, Callable[[], object]] = {
            "score": functools.partial(ranker.score_batch, [(candidates, history)]),
            "explain": functools.partial(ranker.explain_batch, [(candidates[:explained], history)]),
            "score_again": functools.partial(ranker.score_batch, [(candidates, history)]),
        }
        for fn in variants.values():  # warm-up
            for _ in range(5):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants.items())
        shuffler = random.Random(cands * 7919 + explained)
        for _ in range(args.rounds):
            shuffler.shuffle(order)
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        stats = {name: summary(t) for name, t in times.items()}
        score, explain = stats["score"]["median_ms"], stats["explain"]["median_ms"]
        row = {
            "candidates": cands,
            "explained_items": explained,
            "history": T,
            **stats,
            "explained_request_ms": score + explain,
            "explain_over_score": explain / score,
            "same_work_twice_pct": 100 * (stats["score_again"]["median_ms"] / score - 1),
        }
        results.append(row)
        print(
            f"{cands:>7} {explained:>10} {score:>8.2f}ms {explain:>8.2f}ms {score + explain:>12.2f}ms "
            f"{explain / score:>13.2f}x {row['same_work_twice_pct']:>+14.1f}%"
        )

    # the handler's part: each returned item's because and against
    picks = []
    for n, top in [(10, 5), (200, 5), (200, 100)]:
        why = Explanation(
            np.arange(n),
            [f"i{k}" for k in range(T)],
            rng.random((n, T), dtype=np.float32),
            rng.standard_normal((n, T), dtype=np.float32),
        )
        t = []
        for _ in range(50):
            t0 = time.perf_counter()
            reasons(why, top)
            t.append(time.perf_counter() - t0)
        picks.append({"items": n, "explain_top": top, "median_ms": statistics.median(t) * 1e3})
        print(f"reasons(): {n} items x T={T}, explain_top {top}: {statistics.median(t) * 1e3:.2f} ms")

    approx = approximation(model, ranker, T)
    print(
        "gradient x input vs exact leave-one-out ({rows} items x {behaviours} behaviours): max |error| "
        "{max_abs_error:.2e}, mean {mean_abs_error:.2e} (exact contributions: mean |c| {exact_mean_abs:.2e}, "
        "max {exact_max_abs:.2e}); same sign {same_sign_share:.1%}; same top 3 because "
        "{same_top3_because_share:.1%}, against {same_top3_against_share:.1%}".format(**approx)
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "cpu": cpu_line(),
        "T": T,
        "rounds": args.rounds,
        "graph": results,
        "reasons": picks,
        "approximation": approx,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
