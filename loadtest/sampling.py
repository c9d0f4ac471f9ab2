"""The request mix of the load tests: where user and item ids come from, and what a /rank body looks like.

Both load generators draw from here, so they send the same traffic: `din loadtest` (open loop,
`loadtest.openloop`) builds its `Mix` from flags, the Locust file from `DIN_LT_*` env vars
(`mix_from_env`). Id sources, later ones replacing earlier ones:

- a SNAP reviews file (JSON lines, .gz or plain): distinct `reviewerID`s and `asin`s;
- plain id files (one id per line, .gz or plain) for users and for items;
- a bundle's `items.txt`, read through `contracts.vocab`, so the reserved <pad> / <oov> rows are never
  sent as candidates.

A request: a known user (or, for a share, an unknown one), a lognormal number of candidates around a
median drawn without replacement from the items (plus a share of unknown ones), optionally top_k.
"""

from __future__ import annotations

import gzip
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from contracts.vocab import known_ids, read_vocab

DEFAULT_USER_RANGE = 1000  # without a users source: ids user-0..N-1


@dataclass
class Mix:
    """What the generated /rank requests look like."""

    users: list[str]
    items: list[str]
    candidates: int = 100  # median candidates per request
    candidates_sigma: float = 0.5  # lognormal spread (0 = always `candidates`)
    max_candidates: int = 500
    unknown_users: float = 0.05
    unknown_items: float = 0.02
    top_k: int | None = None

    def candidate_count(self, rng: random.Random) -> int:
        """How many candidates the next request carries: lognormal around the median, capped."""
        if self.candidates_sigma > 0:
            k = round(rng.lognormvariate(math.log(max(1, self.candidates)), self.candidates_sigma))
        else:
            k = self.candidates
        return max(1, min(self.max_candidates, k))

    def request(self, rng: random.Random, tag: str) -> dict[str, Any]:
        """One /rank body. `tag` makes an unknown user's id unique (unknown ids never repeat a user)."""
        # The order of the rng calls fixes which bodies a seed gives: change it and reruns differ.
        if not self.users or rng.random() < self.unknown_users:
            user = f"loadtest-unknown-user-{tag}"
        else:
            user = rng.choice(self.users)
        k = self.candidate_count(rng)
        if len(self.items) >= k:
            cands = rng.sample(self.items, k)  # distinct, as a real candidate list is
        elif self.items:
            cands = rng.choices(self.items, k=k)
        else:
            cands = [f"loadtest-unknown-item-{j}" for j in range(k)]
        cands = [
            f"loadtest-unknown-item-{rng.randrange(10**9)}" if rng.random() < self.unknown_items else c
            for c in cands
        ]
        body: dict[str, Any] = {"user_id": user, "candidates": cands}
        if self.top_k is not None:
            body["top_k"] = self.top_k
        return body

    def payloads(self, n: int, seed: int) -> list[bytes]:
        """n request bodies, generated up front so building them never delays a send."""
        rng = random.Random(seed)
        return [orjson.dumps(self.request(rng, f"{seed}-{i}")) for i in range(n)]


# ---------------------------------------------------------------------------------------- id sources


def read_ids(path: Path) -> list[str]:
    """A plain id file: one id per line (.gz or plain), blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def ids_from_reviews(path: Path, limit: int = 200_000) -> tuple[list[str], list[str]]:
    """Distinct (user ids, item ids) of a SNAP reviews file (JSON lines, .gz or plain)."""
    users: dict[str, None] = {}  # dicts, not sets: first-seen order, so a seed gives the same mix
    items: dict[str, None] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = orjson.loads(line)
            if isinstance(row, dict):
                if isinstance(row.get("reviewerID"), str):
                    users[row["reviewerID"]] = None
                if isinstance(row.get("asin"), str):
                    items[row["asin"]] = None
            if len(users) >= limit and len(items) >= limit:
                break
    return list(users), list(items)


def items_from_bundle(bundle: Path) -> list[str]:
    """The bundle's item ids (items.txt without the <pad> and <oov> rows)."""
    return known_ids(read_vocab(bundle / "items.txt"))


def load_ids(
    *,
    reviews: Path | None = None,
    users_file: Path | None = None,
    bundle: Path | None = None,
    items_file: Path | None = None,
    user_range: int = DEFAULT_USER_RANGE,
) -> tuple[list[str], list[str], list[str]]:
    """(users, items, notes on where they came from). Later sources replace earlier ones; without a
    users source the users are `user-0..user_range-1`; without an items source, `items` is empty and
    every candidate is an unknown id."""
    notes = []
    users: list[str] = []
    items: list[str] = []
    if reviews is not None:
        users, items = ids_from_reviews(reviews)
        notes.append(f"{len(users):,} users and {len(items):,} items from {reviews}")
    if users_file is not None:
        users = read_ids(users_file)
        notes.append(f"{len(users):,} users from {users_file}")
    if bundle is not None:
        items = items_from_bundle(bundle)
        notes.append(f"{len(items):,} items from {bundle}/items.txt")
    if items_file is not None:
        items = read_ids(items_file)
        notes.append(f"{len(items):,} items from {items_file}")
    if not users:
        users = [f"user-{i}" for i in range(user_range)]
        notes.append(f"no users source: ids user-0..{user_range - 1} (probably unknown to the server)")
    if not items:
        notes.append("no items source (--bundle / --items-file / --reviews): every candidate is unknown")
    return users, items, notes


# ------------------------------------------------------------------------------ Locust's configuration

# DIN_LT_* variable -> Mix field, for the knobs that are plain numbers (defaults: Mix's own).
_ENV_NUMBERS: tuple[tuple[str, str, type[int] | type[float]], ...] = (
    ("DIN_LT_CANDIDATES", "candidates", int),
    ("DIN_LT_CANDIDATES_SIGMA", "candidates_sigma", float),
    ("DIN_LT_MAX_CANDIDATES", "max_candidates", int),
    ("DIN_LT_UNKNOWN_USERS", "unknown_users", float),
    ("DIN_LT_UNKNOWN_ITEMS", "unknown_items", float),
    ("DIN_LT_TOP_K", "top_k", int),
)


def mix_from_env(env: Mapping[str, str]) -> tuple[Mix, list[str]]:
    """The Locust file's mix, from DIN_LT_* variables (all optional): DIN_LT_REVIEWS,
    DIN_LT_USERS_FILE, DIN_LT_BUNDLE, DIN_LT_ITEMS_FILE (the id sources of `load_ids`), and the
    numbers of `_ENV_NUMBERS`. Returns the mix and the notes on where its ids came from."""

    def path(name: str) -> Path | None:
        value = env.get(name)
        return Path(value) if value else None

    users, items, notes = load_ids(
        reviews=path("DIN_LT_REVIEWS"),
        users_file=path("DIN_LT_USERS_FILE"),
        bundle=path("DIN_LT_BUNDLE"),
        items_file=path("DIN_LT_ITEMS_FILE"),
    )
    numbers: dict[str, Any] = {}
    for name, field_, kind in _ENV_NUMBERS:
        if value := env.get(name):
            try:
                numbers[field_] = kind(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number") from None
    return Mix(users=users, items=items, **numbers), notes
