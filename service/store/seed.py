"""`din seed`: bulk-load every user's most recent items from a SNAP reviews file into Redis.

Each user's history list (key layout: `service.store.keys`) is replaced atomically (DEL + RPUSH,
newest first, in one MULTI/EXEC per chunk of users), so running it twice leaves the same lists. In a
Redis Cluster (`--redis-cluster`) a transaction cannot span slots: each user's list is replaced by one
small script (atomic per user), pipelined per node by redis-py's cluster client.
The reviews are read by `model.data.read_reviews` (the reader `din prepare` uses, torch-free): this
runs in the serving image.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

from contracts.errors import ConfigError, DataError, RedisServerError
from model.data import read_reviews
from service.store.client import SyncRedisCluster, redis_endpoint, sync_client
from service.store.config import RedisConfig, add_redis_options
from service.store.keys import DEFAULT_PREFIX, history_key

# Replace one list atomically (a cluster's per-user transaction): DEL, then RPUSH in chunks.
_REPLACE = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 1000 do redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
return #ARGV
"""


@dataclass(frozen=True)
class SeedStats:
    users: int  # users whose list was written
    items: int  # items written over all lists (after truncation to max_history)
    reviews: int  # review lines read
    seconds: float

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"seeded {self.users:,} users, {self.items:,} items ({self.reviews:,} reviews read) "
            f"in {self.seconds:.1f}s ({self.users_per_s:,.0f} users/s)"
        )


def latest_histories(
    reviews_path: str | os.PathLike[str], max_history: int
) -> tuple[dict[str, list[str]], int]:
    """Each user's most recent `max_history` items, newest first, and the number of reviews read.

    The reader is `din prepare`'s (torch-free), and so is the order: unixReviewTime, ties in file
    order. Raises DataError naming the file, line and reason.
    """
    r = read_reviews(Path(reviews_path))
    n = len(r.user)
    if n == 0:
        return {}, 0
    order = np.lexsort((np.arange(n), r.time, r.user))  # by user, then time, then file position
    u_sorted = r.user[order]
    item_sorted = r.item[order]
    ends = np.flatnonzero(np.diff(u_sorted)) + 1
    starts = np.concatenate(([0], ends)).tolist()
    stops = [*ends.tolist(), n]
    histories: dict[str, list[str]] = {}
    for lo, hi, uid in zip(starts, stops, u_sorted[starts].tolist(), strict=True):
        recent = item_sorted[max(lo, hi - max_history) : hi][::-1].tolist()
        histories[r.user_ids[uid]] = [r.item_ids[i] for i in recent]
    return histories, n


def seed_reviews(
    reviews_path: str | os.PathLike[str],
    client_or_url: redis.Redis | str,
    max_history: int = 100,
    prefix: str = DEFAULT_PREFIX,
    *,
    batch_users: int = 1000,
    progress: bool = False,
    cluster: bool = False,
) -> SeedStats:
    """Replace the history of every user in the reviews file; returns what was written.

    `client_or_url` is a synchronous redis.Redis or RedisCluster, or a URL (a client is made and closed
    here; `cluster`: the URL names a node of a Redis Cluster).
    Raises DataError on a bad file, before anything is written,
    and redis errors as they are.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if batch_users < 1:
        raise ValueError(f"batch_users must be >= 1, got {batch_users}")
    start = time.perf_counter()
    histories, n_reviews = latest_histories(reviews_path, max_history)

    own_client = isinstance(client_or_url, str)
    client: redis.Redis | SyncRedisCluster
    if isinstance(client_or_url, str):
        client = sync_client(client_or_url, RedisConfig(url=client_or_url, cluster=cluster, prefix=prefix))
    elif isinstance(client_or_url, (redis.Redis, SyncRedisCluster)):
        client = client_or_url
    else:
        raise TypeError("seed_reviews needs a synchronous redis.Redis or RedisCluster client, or a URL")
    in_cluster = isinstance(client, SyncRedisCluster)
    users = list(histories)
    items_written = 0
    try:
        with tqdm(total=len(users), unit="user", desc="seed", disable=not progress) as bar:
            for lo in range(0, len(users), batch_users):
                chunk = users[lo : lo + batch_users]
                # No reader ever sees a user's list half written: one MULTI/EXEC per chunk, or in a
                # cluster one script per user (the pipeline sends each node its share at once).
                with client.pipeline(transaction=not in_cluster) as pipe:
                    for user in chunk:
                        key = history_key(prefix, user)
                        items = histories[user]
                        if in_cluster:
                            pipe.execute_command("EVAL", _REPLACE, 1, key, *items)
                        else:
                            pipe.delete(key)
                            pipe.rpush(key, *items)
                        items_written += len(items)
                    pipe.execute()
                bar.update(len(chunk))
    finally:
        if own_client:
            client.close()
    return SeedStats(
        users=len(users), items=items_written, reviews=n_reviews, seconds=time.perf_counter() - start
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reviews", required=True, type=Path, help="SNAP reviews JSON lines (.json or .gz)")
    add_redis_options(
        parser,
        cluster_help="--redis-url names one node of a Redis Cluster (the same keys, spread over its nodes)",
    )
    parser.add_argument("--max-history", type=int, default=100, help="items kept per user (T)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="key prefix: keys are PREFIX + hist:USER")
    parser.add_argument("--batch-users", type=int, default=1000, help="users per pipelined transaction")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not args.reviews.is_file():
        print(f"din seed: {args.reviews}: no such file", file=sys.stderr)
        return 2
    if args.max_history < 1 or args.batch_users < 1:
        print("din seed: --max-history and --batch-users must be >= 1", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        cfg = RedisConfig(url=args.redis_url, data_dir=args.redis_data, cluster=args.redis_cluster)
    except ConfigError as exc:
        print(f"din seed: --redis-cluster: {exc}", file=sys.stderr)
        return 2
    try:
        # A `din serve` already running on that data dir: seed its server.
        with redis_endpoint(cfg, share_running=True) as endpoint:
            if args.redis_url is None:
                print(f"din seed: redis at {endpoint.url} (data {args.redis_data})", file=sys.stderr)
            stats = seed_reviews(
                args.reviews,
                endpoint.url,
                args.max_history,
                args.prefix,
                batch_users=args.batch_users,
                progress=progress,
                cluster=args.redis_cluster,
            )
    except DataError as exc:
        print(f"din seed: {exc}", file=sys.stderr)
        return 2
    except (RedisServerError, redis.RedisError, OSError) as exc:
        print(f"din seed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0
