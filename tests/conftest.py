"""Shared fixtures: one real redis-server for the whole test session (never the system one on 6379)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from service.store.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A started EmbeddedRedis on a free TCP port of 127.0.0.1, data in a tmp dir; stopped at the end."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0, unix_socket=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL (redis://127.0.0.1:PORT/0), emptied (FLUSHALL) before each test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
