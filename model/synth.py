"""`din synth`: a synthetic SNAP-format review data set whose next-item process is known exactly.

The process is built so that a user's next item is driven by ONE specific earlier behaviour, which is
what DIN's local activation captures and sum pooling blurs:

- Catalogue. C categories of long-tailed sizes (default C = items / 100). Each item sits at a position
  on its category's ring: its latent vector is (category, angle). Each item also has a popularity
  (log-normal weights).
- Users. Event counts are 5 + a log-normal tail (5-core like SNAP; mean --events-per-user).
- Seed events. A user's first S = 3 events are drawn by popularity: they start a few interests.
- Every later event: with probability ε (--explore) the user explores (an item drawn by popularity,
  which may open a new interest); otherwise the user picks a trigger among their past events, the
  event of age a (a = 1 for the latest) with probability ∝ λ^(a-1) (--recency), and moves from the
  trigger along its category's ring by an offset ±d, d >= 1 with P(d) = (1-r)·r^(d-1) (--ring-decay):
  the next item is a close neighbour of that one trigger, in the trigger's category.
- A user never reviews an item twice: a draw that hits an item the user already touched is redrawn
  from scratch (trigger, offset, exploration), so the next item follows the distribution above
  conditioned on being new.

Oracle. Given a history h (newest first, as a prepared sample shows it: at most max_history items)
and a target j, the generator's probability of j being the next item is

    P(j | h) = ε·pop(j) + (1-ε)·Σ_a w_a·ring(h_a → j)          (pop(j) alone while |h| < S)
    oracle(j | h) = P(j | h) / (1 - Σ_{t ∈ h} P(t | h))  for j ∉ h, 0 for j ∈ h

with w_a = (1-λ)λ^(a-1) / (1-λ^|h|) and ring(i → j) the exact probability (wrap-around included) that
the ring walk from i lands on j. It is exact when the sample shows the whole history; with a history
cut to max_history, the older events only enter through λ^100 (negligible) and the renormalisation.
`oracle_auc` scores a prepared split with it: the best AUC any model of (history, target) can reach
on that split, up to sampling noise. `level="category"` gives the oracle that only knows which
categories the history touched (the ring replaced by a uniform draw within the category): the ceiling
of a model that cannot single out the trigger behaviour.

Files: RAW_DIR/reviews.json.gz (JSON lines, sorted by asin like the SNAP release), RAW_DIR/meta.json.gz
(SNAP's Python-literal lines), RAW_DIR/truth.npz (the catalogue and parameters) and truth.json (the
parameters and counts, human-readable). Output is byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contracts.errors import InvalidArgument
from contracts.vocab import FIRST_ID

DAY = 86_400
_T0_DAY = 12_784  # 2005-01-01 in days since the epoch
_SPAN_DAYS = 8 * 365  # users start within 8 years (the SNAP 2014 release spans ~1996-2014)
_B36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
_MAX_REDRAWS = 200  # per step; after that a uniform draw (practically never reached, counted)


@dataclass
class SynthParams:
    users: int = 4000
    items: int = 3000
    categories: int | None = None  # None: items // 100, like Amazon Electronics' ~600 leaves / 63k items
    events_per_user: float = 30.0  # mean, 5 at least; 4000 users x 30 ~ 120k reviews
    seed: int = 0
    explore: float = 0.15  # ε: probability of an exploration draw (by popularity)
    recency: float = 0.8  # λ: trigger of age a chosen with weight λ^(a-1)
    ring_decay: float = 0.5  # r: ring offset d >= 1 with probability (1-r) r^(d-1), either direction
    seed_events: int = 3  # S: first events drawn by popularity
    popularity_sigma: float = 0.8  # log-normal spread of item popularity
    count_sigma: float = 1.0  # log-normal spread of events per user (the long tail)
    max_events: int = 1000  # cap on one user's events

    def n_categories(self) -> int:
        return self.categories if self.categories is not None else max(1, self.items // 100)


# ---------------------------------------------------------------- the catalogue


@dataclass
class Truth:
    """The generator's catalogue and parameters: everything the oracle needs."""

    item_ids: np.ndarray  # str (M,): asin of item index i
    item_cat: np.ndarray  # int64 (M,)
    item_rank: np.ndarray  # int64 (M,): position on its category's ring
    ring_items: np.ndarray  # int64 (M,): items by (category, ring position)
    cat_start: np.ndarray  # int64 (C,): first slot of category c in ring_items
    cat_size: np.ndarray  # int64 (C,)
    pop: np.ndarray  # float64 (M,): exploration probabilities, sum 1
    category_names: np.ndarray  # str (C,)
    explore: float
    recency: float
    ring_decay: float
    seed_events: int

    @cached_property
    def _index(self) -> dict[str, int]:
        return {str(a): i for i, a in enumerate(self.item_ids.tolist())}

    def item_index(self, ids: Sequence[str]) -> np.ndarray:
        """asins -> int64 item indices, -1 for ids the generator never made."""
        get = self._index.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def save(self, path: Path) -> None:
        scalars = {
            k: np.asarray(getattr(self, k)) for k in ("explore", "recency", "ring_decay", "seed_events")
        }
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        # Any: numpy types savez's **kwds against its own allow_pickle: bool keyword too
        payload: dict[str, Any] = {**arrays, **scalars}
        np.savez(path, **payload)


