"""Locust users for din-rank, for those who prefer locust's UI (locust is not a dependency).

    pip install locust
    DIN_LT_REVIEWS=.din/demo/raw/reviews.json.gz DIN_LT_BUNDLE=.din/demo/bundle \
        locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --users 50 --spawn-rate 10

Locust is closed-loop (each user waits for its answer), so under overload it measures less than the
open-loop `din loadtest`, which keeps sending on schedule. Configuration, all optional, by env vars:
DIN_LT_REVIEWS (user and item ids from a SNAP reviews file), DIN_LT_USERS_FILE / DIN_LT_ITEMS_FILE
(one id per line), DIN_LT_BUNDLE (items from BUNDLE/items.txt), DIN_LT_CANDIDATES (median candidates,
default 100), DIN_LT_MAX_CANDIDATES (500), DIN_LT_UNKNOWN_USERS (0.05), DIN_LT_PACING_S (seconds
between a user's requests, default 1). Host and user count: locust's own --host / --users, or
LOCUST_HOST / LOCUST_USERS.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from pathlib import Path

from locust import HttpUser, constant_pacing, task


def _lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _load_ids() -> tuple[list[str], list[str]]:
    users: list[str] = []
    items: list[str] = []
    if reviews := os.environ.get("DIN_LT_REVIEWS"):
        seen_u: dict[str, None] = {}
        seen_i: dict[str, None] = {}
        for line in _lines(reviews):
            row = json.loads(line)
            seen_u[row["reviewerID"]] = None
            seen_i[row["asin"]] = None
        users, items = list(seen_u), list(seen_i)
    if users_file := os.environ.get("DIN_LT_USERS_FILE"):
        users = _lines(users_file)
    if bundle := os.environ.get("DIN_LT_BUNDLE"):
        items = _lines(str(Path(bundle) / "items.txt"))[2:]  # without <pad> and <oov>
    if items_file := os.environ.get("DIN_LT_ITEMS_FILE"):
        items = _lines(items_file)
    return users or [f"user-{i}" for i in range(1000)], items or [f"item-{i}" for i in range(1000)]


USERS, ITEMS = _load_ids()
CANDIDATES = int(os.environ.get("DIN_LT_CANDIDATES", "100"))
MAX_CANDIDATES = int(os.environ.get("DIN_LT_MAX_CANDIDATES", "500"))
UNKNOWN_USERS = float(os.environ.get("DIN_LT_UNKNOWN_USERS", "0.05"))


class RankUser(HttpUser):
    wait_time = constant_pacing(float(os.environ.get("DIN_LT_PACING_S", "1")))

    @task
    def rank(self) -> None:
        k = max(1, min(MAX_CANDIDATES, round(random.lognormvariate(math.log(CANDIDATES), 0.5))))
        user = (
            f"unknown-{random.randrange(10**9)}" if random.random() < UNKNOWN_USERS else random.choice(USERS)
        )
        cands = random.sample(ITEMS, k) if k <= len(ITEMS) else random.choices(ITEMS, k=k)
        self.client.post("/rank", json={"user_id": user, "candidates": cands}, name="/rank")
