"""`din demo` end to end on a tiny synthetic set: every stage runs once, a second run reuses them all,
and the curl command it prints works verbatim against the server it starts."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from cli import main
from service.store.embedded import EmbeddedRedis, free_port

TINY = ["--users", "60", "--items", "100", "--epochs", "1"]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DIN_")}


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis
) -> tuple[Path, list[str], str]:
    """The first `din demo --no-serve` in a new workdir, seeding the (flushed) session Redis: the
    workdir, its argv and what it printed. Both tests start from it (a build is a minute on 2 cores)."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    argv = ["demo", "--workdir", str(workdir), "--redis-url", redis_server.url, "--no-serve", *TINY]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return workdir, argv, printed.getvalue()


@pytest.mark.slow
def test_demo_builds_once_then_reuses(
    built: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    workdir, argv, first = built
    for name in ("synth", "prepare", "train", "export", "seed"):
        assert re.search(rf"^{name}\s+[\d.]+\s+ran\s", first, re.M), first
    assert (workdir / "bundle" / "manifest.json").is_file()
    assert not list(workdir.glob("*.partial"))

    assert main(argv) == 0
    second = capsys.readouterr().out
    for name in ("synth", "prepare", "train", "export", "seed"):
        assert re.search(rf"^{name}\s+[\d.]+\s+reused\s", second, re.M), second
    assert "curl -s -X POST http://127.0.0.1:8000/rank" in second


@pytest.mark.slow
def test_demo_serves_and_its_curl_works(built: tuple[Path, list[str], str], tmp_path: Path) -> None:
    """In a copy of the built workdir: the demo reuses its stages, seeds its own Redis, and serves."""
    workdir, port = tmp_path / "demo", free_port()
    shutil.copytree(built[0], workdir)
    cmd = [sys.executable, "-m", "cli", "demo", "--workdir", str(workdir), "--port", str(port), *TINY]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env()
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        curl = ""
        reader: threading.Thread | None = None
        try:
            for line in proc.stdout:  # the demo prints the curl command before it starts serving
                lines.append(line)
                if line.strip().startswith("curl "):
                    curl = line.strip()
                    break
            assert curl, "".join(lines)
            # Keep reading the server's log so it never blocks on a full pipe.
            reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
                time.sleep(0.2)
            out = subprocess.run(
                shlex.split(curl), capture_output=True, text=True, timeout=30, check=True
            ).stdout
            body = httpx.Response(200, content=out).json()
            assert len(body["items"]) == 3 and body["history_length"] > 0 and body["degraded"] is False
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if reader is not None:
                reader.join(timeout=10)  # EOF once the server has exited
    # The embedded redis-server went down with it.
    assert not (workdir / "redis" / "redis.pid").exists()