def load_truth(raw_dir: str | Path) -> Truth:
    with np.load(Path(raw_dir) / "truth.npz") as z:
        return Truth(
            item_ids=z["item_ids"],
            item_cat=z["item_cat"],
            item_rank=z["item_rank"],
            ring_items=z["ring_items"],
            cat_start=z["cat_start"],
            cat_size=z["cat_size"],
            pop=z["pop"],
            category_names=z["category_names"],
            explore=float(z["explore"]),
            recency=float(z["recency"]),
            ring_decay=float(z["ring_decay"]),
            seed_events=int(z["seed_events"]),
        )


def _ids(n: int, prefix: str, width: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct SNAP-looking ids: prefix + `width` random base-36 digits (duplicates redrawn)."""
    if n > 36**width // 4:
        raise InvalidArgument(f"cannot make {n} distinct ids of {width} digits")
    digits = rng.integers(0, 36, size=(n, width))
    while True:
        ids = _B36[digits].view(f"S{width}").ravel()
        _, first = np.unique(ids, return_index=True)
        dup = np.setdiff1d(np.arange(n), first)
        if len(dup) == 0:
            return np.char.add(prefix, ids.astype(f"U{width}"))
        digits[dup] = rng.integers(0, 36, size=(len(dup), width))


def _catalogue(p: SynthParams, rng: np.random.Generator) -> Truth:
    M, C = p.items, p.n_categories()
    if C < 1 or M < C:
        raise InvalidArgument(f"need 1 <= categories <= items, got {C} categories for {M} items")
    base = 5 if M >= 5 * C else M // C  # rings of at least 5 items when the catalogue allows
    weights = rng.lognormal(0.0, 0.6, C)
    sizes = base + rng.multinomial(M - base * C, weights / weights.sum())
    cat_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ring_items = rng.permutation(M).astype(np.int64)  # category c owns slots cat_start[c] ...
    item_cat = np.empty(M, dtype=np.int64)
    item_rank = np.empty(M, dtype=np.int64)
    item_cat[ring_items] = np.repeat(np.arange(C), sizes)
    item_rank[ring_items] = np.arange(M) - np.repeat(cat_start, sizes)
    pop = rng.lognormal(0.0, p.popularity_sigma, M)
    return Truth(
        item_ids=_ids(M, "B0", 8, rng),
        item_cat=item_cat,
        item_rank=item_rank,
        ring_items=ring_items,
        cat_start=cat_start,
        cat_size=sizes.astype(np.int64),
        pop=pop / pop.sum(),
        category_names=np.array([f"Category {c:04d}" for c in range(C)]),
        explore=p.explore,
        recency=p.recency,
        ring_decay=p.ring_decay,
        seed_events=p.seed_events,
    )


# ---------------------------------------------------------------- the process


class _Simulator:
    """All users advance one step at a time; per step everything is a numpy operation over the users."""

    def __init__(self, truth: Truth, n_events: np.ndarray, rng: np.random.Generator) -> None:
        self.t, self.rng = truth, rng
        self.n = n_events  # sorted descending: the users still active at step k are a prefix
        self.off = np.concatenate([[0], np.cumsum(n_events)[:-1]]).astype(np.int64)
        self.seq = np.full(int(n_events.sum()), -1, dtype=np.int64)
        self.pop_cdf = np.cumsum(truth.pop)
        self.redraws = 0
        self.fallbacks = 0

    def _by_popularity(self, m: int) -> np.ndarray:
        u = self.rng.random(m) * self.pop_cdf[-1]
        return np.minimum(np.searchsorted(self.pop_cdf, u, side="right"), len(self.pop_cdf) - 1)

    def _draw(self, rows: np.ndarray, k: int) -> np.ndarray:
        """One draw of step k for users `rows`, ignoring what they already touched."""
        t, rng, m = self.t, self.rng, len(rows)
        if k < t.seed_events:
            return self._by_popularity(m)
        explore = rng.random(m) < t.explore
        lam = t.recency
        # trigger age a in [1, k] with P(a) ∝ λ^(a-1): inverse CDF of the truncated geometric
        u = rng.random(m)
        age = np.ceil(np.log1p(-u * (1.0 - lam**k)) / np.log(lam)).astype(np.int64)
        age = np.clip(age, 1, k)
        trig = self.seq[self.off[rows] + k - age]
        # ring offset: d >= 1 with P(d) = (1-r) r^(d-1), direction by a fair coin
        d = 1 + np.floor(np.log1p(-rng.random(m)) / np.log(t.ring_decay)).astype(np.int64)
        d = np.where(rng.random(m) < 0.5, d, -d)
        c = t.item_cat[trig]
        cand = t.ring_items[t.cat_start[c] + (t.item_rank[trig] + d) % t.cat_size[c]]
        n_explore = int(explore.sum())
        cand[explore] = self._by_popularity(n_explore)
        return cand

    def _touched(self, rows: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
        if k == 0:
            return np.zeros(len(rows), dtype=bool)
        past = self.seq[self.off[rows][:, None] + np.arange(k)]  # (m, k)
        return (past == cand[:, None]).any(axis=1)

    def step(self, k: int) -> int:
        """Draw event k of every user with more than k events; returns how many users that was."""
        active = int(np.searchsorted(-self.n, -k, side="left"))  # users with n > k
        rows = np.arange(active)
        cand = self._draw(rows, k)
        todo = rows
        for _ in range(_MAX_REDRAWS):
            todo = todo[self._touched(todo, cand[todo], k)]
            if len(todo) == 0:
                break
            self.redraws += len(todo)
            cand[todo] = self._draw(todo, k)
        else:
            for i in todo:  # a user boxed in by their own past: any untouched item (counted)
                own = set(self.seq[self.off[i] : self.off[i] + k].tolist())
                free = np.setdiff1d(np.arange(len(self.t.pop)), np.fromiter(own, dtype=np.int64))
                cand[i] = free[self.rng.integers(len(free))]
                self.fallbacks += 1
        self.seq[self.off[:active] + k] = cand
        return active


def _event_counts(p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """5 + floor(log-normal) per user, mean ~ events_per_user, capped (and at most items - 1)."""
    extra_mean = max(p.events_per_user - 4.5, 0.05)  # floor() loses 0.5 on average
    mu = np.log(extra_mean) - p.count_sigma**2 / 2
    n = 5 + np.floor(rng.lognormal(mu, p.count_sigma, p.users)).astype(np.int64)
    return np.minimum(n, min(p.max_events, p.items - 1))


# ---------------------------------------------------------------- writing


@contextmanager
def _gzip_writer(path: Path) -> Iterator[gzip.GzipFile]:
    # mtime=0 and no file name in the header: the same seed gives the same bytes; level 1 for speed
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as f,
    ):
        yield f


def _write_reviews(
    path: Path,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    ev_user: np.ndarray,
    ev_item: np.ndarray,
    ev_time: np.ndarray,
    rating: np.ndarray,
) -> None:
    asin_rank = np.empty(len(item_ids), dtype=np.int64)
    asin_rank[np.argsort(item_ids, kind="stable")] = np.arange(len(item_ids))
    order = np.lexsort((ev_time, asin_rank[ev_item]))  # the SNAP files are grouped by asin
    chunk = 200_000
    with _gzip_writer(path) as f:
        for s in range(0, len(order), chunk):
            o = order[s : s + chunk]
            rows = zip(
                user_ids[ev_user[o]].tolist(),
                item_ids[ev_item[o]].tolist(),
                rating[o].tolist(),
                ev_time[o].tolist(),
                strict=True,
            )
            # ids are [0-9A-Z] only, so formatting by hand is valid JSON (and 3x faster than dumps)
            f.write(
                "".join(
                    f'{{"reviewerID": "{u}", "asin": "{a}", "reviewText": "Synthetic review of {a}.", '
                    f'"overall": {r}.0, "unixReviewTime": {t}}}\n'
                    for u, a, r, t in rows
                ).encode()
            )


def _write_meta(path: Path, truth: Truth, rng: np.random.Generator) -> None:
    price = np.round(rng.lognormal(3.0, 1.0, len(truth.item_ids)), 2).tolist()
    order = np.argsort(truth.item_ids, kind="stable")
    with _gzip_writer(path) as f:
        lines = []
        for i in order.tolist():
            asin, c = str(truth.item_ids[i]), int(truth.item_cat[i])
            # some titles with an apostrophe, so repr() switches to double quotes as in the real files
            title = f"Editor's pick {asin}" if i % 7 == 0 else f"Synthetic item {asin}"
            obj = {
                "asin": asin,
                "title": title,
                "price": price[i],
                "categories": [["Electronics", f"Group {c % 10}", str(truth.category_names[c])]],
            }
            lines.append(repr(obj) + "\n")  # SNAP's meta is Python literals, not JSON
        f.write("".join(lines).encode())


# ---------------------------------------------------------------- generate


def generate(
    out: str | Path, params: SynthParams | None = None, progress: bool = False, verbose: bool = False
) -> dict[str, Any]:
    """Write RAW_DIR (see the module docstring); returns truth.json's content."""
    p = params or SynthParams()
    if p.users < 1 or p.items < 6:
        raise InvalidArgument("need at least 1 user and 6 items")
    if not (0.0 <= p.explore <= 1.0 and 0.0 < p.recency < 1.0 and 0.0 < p.ring_decay < 1.0):
        raise InvalidArgument("explore must be in [0, 1], recency and ring_decay in (0, 1)")
    t0 = time.perf_counter()
    rng = np.random.default_rng(p.seed)
    truth = _catalogue(p, rng)
    n = _event_counts(p, rng)
    order = np.argsort(-n, kind="stable")  # simulate the longest users first (active users = a prefix)
    sim = _Simulator(truth, n[order], rng)
    bar = tqdm(
        total=len(sim.seq),
        desc="synth",
        unit=" events",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    )
    for k in range(int(n.max())):
        bar.update(sim.step(k))
    bar.close()

    ev_user = np.repeat(order, n[order])  # user index of every simulated event
    ev_item = sim.seq
    # strictly increasing days per user: file order never matters to prepare
    gaps = rng.geometric(1 / 12, size=len(ev_item)).astype(np.int64)
    first = sim.off
    cum = np.cumsum(gaps)
    within = cum - np.repeat(cum[first] - gaps[first], n[order])
    start = rng.integers(_T0_DAY, _T0_DAY + _SPAN_DAYS, size=p.users)
    ev_time = (start[ev_user] + within) * DAY
    rating = rng.choice(np.arange(1, 6), size=len(ev_item), p=[0.05, 0.07, 0.12, 0.28, 0.48])
    user_ids = _ids(p.users, "A", 12, rng)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_reviews(out / "reviews.json.gz", user_ids, truth.item_ids, ev_user, ev_item, ev_time, rating)
    _write_meta(out / "meta.json.gz", truth, rng)
    truth.save(out / "truth.npz")
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {
        "format": "din-synth/1",
        "params": asdict(p) | {"categories": p.n_categories()},
        "process": "seed events by popularity; then explore (popularity) with prob. explore, else a "
        "ring-walk step from one past event chosen with recency weights; no repeated items",
        "reviews": len(ev_item),
        "users": p.users,
        "items_reviewed": len(np.unique(ev_item)),
        "events_per_user": {
            "min": int(n.min()),
            "median": float(np.median(n)),
            "mean": float(n.mean()),
            "max": int(n.max()),
        },
        "redraws": sim.redraws,
        "fallbacks": sim.fallbacks,
        "seconds": round(seconds, 3),
    }
    (out / "truth.json").write_text(json.dumps(info, indent=2) + "\n")
    if verbose:
        print(_summary(info, out))
    return info


def _summary(info: dict[str, Any], out: Path) -> str:
    p, e = info["params"], info["events_per_user"]
    rows = [
        ("users", f"{info['users']:,}"),
        ("items (reviewed / catalogue)", f"{info['items_reviewed']:,} / {p['items']:,}"),
        ("categories", f"{p['categories']:,}"),
        ("reviews", f"{info['reviews']:,}"),
        (
            "events per user min/median/mean/max",
            f"{e['min']} / {e['median']:.0f} / {e['mean']:.1f} / {e['max']}",
        ),
        ("explore ε, recency λ, ring decay r", f"{p['explore']}, {p['recency']}, {p['ring_decay']}"),
        ("redraws (item already touched)", f"{info['redraws']:,}"),
        ("fallback draws", f"{info['fallbacks']:,}"),
        ("seconds", f"{info['seconds']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"wrote {out}", *(f"  {k:<{width}}  {v}" for k, v in rows)])


# ---------------------------------------------------------------- the oracle


def _transition(t: Truth, src: np.ndarray, dst: np.ndarray, level: str) -> np.ndarray:
    """Probability that one non-exploring step with trigger src lands on dst (broadcast; -1 = unknown)."""
    ok = (src >= 0) & (dst >= 0)
    s, d = np.where(ok, src, 0), np.where(ok, dst, 0)
    c = t.item_cat[s]
    same = ok & (c == t.item_cat[d])
    n = t.cat_size[c]
    if level == "category":
        return np.where(same, 1.0 / n, 0.0)
    r = t.ring_decay
    d0 = (t.item_rank[d] - t.item_rank[s]) % n
    # forward offsets d0, d0+n, ...; backward n-d0, 2n-d0, ...; d0 = 0 means a full lap either way
    fwd = np.where(d0 == 0, n, d0)
    bwd = n - d0
    p = 0.5 * (1 - r) * (r ** (fwd - 1.0) + r ** (bwd - 1.0)) / (1 - r ** n.astype(np.float64))
    return np.where(same, p, 0.0)


def _oracle_core(
    t: Truth, hist: np.ndarray, hist_len: np.ndarray, target: np.ndarray, level: str
) -> np.ndarray:
    """hist int64 (B, L) truth indices newest first (-1: unknown), hist_len (B,), target (B,) -> (B,)."""
    if level not in ("item", "category"):
        raise InvalidArgument(f"level must be 'item' or 'category', got {level!r}")
    B = len(target)
    out = np.zeros(B, dtype=np.float64)
    order = np.argsort(hist_len, kind="stable")  # chunks of similar length: little padding in (b, L, L)
    lam, eps, S = t.recency, t.explore, t.seed_events
    start = 0
    while start < B:
        L_hi = max(int(hist_len[order[min(start + 4096, B) - 1]]), 1)
        size = int(np.clip(2_000_000 // (L_hi * L_hi), 16, 4096))
        idx = order[start : start + size]
        start += size
        n = hist_len[idx].astype(np.int64)
        L = max(int(n.max()), 1)
        h = hist[idx, :L]
        j = target[idx]
        a = np.arange(L)
        valid = a[None, :] < n[:, None]  # (b, L)
        h = np.where(valid, h, -1)
        norm = np.where(n > 0, 1.0 - lam ** np.maximum(n, 1).astype(np.float64), 1.0)
        w = np.where(valid, (1 - lam) * lam ** a[None, :] / norm[:, None], 0.0)  # (b, L) trigger weights
        post = (n >= S)[:, None]

        def prob(x: np.ndarray) -> np.ndarray:
            """x (b, K) items -> (b, K) probability of each as the next draw, before the no-repeat rule."""
            move = np.einsum("bl,blk->bk", w, _transition(t, h[:, :, None], x[:, None, :], level))  # noqa: B023
            pop = np.where(x >= 0, t.pop[np.maximum(x, 0)], 0.0)
            return np.where(post, eps * pop + (1 - eps) * move, pop)  # noqa: B023

        p_target = prob(j[:, None])[:, 0]
        p_hist = prob(h)  # (b, L)
        eq = h[:, :, None] == h[:, None, :]  # (b, L, L)
        dup = (eq & np.tri(L, k=-1, dtype=bool)[None]).any(axis=2)  # an earlier position holds the same item
        taken = np.where(valid & ~dup & (h >= 0), p_hist, 0.0).sum(axis=1)
        seen = ((h == j[:, None]) & valid).any(axis=1)
        out[idx] = np.where(seen | (j < 0), 0.0, p_target / np.maximum(1.0 - taken, 1e-12))
    return out


def oracle_scores(
    truth: Truth | str | Path,
    hist_item_ids_newest_first: Sequence[Sequence[str]],
    target_item_ids: Sequence[str],
    level: str = "item",
) -> np.ndarray:
    """The generator's probability that each target is the user's next item, given the history shown.

    truth: a Truth or the raw directory holding truth.npz. Ids the generator never made count as
    unknown (no ring moves from them; an unknown target scores 0). See the module docstring.
    """
    t = truth if isinstance(truth, Truth) else load_truth(truth)
    if len(hist_item_ids_newest_first) != len(target_item_ids):
        raise InvalidArgument("one history per target")
    lens = np.array([len(h) for h in hist_item_ids_newest_first], dtype=np.int64)
    L = max(int(lens.max(initial=0)), 1)
    hist = np.full((len(lens), L), -1, dtype=np.int64)
    flat = t.item_index([i for h in hist_item_ids_newest_first for i in h])
    rows = np.repeat(np.arange(len(lens)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    hist[rows, cols] = flat
    return _oracle_core(t, hist, lens, t.item_index(list(target_item_ids)), level)


def next_item_draws(truth: Truth, history: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """n independent draws of a user's next item by the generator's own step (before its no-repeat rule).

    history: truth indices, newest first (`din simulate` draws candidates with it)."""
    sim = _Simulator(truth, np.array([len(history) + 1], dtype=np.int64), rng)
    sim.seq[: len(history)] = np.asarray(history, dtype=np.int64)[::-1]  # the simulator keeps oldest first
    return sim._draw(np.zeros(n, dtype=np.int64), len(history))


def oracle_for_history(truth: Truth, history: Sequence[int], targets: np.ndarray) -> np.ndarray:
    """The oracle (module docstring) of many targets for one history; truth indices, newest first."""
    h = np.asarray(history, dtype=np.int64)
    n = len(targets)
    hist = np.tile(h if len(h) else np.full(1, -1, dtype=np.int64), (n, 1))
    return _oracle_core(truth, hist, np.full(n, len(h), dtype=np.int64), np.asarray(targets), "item")


def oracle_auc(raw_dir: str | Path, data_dir: str | Path, split: str = "test", level: str = "item") -> float:
    """AUC of the oracle on a prepared split (histories cut to the prepared max_history)."""
    from model.data import gather_histories, load_prepared
    from model.metrics import auc

    t = load_truth(raw_dir)
    data = load_prepared(data_dir)
    s = data.split(split)
    to_truth = t.item_index(data.items)
    to_truth[:FIRST_ID] = -1  # pad, oov
    scores = np.empty(len(s), dtype=np.float64)
    chunk = 65_536  # bounds the (chunk, max_history) history matrix on the train split
    for i in range(0, len(s), chunk):
        sl = slice(i, i + chunk)
        hist, hist_len = gather_histories(
            data.seq_items, data.seq_offsets, s.user[sl], s.pos[sl], data.max_history
        )
        scores[sl] = _oracle_core(t, to_truth[hist], hist_len, to_truth[s.target[sl]], level)
    return auc(s.label, scores)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthParams()
    parser.add_argument(
        "--out", required=True, help="raw directory to write (reviews.json.gz, meta.json.gz, truth)"
    )
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument("--categories", type=int, default=None, help="default: items // 100")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--events-per-user",
        type=float,
        default=d.events_per_user,
        help="mean events per user (at least 5 each, long-tailed)",
    )
    parser.add_argument(
        "--explore", type=float, default=d.explore, help="ε: probability of an exploration draw"
    )
    parser.add_argument("--recency", type=float, default=d.recency, help="λ: trigger recency decay")
    parser.add_argument("--ring-decay", type=float, default=d.ring_decay, help="r: ring-walk step decay")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    params = SynthParams(
        users=args.users,
        items=args.items,
        categories=args.categories,
        events_per_user=args.events_per_user,
        seed=args.seed,
        explore=args.explore,
        recency=args.recency,
        ring_decay=args.ring_decay,
    )
    try:
        generate(args.out, params, progress=not args.no_progress, verbose=True)
    except (InvalidArgument, OSError) as e:
        print(f"din synth: error: {e}", file=sys.stderr)
        return 2
    return 0
