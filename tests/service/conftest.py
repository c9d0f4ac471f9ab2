"""Service fixtures: a small exported bundle (random DIN, weights scaled so scores spread), the
PyTorch reference for it, and a real uvicorn server running `create_app` in a thread."""

from __future__ import annotations

import asyncio
import contextlib
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
import torch
import uvicorn

from model.din import DIN, DINConfig, build_model
from model.export import export_model
from model.vocab import Vocab
from service.app import create_app
from service.config import Settings
from service.store.embedded import free_port

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


def make_bundle(path: Path, *, seed: int, version: str, max_history: int = MAX_HISTORY) -> BundleInfo:
    """Export a random DIN (weights scaled so scores spread) as a bundle at `path`."""
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
    manifest = export_model(model, items, path, model_version=version, metrics={"auc": 0.5})
    return BundleInfo(model, items, path, manifest)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle", seed=7, version="test-v1")


@pytest.fixture(scope="session")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    """Another model (other weights, a shorter T) for hot reloads."""
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    return make_bundle(path, seed=11, version="test-v2", max_history=10)


def make_settings(bundle_path: Path, redis_url: str | None, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "bundle": bundle_path,
        "redis_url": redis_url,
        "port": 0,
        "warmup_rounds": 1,
        "providers": "CPUExecutionProvider",
        "intra_op_threads": 1,
    }
    return Settings(_env_file=None, **{**base, **kw})  # type: ignore[call-arg]


class LiveServer:
    """create_app(settings) under a real uvicorn server, in a thread of the test process."""

    def __init__(self, settings: Settings, warmup_gate: threading.Event | None = None) -> None:
        self.app = create_app(settings, warmup_gate=warmup_gate)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None, access_log=False)
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
        assert not self.thread.is_alive(), "server did not stop"

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
    a deterministic "slow Redis" (CLIENT PAUSE would block CLIENT UNPAUSE too on Redis 7.0)."""

    def __init__(self, upstream_url: str) -> None:
        u = urlsplit(upstream_url)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 6379)
        self.flowing = threading.Event()
        self.flowing.set()
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
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
            server = socket.create_connection(self.upstream)
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


def start_serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start `din serve ARGS` on a free port and wait until /readyz answers 200. Returns (process, URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "cli", "serve", *args, "--port", str(port), "--warmup-rounds", "1"]
    env = {**os.environ, "DIN_PROVIDERS": "CPUExecutionProvider", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=10) as c:
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "din serve did not become ready"
            time.sleep(0.05)
