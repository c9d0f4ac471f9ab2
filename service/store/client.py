"""From configuration to a ready Redis client: the one place that decides which Redis is used.

A URL (`redis://`, `rediss://`, `unix://`) is used as given; without one, a private redis-server is
started on a data directory (`service.store.embedded`) and stopped, its data flushed, when the caller
is done. `din serve`, `din seed` and `din demo` all come through `redis_endpoint` and the client
factories below; a new deployment mode plugs in here and nowhere else.

Redis Cluster (`RedisConfig.cluster`): the URL names any node; the factories return redis-py's cluster
clients, which discover the others (CLUSTER SLOTS) and follow the topology. The async one is built
with no retries of its own: the service answers within a deadline, so a read that fails degrades at
once and `service.store.cluster` refreshes the topology in the background instead.

The asyncio clients' TCP connections look host names up through `service.store.resolve` (threads of
its own, one lookup per name at a time), so a node whose name stopped resolving cannot hold up the
connects to the nodes that answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import LoadBalancingStrategy
from redis.cluster import RedisCluster as SyncRedisCluster

from contracts.errors import RedisDataDirInUse
from service.store.config import RedisConfig, parse_nodes
from service.store.embedded import EmbeddedRedis
from service.store.resolve import ResolvingConnection

__all__ = ["Endpoint", "RedisConfig", "async_client", "redis_endpoint", "sync_client"]


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


def _cluster_options(cfg: RedisConfig) -> dict[str, Any]:
    strategy = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS if cfg.read_from_replicas else None
    return {
        **_pool_options(cfg),
        "load_balancing_strategy": strategy,  # also makes every connection READONLY (replicas answer)
        "require_full_coverage": False,  # a refresh during a failover still takes what it can see
    }


def async_client(url: str, cfg: RedisConfig) -> aioredis.Redis | AsyncRedisCluster:
    """One asyncio client (the service): over one connection pool, or `cfg.cluster`: redis-py's
    cluster client (a pool per node). Nothing connects until the first command. Close it with
    `await client.aclose()` (it owns its pools)."""
    if cfg.cluster:
        nodes = [AsyncClusterNode(host, port) for host, port in parse_nodes(cfg.cluster_nodes)]
        options = _cluster_options(cfg) | ({"startup_nodes": nodes} if nodes else {})
        cluster = AsyncRedisCluster.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **options)
        if cluster.nodes_manager.connection_kwargs.get("connection_class") is aioredis.Connection:
            # nodes found later are built from these arguments; the startup nodes were built already
            cluster.nodes_manager.connection_kwargs["connection_class"] = ResolvingConnection
            for node in cluster.nodes_manager.startup_nodes.values():
                node.connection_class = ResolvingConnection
        return cluster
    pool = aioredis.ConnectionPool.from_url(url, **_pool_options(cfg))
    if pool.connection_class is aioredis.Connection:  # TCP without TLS (TLS checks the name itself)
        pool.connection_class = ResolvingConnection
    return aioredis.Redis.from_pool(pool)


def sync_client(url: str, cfg: RedisConfig) -> redis.Redis | SyncRedisCluster:
    """A blocking client (bulk loads, tools); `cfg.cluster`: redis-py's cluster client (it retries
    through failovers). Close it with `client.close()`."""
    if cfg.cluster:
        nodes = [SyncClusterNode(host, port) for host, port in parse_nodes(cfg.cluster_nodes)]
        options = _cluster_options(cfg) | ({"startup_nodes": nodes} if nodes else {})
        return SyncRedisCluster.from_url(url, **options)
    return redis.Redis.from_pool(redis.ConnectionPool.from_url(url, **_pool_options(cfg)))
