"""`din prepare`: SNAP Amazon reviews + meta -> vocabularies, behaviour sequences, train/valid/test samples.

The on-disk format is fixed in docs/ARCHITECTURE.md ("Prepared data"). In short: every user's items,
oldest first, concatenated into one array with offsets; a sample is (user, pos, target, label) and its
history is the user's events before `pos`, the `max_history` most recent, newest first. Nothing per
sample is materialised on disk; `gather_histories` builds the padded history matrix for a batch.

Sample construction follows the DIN authors' Amazon scripts: each step k >= 1 of a user's time-ordered
sequence gives (history before k, item k, label 1) and (the same history, a random item the user never
touched, label 0). The last step of each user is the test sample, the second to last validation, the
rest training. Users with fewer than 3 events are skipped (they could not fill all three splits).

Category of an item: the last entry of the first `categories` path in meta (the 2018 release's flat
`category` list is accepted too: its last entry). Items that appear in reviews but not in meta, or whose
category list is missing or empty, get the category "<unknown>", a regular vocabulary entry (so those
items share one learned category embedding); "<oov>" (index 1) is kept for ids never seen in the data.

Malformed input (bad JSON / Python literal, missing field, wrong type) stops with a `DataError` naming
the file, the line number and the reason. Meta lines whose asin does not occur in the kept reviews are
skipped after a cheap regex look at the asin, without a full parse (real meta files are large and most
of their items are not in a 5-core review file); such lines are not validated.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import re
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
from tqdm import tqdm

# DataError stays importable as model.data.DataError: the service's seed imports it from here.
from contracts.errors import DataError, InvalidArgument
from contracts.vocab import FIRST_ID, OOV, OOV_TOKEN, PAD, PAD_TOKEN, known_ids, read_vocab, write_vocab

UNKNOWN_CATEGORY = "<unknown>"
MIN_EVENTS = 3  # a user needs one train, one valid and one test step
SPLITS = ("train", "valid", "test")
_PROGRESS_EVERY = 1 << 16  # lines between progress bar updates: tqdm per line would cost more than parsing

# asin at the start of a meta line, either quoting style; `\s*` because hand-written files vary
_ASIN_RE = re.compile(rb"""["']asin["']\s*:\s*["']([^"']*)["']""")


# ---------------------------------------------------------------- reading


def _open(path: Path) -> IO[bytes]:
    """Open plain or gzip input, detected by the magic bytes (so a mis-named file still reads)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _lines(path: Path, desc: str, progress: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped line) for every non-blank line, with a progress bar."""
    bar = tqdm(
        desc=desc, unit=" lines", unit_scale=True, disable=not progress, file=sys.stderr, mininterval=0.5
    )
    n = 0
    try:
        with _open(path) as f:
            for n, raw in enumerate(f, 1):
                if n % _PROGRESS_EVERY == 0:
                    bar.update(_PROGRESS_EVERY)
                line = raw.strip()
                if line:
                    yield n, line
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise DataError(f"{path.name}: cannot read after line {n}: {e}") from e
    finally:
        bar.update(n % _PROGRESS_EVERY)
        bar.close()


def _parse_object(line: bytes, where: str) -> dict[str, Any]:
    """One line as a dict: strict JSON first (fast), then the Python-literal form of the SNAP meta files."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            obj = ast.literal_eval(line.decode("utf-8"))
        except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as e:
            raise DataError(f"{where}: neither JSON nor a Python literal ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    return obj


@dataclass
class Reviews:
    """Review events as parallel arrays; ids factorised in order of first appearance."""

    user: np.ndarray  # int64 (n,): index into user_ids
    item: np.ndarray  # int64 (n,): index into item_ids
    time: np.ndarray  # int64 (n,): unixReviewTime
    user_ids: list[str]
    item_ids: list[str]


def read_reviews(path: str | Path, progress: bool = False) -> Reviews:
    """Read SNAP reviews (JSON lines with reviewerID, asin, unixReviewTime), plain or gzip."""
    path = Path(path)
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    # array('q') keeps 8 bytes per event; Python lists of ints would cost ~5x that at 1.7M events
    u_arr, i_arr, t_arr = array("q"), array("q"), array("q")
    for n, line in _lines(path, "reviews", progress):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise DataError(f"{path.name}:{n}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path.name}:{n}: expected an object, got {type(obj).__name__}")
        try:
            user, item, t = obj["reviewerID"], obj["asin"], obj["unixReviewTime"]
        except KeyError as e:
            raise DataError(f"{path.name}:{n}: missing field {e.args[0]!r}") from None
        if not isinstance(user, str) or not user:
            raise DataError(f"{path.name}:{n}: reviewerID must be a non-empty string, got {user!r}")
        if not isinstance(item, str) or not item:
            raise DataError(f"{path.name}:{n}: asin must be a non-empty string, got {item!r}")
        if not isinstance(t, int) or isinstance(t, bool):
            raise DataError(f"{path.name}:{n}: unixReviewTime must be an integer, got {t!r}")
        u_arr.append(users.setdefault(user, len(users)))
        i_arr.append(items.setdefault(item, len(items)))
        t_arr.append(t)
    return Reviews(
        user=np.frombuffer(u_arr, dtype=np.int64).copy(),
        item=np.frombuffer(i_arr, dtype=np.int64).copy(),
        time=np.frombuffer(t_arr, dtype=np.int64).copy(),
        user_ids=list(users),
        item_ids=list(items),
    )


def _category_of(obj: dict[str, Any], where: str) -> str:
    """Last entry of the first `categories` path; the 2018 flat `category` list; else UNKNOWN_CATEGORY."""
    if "categories" in obj:
        cats = obj["categories"]
        if not isinstance(cats, list) or not all(isinstance(p, list) for p in cats):
            raise DataError(f"{where}: categories must be a list of lists, got {cats!r:.80}")
        path = cats[0] if cats else []
    elif "category" in obj:
        path = obj["category"]
        if not isinstance(path, list):
            raise DataError(f"{where}: category must be a list, got {path!r:.80}")
    else:
        return UNKNOWN_CATEGORY
    if not path:
        return UNKNOWN_CATEGORY
    leaf = path[-1]
    if not isinstance(leaf, str):
        raise DataError(f"{where}: category names must be strings, got {leaf!r:.80}")
    return leaf.strip() or UNKNOWN_CATEGORY


def read_meta_categories(path: str | Path, wanted: set[str], progress: bool = False) -> dict[str, str]:
    """asin -> category for the asins in `wanted`; meta lines are strict JSON or SNAP's Python literals.

    Only lines whose asin (found by regex) is wanted are parsed; a line with no recognisable asin is
    parsed in full, so a broken line is reported rather than silently dropped. First line wins on duplicates.
    """
    path = Path(path)
    found: dict[str, str] = {}
    for n, line in _lines(path, "meta", progress):
        m = _ASIN_RE.search(line)
        if m is not None:
            asin = m.group(1).decode("utf-8", "replace")
            if asin not in wanted or asin in found:
                continue
        where = f"{path.name}:{n}"
        obj = _parse_object(line, where)
        if "asin" not in obj:
            raise DataError(f"{where}: missing field 'asin'")
        asin = obj["asin"]
        if not isinstance(asin, str) or not asin:
            raise DataError(f"{where}: asin must be a non-empty string, got {asin!r:.80}")
        if asin in wanted and asin not in found:
            found[asin] = _category_of(obj, where)
    return found


# ---------------------------------------------------------------- samples


@dataclass
class Split:
    """One split's samples; the history of sample i is seq_items[off[user[i]] : off[user[i]] + pos[i]]."""

    user: np.ndarray  # int32 (N,)
    pos: np.ndarray  # int32 (N,)
    target: np.ndarray  # int32 (N,)
    label: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class Prepared:
    """Everything `din prepare` wrote, loaded back."""

    items: list[str]
    categories: list[str]
    users: list[str]
    item_cate: np.ndarray  # int64 (n_items,)
    seq_items: np.ndarray  # int32 (n_events,)
    seq_offsets: np.ndarray  # int64 (n_users + 1,)
    train: Split
    valid: Split
    test: Split
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_history(self) -> int:
        return int(self.meta["max_history"])

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise InvalidArgument(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def gather_histories(
    seq_items: np.ndarray, seq_offsets: np.ndarray, user: np.ndarray, pos: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray]:
    """Histories of a batch: hist int64 (B, L) newest first, padded with 0, and hist_len int64 (B,).

    hist_len = min(pos, max_history); L = max(hist_len) over the batch, at least 1.
    """
    user = np.asarray(user, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    hist_len = np.minimum(pos, max_history)
    L = max(int(hist_len.max(initial=0)), 1)
    newest = seq_offsets[user] + pos - 1  # (B,) flat index of the latest event before pos
    steps = np.arange(L, dtype=np.int64)
    valid = steps[None, :] < hist_len[:, None]  # (B, L)
    idx = np.where(valid, newest[:, None] - steps[None, :], 0)  # (B, L); 0 is a safe dummy index
    if len(seq_items) == 0:
        return np.zeros((len(user), L), dtype=np.int64), hist_len
    hist = np.where(valid, seq_items[idx], PAD).astype(np.int64, copy=False)
    return hist, hist_len


def sample_negatives(
    rng: np.random.Generator,
    user: np.ndarray,
    seq_items: np.ndarray,
    seq_offsets: np.ndarray,
    n_items: int,
) -> np.ndarray:
    """One item per entry of `user`, uniform over the real ids [FIRST_ID, n_items), none that user touched.

    Collisions are found with one sorted (user, item) key array and redrawn, vectorised, until none are left.
    """
    n_users = len(seq_offsets) - 1
    counts = np.diff(seq_offsets)
    owner = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    touched = np.unique(owner * n_items + seq_items.astype(np.int64))  # sorted keys
    distinct = np.bincount(touched // n_items, minlength=n_users)
    n_real = n_items - FIRST_ID
    full = np.flatnonzero(distinct[np.unique(user)] >= n_real) if len(user) else np.array([], dtype=np.int64)
    if len(full):
        raise DataError(
            f"{len(full)} user(s) touched every item: no negative can be drawn (vocabulary too small)"
        )
    user = np.asarray(user, dtype=np.int64)
    neg = rng.integers(FIRST_ID, n_items, size=len(user), dtype=np.int64)
    todo = np.arange(len(user))
    for _ in range(64):
        keys = user[todo] * n_items + neg[todo]
        at = np.minimum(np.searchsorted(touched, keys), len(touched) - 1)
        todo = todo[touched[at] == keys]
        if len(todo) == 0:
            return neg
        neg[todo] = rng.integers(FIRST_ID, n_items, size=len(todo), dtype=np.int64)
    # Users who touched nearly all items: draw from each one's explicit complement (rare, tiny data only)
    for i in todo:
        u = user[i]
        own = touched[np.searchsorted(touched, u * n_items) : np.searchsorted(touched, (u + 1) * n_items)]
        free = np.setdiff1d(np.arange(FIRST_ID, n_items), own - u * n_items, assume_unique=True)
        neg[i] = free[rng.integers(len(free))]
    return neg


def build_samples(
    seq_items: np.ndarray, seq_offsets: np.ndarray, n_items: int, rng: np.random.Generator
) -> dict[str, Split]:
    """Every step k >= 1 of every user: a positive and a negative with the same history, split by step."""
    counts = np.diff(seq_offsets)
    n_users = len(counts)
    user = np.repeat(np.arange(n_users, dtype=np.int64), counts)  # (n_events,)
    k = np.arange(len(seq_items), dtype=np.int64) - seq_offsets[user]  # step within the user
    n_u = counts[user]
    step = k >= 1
    user, k, n_u, target = user[step], k[step], n_u[step], seq_items[step].astype(np.int64)
    neg = sample_negatives(rng, user, seq_items, seq_offsets, n_items)
    which = {"test": k == n_u - 1, "valid": k == n_u - 2, "train": k < n_u - 2}
    out: dict[str, Split] = {}
    for name in SPLITS:
        m = which[name]
        su, sk, st, sn = user[m], k[m], target[m], neg[m]
        # positive then negative for each step, in (user, step) order
        out[name] = Split(
            user=np.repeat(su, 2).astype(np.int32),
            pos=np.repeat(sk, 2).astype(np.int32),
            target=np.stack([st, sn], axis=1).reshape(-1).astype(np.int32),
            label=np.tile(np.array([1.0, 0.0], dtype=np.float32), len(su)),
        )
    return out


# ---------------------------------------------------------------- prepare


def _frequency_order(counts: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Indices sorted by count descending, then name: a vocabulary order independent of file order."""
    name_rank = np.argsort(np.asarray(names, dtype=object), kind="stable")
    rank = np.empty(len(names), dtype=np.int64)
    rank[name_rank] = np.arange(len(names))
    return np.lexsort((rank, -counts))


def prepare(
    reviews: str | Path,
    meta: str | Path,
    out: str | Path,
    max_history: int = 100,
    seed: int = 0,
    progress: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Read SNAP reviews + meta, write DATA_DIR (see the module docstring); returns meta.json's content."""
    if max_history < 1:
        raise InvalidArgument(f"max_history must be at least 1, got {max_history}")
    t0 = time.perf_counter()
    reviews, meta, out = Path(reviews), Path(meta), Path(out)
    for p in (reviews, meta):
        if not p.is_file():
            raise DataError(f"{p}: no such file")

    r = read_reviews(reviews, progress)
    if len(r.time) == 0:
        raise DataError(f"{reviews.name}: no reviews")
    ev_user, ev_item, user_order, n_skipped = _kept_events(r, reviews.name)
    items, seq_items = _item_vocabulary(r, ev_item, reviews.name)
    categories, item_cate, without_meta = _categories(meta, items, progress)
    counts = np.bincount(ev_user, minlength=len(user_order))
    seq_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    splits = build_samples(seq_items, seq_offsets, len(items), np.random.default_rng(seed))

    out.mkdir(parents=True, exist_ok=True)
    write_vocab(out / "items.txt", items)
    write_vocab(out / "categories.txt", categories)
    write_vocab(out / "users.txt", [r.user_ids[u] for u in user_order])
    np.save(out / "item_cate.npy", item_cate)
    np.savez(out / "sequences.npz", seq_items=seq_items, seq_offsets=seq_offsets)
    for name, s in splits.items():
        np.savez(out / f"{name}.npz", user=s.user, pos=s.pos, target=s.target, label=s.label)
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {
        "format": "din-prepared/1",
        "max_history": int(max_history),
        "seed": int(seed),
        "n_users": len(user_order),
        "n_items": len(items),
        "n_categories": len(categories),
        "n_events": len(seq_items),
        "samples": {name: len(s) for name, s in splits.items()},
        "users_skipped": n_skipped,
        "min_events": MIN_EVENTS,
        "items_without_meta": without_meta,
        "reviews_read": len(r.time),
        "sources": {"reviews": str(reviews), "meta": str(meta)},
        "seconds": round(seconds, 3),
    }
    (out / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    if verbose:
        print(_summary(info, out))
    return info


def _kept_events(r: Reviews, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The events of users with at least MIN_EVENTS, grouped by user (renumbered in id order), each
    user's in time order: (user, item) per event, the kept users' old numbers in new order, and how
    many users were skipped."""
    # order events by (user, time, file order): equal timestamps (day-granular in SNAP) keep file order
    order = np.lexsort((np.arange(len(r.time)), r.time, r.user))
    ev_user, ev_item = r.user[order], r.item[order]
    n_events_all = np.bincount(r.user, minlength=len(r.user_ids))
    keep_user = n_events_all >= MIN_EVENTS
    n_skipped = int((~keep_user).sum())
    kept = keep_user[ev_user]
    ev_user, ev_item = ev_user[kept], ev_item[kept]
    if len(ev_user) == 0:
        raise DataError(f"{source}: no user has at least {MIN_EVENTS} events")

    # user vocabulary sorted by id (deterministic whatever the file order); no pad / oov
    kept_users = np.flatnonzero(keep_user)
    user_order = kept_users[
        np.argsort(np.asarray([r.user_ids[u] for u in kept_users], dtype=object), kind="stable")
    ]
    user_new = np.full(len(r.user_ids), -1, dtype=np.int64)
    user_new[user_order] = np.arange(len(user_order))
    ev_user = user_new[ev_user]
    regroup = np.argsort(ev_user, kind="stable")  # keeps the time order within each user
    return ev_user[regroup], ev_item[regroup], user_order, n_skipped


def _item_vocabulary(r: Reviews, ev_item: np.ndarray, source: str) -> tuple[list[str], np.ndarray]:
    """The item vocabulary (the kept users' items by frequency, after pad and oov) and each event's
    item in it."""
    item_counts = np.bincount(ev_item, minlength=len(r.item_ids))
    present = np.flatnonzero(item_counts > 0)
    present = present[_frequency_order(item_counts[present], [r.item_ids[i] for i in present])]
    item_new = np.full(len(r.item_ids), -1, dtype=np.int64)
    item_new[present] = np.arange(FIRST_ID, len(present) + FIRST_ID)
    seq_items = item_new[ev_item].astype(np.int32)
    items = [PAD_TOKEN, OOV_TOKEN, *(r.item_ids[i] for i in present)]
    if len(items) <= FIRST_ID:
        raise DataError(f"{source}: fewer than one distinct item")
    return items, seq_items


def _categories(meta: Path, items: list[str], progress: bool) -> tuple[list[str], np.ndarray, int]:
    """The category vocabulary (by frequency over the items, after pad and oov), each item's category
    in it, and how many items the meta file did not describe."""
    wanted = set(known_ids(items))
    cat_of = read_meta_categories(meta, wanted, progress)
    item_cat_names = [cat_of.get(a, UNKNOWN_CATEGORY) for a in known_ids(items)]
    cat_names, cat_inv, cat_counts = np.unique(
        np.asarray(item_cat_names, dtype=object), return_inverse=True, return_counts=True
    )
    cat_order = _frequency_order(cat_counts, list(cat_names))
    cat_new = np.empty(len(cat_names), dtype=np.int64)
    cat_new[cat_order] = np.arange(FIRST_ID, len(cat_names) + FIRST_ID)
    categories = [PAD_TOKEN, OOV_TOKEN, *(str(cat_names[i]) for i in cat_order)]
    item_cate = np.concatenate([[PAD, OOV], cat_new[cat_inv]]).astype(np.int64)
    return categories, item_cate, len(wanted) - len(cat_of)


def _summary(info: dict[str, Any], out: Path) -> str:
    s = info["samples"]
    rows = [
        ("users", f"{info['n_users']:,}"),
        ("items (with pad, oov)", f"{info['n_items']:,}"),
        ("categories (with pad, oov)", f"{info['n_categories']:,}"),
        ("events", f"{info['n_events']:,}"),
        ("samples train / valid / test", f"{s['train']:,} / {s['valid']:,} / {s['test']:,}"),
        (f"users skipped (< {info['min_events']} events)", f"{info['users_skipped']:,}"),
        ("items without meta", f"{info['items_without_meta']:,}"),
        ("max history", f"{info['max_history']}"),
        ("seconds", f"{info['seconds']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"prepared {out}", *(f"  {k:<{width}}  {v}" for k, v in rows)])


# ---------------------------------------------------------------- loading


def load_prepared(data_dir: str | Path) -> Prepared:
    """Load what `prepare` wrote."""
    d = Path(data_dir)
    if not (d / "meta.json").is_file():
        raise DataError(f"{d}: not a prepared data directory (no meta.json; run din prepare)")
    meta = json.loads((d / "meta.json").read_text())
    with np.load(d / "sequences.npz") as z:
        seq_items, seq_offsets = z["seq_items"], z["seq_offsets"]
    splits: dict[str, Split] = {}
    for name in SPLITS:
        with np.load(d / f"{name}.npz") as z:
            splits[name] = Split(user=z["user"], pos=z["pos"], target=z["target"], label=z["label"])
    return Prepared(
        items=read_vocab(d / "items.txt"),
        categories=read_vocab(d / "categories.txt"),
        users=read_vocab(d / "users.txt"),
        item_cate=np.load(d / "item_cate.npy"),
        seq_items=seq_items,
        seq_offsets=seq_offsets,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        meta=meta,
    )


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reviews", required=True, help="SNAP reviews: JSON lines, plain or .gz")
    parser.add_argument("--meta", required=True, help="SNAP meta: JSON or Python-literal lines, plain or .gz")
    parser.add_argument("--out", required=True, help="data directory to write")
    parser.add_argument("--max-history", type=int, default=100, help="T: behaviours kept per sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        prepare(
            args.reviews,
            args.meta,
            args.out,
            max_history=args.max_history,
            seed=args.seed,
            progress=not args.no_progress,
            verbose=True,
        )
    except (DataError, InvalidArgument, OSError) as e:
        print(f"din prepare: error: {e}", file=sys.stderr)
        return 2
    return 0
