"""From configuration to a ready Redis client: the one place that decides which Redis is used.

A URL (`redis://`, `rediss://`, `unix://`) is used as given; without one, a private redis-server is
started on a data directory (`service.store.embedded`) and stopped, its data flushed, when the caller
is done. `din serve`, `din seed` and `din demo` all come through `redis_endpoint` and the client
factories below; a new deployment mode (Redis Cluster, Sentinel) plugs in here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from model.errors import RedisDataDirInUse
from service.store.embedded import DEFAULT_REDIS_DATA, EmbeddedRedis
from service.store.keys import DEFAULT_PREFIX


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None: a private redis-server on `data_dir`
    data_dir: Path | None = None  # the private server's data directory (None: DEFAULT_REDIS_DATA)
    prefix: str = DEFAULT_PREFIX  # key prefix (service.store.keys)
    connect_timeout_s: float = 10.0
    timeout_s: float = 60.0  # per command; the service sets it low (a slow read degrades)
    max_connections: int = 64

    @property
    def private_data_dir(self) -> Path:
        return Path(self.data_dir or DEFAULT_REDIS_DATA)


@dataclass(frozen=True)
class Endpoint:
    url: str
    private: bool  # a redis-server started by this context (stopped when it exits)


@contextlib.contextmanager
def redis_endpoint(cfg: RedisConfig, *, share_running: bool = False) -> Iterator[Endpoint]:
    """The Redis to talk to: `cfg.url`, or a private redis-server on `cfg.data_dir` for the context.

    share_running: when another din process already runs a private server on that data directory,
    use it (`din seed` next to a running `din serve`) instead of failing with RedisDataDirInUse.
    Raises RedisServerError when a private server cannot be started.
    """
    if cfg.url is not None:
        yield Endpoint(cfg.url, private=False)
        return
    server = EmbeddedRedis(cfg.private_data_dir)
    try:
        server.start()
    except RedisDataDirInUse as exc:
        if not share_running or exc.url is None:
            raise
        yield Endpoint(exc.url, private=False)
        return
    try:
        yield Endpoint(server.url, private=True)
    finally:
        server.stop()  # SHUTDOWN flushes the append-only file


def _pool_options(cfg: RedisConfig) -> dict[str, Any]:
    return {
        "socket_connect_timeout": cfg.connect_timeout_s,
        "socket_timeout": cfg.timeout_s,
        "max_connections": cfg.max_connections,
        "health_check_interval": 30.0,
        "decode_responses": True,
    }


def async_client(url: str, cfg: RedisConfig) -> aioredis.Redis:
    """One asyncio client over one connection pool (the service). Nothing connects until the first
    command. Close it with `await client.aclose()` (it owns its pool)."""
    return aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(url, **_pool_options(cfg)))


def sync_client(url: str, cfg: RedisConfig) -> redis.Redis:
    """A blocking client (bulk loads, tools). Close it with `client.close()`."""
    return redis.Redis.from_pool(redis.ConnectionPool.from_url(url, **_pool_options(cfg)))
