"""Service fixtures: a small exported bundle (random DIN, weights scaled so scores spread), the
PyTorch reference for it, and a real uvicorn server running `create_app` in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import torch
import uvicorn

from contracts.vocab import Vocab
from model.din import DIN, DINConfig, build_model
from model.export import export_model
from service import child
from service.app import create_app
from service.config import Settings
from service.protocol import uvicorn_options
from service.store.embedded import free_port
from service.store.keys import history_key

N_ITEMS, N_CATE, MAX_HISTORY = 300, 12, 20


@dataclass
class BundleInfo:
    model: DIN
    items: list[str]  # item id per index
    path: Path
    manifest: dict[str, Any]

    def reference(self, candidates: list[str], history: list[str]) -> list[float]:
        """PyTorch reference CTRs (the paper's tiled `forward`): history newest first, cut to T."""
        vocab = Vocab(self.items)
        hist = vocab.lookup(history[: self.model.cfg.max_history]).tolist()
        n = len(candidates)
        target = torch.from_numpy(vocab.lookup(candidates))
        width = max(1, len(hist))
        h = torch.zeros((n, width), dtype=torch.int64)
        if hist:
            h[:, : len(hist)] = torch.tensor(hist, dtype=torch.int64)
        hist_len = torch.full((n,), len(hist), dtype=torch.int64)
        with torch.no_grad():
            return torch.sigmoid(self.model(target, h, hist_len)).tolist()


def make_bundle(
    path: Path,
    *,
    seed: int,
    version: str,
    max_history: int = MAX_HISTORY,
    graphs_of: BundleInfo | None = None,
) -> BundleInfo:
    """Export a random DIN (weights scaled so scores spread) as a bundle at `path`.

    `graphs_of`: a bundle of the same weights (the same seed), perhaps another max_history, whose
    traced graphs (model.onnx, explain.onnx: what the exporter's `_export_onnx` wrote) this export
    takes instead of tracing them again. The graph does not read max_history (DIN's forward never
    does: the service cuts histories to the manifest's); everything after the trace runs as usual,
    the parity checks at this bundle's T included."""
    g = torch.Generator().manual_seed(7)
    item_cate = torch.randint(2, N_CATE, (N_ITEMS,), generator=g)
    item_cate[0], item_cate[1] = 0, 1
    cfg = DINConfig(n_items=N_ITEMS, n_categories=N_CATE, max_history=max_history)
    model = build_model(cfg, item_cate, seed=seed)
    with torch.no_grad():  # random init gives scores near 0.5; scaled weights make them spread
        for p in model.parameters():
            p.mul_(3.0)
    model.eval()
    items = ["<pad>", "<oov>", *(f"i{k}" for k in range(2, N_ITEMS))]
    categories = ["<pad>", "<oov>", *(f"c{k}" for k in range(2, N_CATE))]
    with contextlib.ExitStack() as stack:
        if graphs_of is not None:
            stack.enter_context(_graphs_copied_from(graphs_of, model))
        manifest = export_model(
            model, items, path, model_version=version, metrics={"auc": 0.5}, categories=categories
        )
    return BundleInfo(model, items, path, manifest)


@contextlib.contextmanager
def _graphs_copied_from(source: BundleInfo, model: DIN) -> Iterator[None]:
    import dataclasses
    import shutil

    import model.export as export_mod

    same_cfg = dataclasses.replace(source.model.cfg, max_history=model.cfg.max_history) == model.cfg
    theirs, ours = source.model.state_dict(), model.state_dict()
    same_weights = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert type(source.model) is type(model) and same_cfg and same_weights, "not the same model"

    def copy_graph(m: DIN, path: Path, *, explaining: bool = False, serve: Any = None) -> None:
        assert m is model and serve is None, "the graphs copied are the serving and explaining ones"
        shutil.copyfile(source.path / ("explain.onnx" if explaining else "model.onnx"), path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "_export_onnx", copy_graph)
        yield


# The session bundles, made once per test process. Other packages' tests import the `bundle` fixture
# (tests/loadtest/conftest.py, tests/test_docker.py, tests/loop/...), and pytest makes an imported
# fixture the importing module's own: a session fixture per importer, and an export (two traced
# graphs, the longest setup of the suite) each time, of the same model. Treat them as read-only.
_SESSION_BUNDLES: dict[str, BundleInfo] = {}


def _session_bundle(tmp_path_factory: pytest.TempPathFactory, version: str, **kw: Any) -> BundleInfo:
    if version not in _SESSION_BUNDLES:
        path = tmp_path_factory.mktemp("bundle") / "bundle"
        _SESSION_BUNDLES[version] = make_bundle(path, version=version, **kw)
    return _SESSION_BUNDLES[version]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    return _session_bundle(tmp_path_factory, "test-v1", seed=7)


@pytest.fixture(scope="session")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """Another model (other weights, a shorter T) for hot reloads."""
    return _session_bundle(tmp_path_factory, "test-v2", seed=11, max_history=10)


TRAINED_T = 20  # the trained run's max_history: below the longest histories, so truncation is exercised


def din_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`din ARGS` in a process of its own, as a user runs it; it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"din {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model as a user makes one: din synth data -> din prepare (max_history TRAINED_T) -> din train
    (2 epochs) -> din export, each in a process of its own: {"raw", "data", "run", "bundle"}, read-only.
    Training and exporting are among the suite's longest setups (a minute on 2 cores): the held-out
    checks (test_end_to_end, test_explain_heldout) share this one."""
    from model.synth import SynthParams, generate

    root = tmp_path_factory.mktemp("e2e")
    raw, data, run, bundle = root / "raw", root / "data", root / "run", root / "bundle"
    generate(raw, SynthParams(users=120, items=150, categories=5, events_per_user=15.0, seed=3))
    din_cli("prepare", "--reviews", str(raw / "reviews.json.gz"), "--meta", str(raw / "meta.json.gz"),
            "--out", str(data), "--max-history", str(TRAINED_T), "--no-progress")  # fmt: skip
    din_cli("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--no-progress")
    din_cli("export", str(run), "--out", str(bundle))
    return {"raw": raw, "data": data, "run": run, "bundle": bundle}


def make_settings(bundle_path: Path, redis_url: str | None, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "bundle": bundle_path,
        "redis_url": redis_url,
        "port": 0,
        "warmup_rounds": 1,
        "providers": "CPUExecutionProvider",
        "intra_op_threads": 1,
        "precision": "fp32",  # the tests compare with the fp32 reference to 1e-5; test_precision sets it
    }
    return Settings(_env_file=None, **{**base, **kw})  # type: ignore[call-arg]


def _stacks() -> str:
    """Every thread's stack (a server that would not stop: what it, or what it joins, waits on)."""
    import sys
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


class LiveServer:
    """create_app(settings) under a real uvicorn server, in a thread of the test process."""

    def __init__(
        self, settings: Settings, warmup_gate: threading.Event | None = None, **options: Any
    ) -> None:
        """`options`: uvicorn.Config arguments over the ones `din serve` uses (service.protocol)."""
        self.app = create_app(settings, warmup_gate=warmup_gate)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            access_log=False,
            **{**uvicorn_options(settings), **options},
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 30s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), f"server did not stop; where every thread is:\n{_stacks()}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while c.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise AssertionError(f"not ready after {timeout}s: {c.get('/readyz').json()}")
                time.sleep(0.02)


