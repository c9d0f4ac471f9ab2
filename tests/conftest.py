"""Shared fixtures: one real redis-server for the whole test session (never the system one on 6379)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import redis

from service.store.embedded import EmbeddedRedis

_GRAPH_CACHE = "DIN_GRAPH_CACHE"
_graph_cache_key = pytest.StashKey[str | None]()


def pytest_configure(config: pytest.Config) -> None:
    """`din export` keeps the traces of its graphs under DIN_GRAPH_CACHE (model/export.py; default the
    user's ~/.cache): the tests keep theirs in a directory of this session, shared by the din commands
    they run in processes of their own, and gone after it."""
    config.stash[_graph_cache_key] = os.environ.get(_GRAPH_CACHE)
    os.environ[_GRAPH_CACHE] = tempfile.mkdtemp(prefix="din-graphs-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get(_GRAPH_CACHE, ""), ignore_errors=True)
    before = config.stash.get(_graph_cache_key, None)
    if before is None:
        os.environ.pop(_GRAPH_CACHE, None)
    else:
        os.environ[_GRAPH_CACHE] = before


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
