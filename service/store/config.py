"""Where and how to reach Redis, as plain data: `RedisConfig` and the rules a configuration must keep.

Light on purpose (no client, no server manager): `service.config` builds one from the settings, so
importing the settings starts nothing and loads no C library. `service.store.client` turns it into a
running Redis and a client.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from contracts.errors import ConfigError
from service.store.keys import DEFAULT_PREFIX

# The data directory `din serve`, `din seed` and `din demo` share when no Redis URL is given.
DEFAULT_REDIS_DATA = ".din/redis"


def add_redis_options(parser: argparse.ArgumentParser, *, cluster_help: str) -> None:
    """The command-line options a tool that talks to Redis shares with `din seed`: --redis-url or
    --redis-data (the private server's directory), and --redis-cluster (`cluster_help` says what it
    means for this tool)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help="redis://host:port/db or unix:///path.sock")
    where.add_argument(
        "--redis-data",
        type=Path,
        default=Path(DEFAULT_REDIS_DATA),
        help=f"without --redis-url: the embedded redis-server's data dir (default {DEFAULT_REDIS_DATA}, "
        "the one `din serve` uses); a server already running there is used as is",
    )
    parser.add_argument("--redis-cluster", action="store_true", help=cluster_help)


def node_list(text: str) -> tuple[str, ...]:
    """The entries of a comma-separated list of nodes (DIN_REDIS_CLUSTER_NODES), blanks dropped."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_nodes(nodes: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """`host:port` entries as (host, port) pairs; ConfigError naming the entry that is not one."""
    out: list[tuple[str, int]] = []
    for entry in nodes:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"a Redis Cluster node must be host:port, not {entry!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def check_redis_mode(
    url: str | None,
    prefix: str,
    *,
    cluster: bool,
    read_from_replicas: bool,
    cluster_nodes: tuple[str, ...] = (),
) -> None:
    """Refuse a Redis mode that cannot work (ConfigError saying why): a cluster without a redis:// URL
    or with braces in the prefix, replica reads or more cluster nodes without a cluster."""
    if cluster_nodes and not cluster:
        raise ConfigError("more Redis Cluster nodes need Redis Cluster (DIN_REDIS_CLUSTER=true)")
    parse_nodes(cluster_nodes)
    if cluster:
        if url is None:
            raise ConfigError("Redis Cluster needs a URL naming one of its nodes (DIN_REDIS_URL)")
        if not url.startswith(("redis://", "rediss://")):
            raise ConfigError(f"Redis Cluster needs a redis:// or rediss:// URL, not {url!r}")
        if "{" in prefix or "}" in prefix:
            raise ConfigError(f"in Redis Cluster the key prefix may not hold braces: {prefix!r}")
    elif read_from_replicas:
        raise ConfigError("reading from replicas needs Redis Cluster (DIN_REDIS_CLUSTER=true)")


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None: a private redis-server on `data_dir`
    data_dir: Path | None = None  # the private server's data directory (None: DEFAULT_REDIS_DATA)
    prefix: str = DEFAULT_PREFIX  # key prefix (service.store.keys)
    connect_timeout_s: float = 10.0
    timeout_s: float = 60.0  # per command; the service sets it low (a slow read degrades)
    max_connections: int = 64  # per node in a cluster
    cluster: bool = False  # `url` names one node of a Redis Cluster
    read_from_replicas: bool = False  # cluster: history reads go to the replicas (READONLY)
    # cluster: more nodes to discover it through (host:port) besides `url`'s, so a client started
    # while that one node is down still finds the cluster
    cluster_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_redis_mode(
            self.url,
            self.prefix,
            cluster=self.cluster,
            read_from_replicas=self.read_from_replicas,
            cluster_nodes=self.cluster_nodes,
        )

    @property
    def private_data_dir(self) -> Path:
        return Path(self.data_dir or DEFAULT_REDIS_DATA)
