"""A server as a child process: started with its output in a log file, waited for until its /readyz
answers 200, stopped with SIGTERM (then SIGKILL). `din loop-demo`, the benchmarks and the tests start
`din serve` (or a baseline server) this way."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


class NotReady(RuntimeError):
    """The child exited, or did not answer /readyz 200 in time (the message names its log)."""


@contextlib.contextmanager
def serving(
    name: str,
    cmd: list[str],
    url: str,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float = 120.0,
    poll_s: float = 0.2,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` (stdout and stderr to `log`) until the context exits; ready when `url`/readyz is 200.
    Raises NotReady when it exits first or is not ready within `timeout_s`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(url + "/readyz"):
            if proc.poll() is not None:
                raise NotReady(f"{name} exited with {proc.returncode} (see {log})")
            if time.monotonic() > deadline:
                raise NotReady(f"{name} was not ready in {timeout_s:.0f} s (see {log})")
            time.sleep(poll_s)
        yield proc
    finally:
        stop(proc)


def _ready(url: str) -> bool:
    """/readyz answered 200 (the standard library's client: the server's package imports no HTTP client)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