@pytest.fixture
def live(bundle: BundleInfo, redis_url: str) -> Iterator[LiveServer]:
    """A ready server with default batching settings, on the (flushed) session Redis."""
    with LiveServer(make_settings(bundle.path, redis_url)) as server:
        server.wait_ready()
        yield server


class GatedProxy:
    """A TCP proxy in front of the real redis-server whose client -> server direction can be held:
    a deterministic "slow Redis" (CLIENT PAUSE would block CLIENT UNPAUSE too on Redis 7.0).

    Given several upstreams it is also a round-robin load balancer: each new connection goes to the
    next one, and `served` records which (its index) in order."""

    def __init__(self, upstream_url: str | list[str]) -> None:
        urls = [upstream_url] if isinstance(upstream_url, str) else upstream_url
        parts = [urlsplit(u) for u in urls]
        self.upstreams = [(u.hostname or "127.0.0.1", u.port or 6379) for u in parts]
        self._next = itertools.cycle(range(len(self.upstreams)))
        self.served: list[int] = []
        self.flowing = threading.Event()
        self.flowing.set()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0" if parts[0].scheme == "redis" else f"http://127.0.0.1:{port}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def __enter__(self) -> GatedProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.flowing.set()
        self._closing.set()
        for t in list(self._threads):
            t.join(timeout=5)
        for sk in [self._listener, *self._socks]:
            sk.close()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            k = next(self._next)
            self.served.append(k)
            server = socket.create_connection(self.upstreams[k])
            for sk in (client, server):
                sk.settimeout(0.05)
                self._socks.append(sk)
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        while not self._closing.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            while gated and not self.flowing.wait(0.05):
                if self._closing.is_set():
                    return
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Blackhole:
    """A `redis://` address whose connects hang, as when Redis's host or container is gone (no refusal,
    no reply): a listening socket with a backlog of 0, filled, so the kernel drops every new SYN."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        self._fill: list[socket.socket] = []
        for _ in range(3):  # the queue holds one; the others are dropped and retried by the kernel
            sk = socket.socket()
            sk.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sk.connect(("127.0.0.1", port))
            self._fill.append(sk)

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        for sk in [*self._fill, self._listener]:
            sk.close()


def seed_histories(url: str, histories: dict[str, list[str]], prefix: str = "din:") -> None:
    """Replace each user's history in the Redis at `url` (lists newest first, as the service reads them)."""
    r = redis.Redis.from_url(url)
    try:
        for user, hist in histories.items():
            key = history_key(prefix, user)
            r.delete(key)
            r.rpush(key, *hist)
    finally:
        r.close()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Value of one sample in Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def start_serve(
    *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start `din serve ARGS` on a free port and wait until /readyz answers 200. Returns (process, URL).

    Its output goes to pipes (read them with `communicate()`, or pass few enough log lines: a full pipe
    blocks the server), or to the file `log`."""
    port = free_port()
    cmd = [sys.executable, "-m", "cli", "serve", *args, "--port", str(port), "--warmup-rounds", "1"]
    env = {**os.environ, "DIN_PROVIDERS": "CPUExecutionProvider", **(env or {})}
    if log is not None:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=10) as c:
        while True:
            assert proc.poll() is None, log.read_text() if log is not None else proc.communicate()[1]
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "din serve did not become ready"
            time.sleep(0.05)


class FaultProxy:
    """A TCP proxy in front of Redis for fault injection, on its own event loop in a thread:

    - `delay(to_server=..., to_client=...)`: every chunk going that way is forwarded that many seconds
      after it arrived (order kept), e.g. a few ms on every reply, or longer than a deadline;
    - `hold(direction)` / `release(direction)`: nothing passes that way until released;
    - `cut()`: close every open connection at once (both ends, reset), as a dying Redis would;
      new connections are still accepted (and `refuse(True)` closes them as soon as they open).

    `connections` counts the client connections open through it."""

    TO_SERVER, TO_CLIENT = "to_server", "to_client"

    def __init__(self, upstream_url: str) -> None:
        u = urlsplit(upstream_url)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 6379)
        self._delays = {self.TO_SERVER: 0.0, self.TO_CLIENT: 0.0}
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")
        self._gates: dict[str, asyncio.Event] = {}
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    # ------------------------------------------------------------------ control (any thread)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        port = self._call(self._start())
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def delay(self, *, to_server: float | None = None, to_client: float | None = None) -> None:
        if to_server is not None:
            self._delays[self.TO_SERVER] = to_server
        if to_client is not None:
            self._delays[self.TO_CLIENT] = to_client

    def hold(self, direction: str = TO_SERVER) -> None:
        self._loop.call_soon_threadsafe(self._gates[direction].clear)

    def release(self, direction: str = TO_SERVER) -> None:
        self._loop.call_soon_threadsafe(self._gates[direction].set)

    def refuse(self, on: bool = True) -> None:
        self._refusing = on

    def cut(self) -> int:
        """Close every open connection (both ends); returns how many there were."""
        return int(self._call(self._cut()))

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ the proxy (its own loop)

    async def _start(self) -> int:
        self._gates = {d: asyncio.Event() for d in self._delays}
        for gate in self._gates.values():
            gate.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for gate in self._gates.values():
            gate.set()
        await self._cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cut(self) -> int:
        conns = list(self._conns)
        for pair in conns:
            for w in pair:
                w.transport.abort()
        self._conns.difference_update(conns)
        return len(conns)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            c_writer.transport.abort()
            return
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.transport.abort()  # upstream down: the client sees its connection dropped
            return
        pair = (c_writer, s_writer)
        self._conns.add(pair)
        pipes = [
            self._spawn(self._pipe(c_reader, s_writer, self.TO_SERVER)),
            self._spawn(self._pipe(s_reader, c_writer, self.TO_CLIENT)),
        ]
        await asyncio.gather(*pipes, return_exceptions=True)
        self._conns.discard(pair)
        for w in pair:
            w.transport.abort()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """Read chunks as they come; a writer task forwards each `delay` after its arrival, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def forward() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._gates[direction].wait()
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        writer = self._spawn(forward())
        try:
            while data := await src.read(65536):
                queue.put_nowait((loop.time() + self._delays[direction], data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)
        with contextlib.suppress(OSError):
            await writer


class ServeOutput:
    """Reads a `din serve` process's stdout and stderr as they come, keeping the last lines: a pipe
    nobody reads fills up and then blocks the server's logging, and with it the server."""

    def __init__(self, proc: subprocess.Popen[str], keep: int = 300) -> None:
        import collections

        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        # errors and tracebacks, kept apart: a storm of warnings would push them out of `lines`
        self.errors: collections.deque[str] = collections.deque(maxlen=keep)
        self._in_traceback = False
        self._streams = [s for s in (proc.stdout, proc.stderr) if s is not None]
        self._threads = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (proc.stdout, proc.stderr)
            if stream is not None
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                line = line.rstrip("\n")
                self.lines.append(line)
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                    self._in_traceback = True
                elif line[:1].isdigit():  # a new log record (they start with the time)
                    self._in_traceback = False
                if self._in_traceback:
                    self.errors.append(line)

    def tail(self, n: int = 60) -> str:
        """The last n lines, after any errors and tracebacks from earlier on."""
        last = list(self.lines)[-n:]
        earlier = [line for line in self.errors if line not in last]
        head = ["errors logged earlier:", *earlier[-n:], "--- last lines:"] if earlier else []
        return "\n".join([*head, *last])

    def close(self) -> None:
        """Once the process has exited: the rest of its output, then the pipes closed."""
        for t in self._threads:
            t.join(timeout=10)
        for stream in self._streams:
            stream.close()


def stop_serve(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    child.stop(proc)
