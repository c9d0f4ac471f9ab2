"""Request limits over real sockets: the body's size (413) and arrival time (408), the head's deadline
(408) and size (431), the keep-alive timeout, and a 50 MB upload to `din serve` that is refused early
without the server's memory growing by it."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.protocol import protocol_class
from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, LiveServer, make_settings, metric_value, start_serve

MB = 1024 * 1024
RANK = b'{"user_id": "u", "candidates": ["i2", "i3"]}'


class Server(LiveServer):
    """LiveServer, with its address for raw sockets."""

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def head(path: str = "/rank", **headers: str | int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_error(status: int, headers: dict[str, str], body: bytes, code: str, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert headers.get("connection") == "close"
    payload = json.loads(body)
    assert payload["error"] == code
    assert payload["request_id"] == headers["x-request-id"]
    return payload


@pytest.fixture(scope="module")
def server(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[Server]:
    """Small limits so the tests are quick: 4 KiB bodies, 0.5 s to send a head or a body."""
    settings = make_settings(
        bundle.path, redis_server.url, max_body_bytes=4096, request_read_timeout_s=0.5, keep_alive_timeout_s=5
    )
    with Server(settings) as s:
        s.wait_ready()
        yield s


def padded(size: int) -> bytes:
    """A valid /rank body of exactly `size` bytes (JSON whitespace padding)."""
    return RANK[:-1] + b" " * (size - len(RANK)) + b"}"


# ------------------------------------------------------------------ body size


def test_a_content_length_over_the_limit_is_refused_before_any_body_is_sent(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        sock.sendall(head(Content_Length=50 * MB, X_Request_ID="big-1"))  # and not one byte of body
        t0 = time.monotonic()
        status, headers, body = read_response(sock)
        assert time.monotonic() - t0 < 2
        payload = assert_error(status, headers, body, "payload_too_large", 413)
        assert headers["x-request-id"] == "big-1"
        assert payload["limit_bytes"] == 4096 and "4096 bytes" in payload["message"]
        assert closed_by_server(sock)


def test_a_body_at_the_limit_is_served_and_one_byte_more_is_refused(server: Server) -> None:
    with server.client() as c:
        assert c.post("/rank", content=padded(4096), headers={"content-type": "application/json"}).is_success
        resp = c.post("/rank", content=padded(4097), headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"

        def chunks(body: bytes) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        ok = c.post("/rank", content=chunks(padded(4096)), headers={"content-type": "application/json"})
        assert ok.is_success, ok.text
        resp = c.post("/rank", content=chunks(padded(4097)), headers={"content-type": "application/json"})
        assert resp.status_code == 413
        assert resp.json()["error"] == "payload_too_large" and resp.json()["request_id"]
        metrics = c.get("/metrics").text
        # refused while streaming (after routing) or on its Content-Length (before routing): both are
        # counted under the route of their path, which the app declares
        assert metric_value(metrics, "din_requests_total", {"route": "/rank", "status": "413"}) >= 2


def test_a_50mb_upload_is_refused_before_the_client_finished_sending(server: Server) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        block = b" " * MB
        for _ in range(50):
            sent += len(block)
            yield block

    with server.client() as c:
        t0 = time.monotonic()
        resp = c.post("/rank", content=b" " * (50 * MB), headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
        assert time.monotonic() - t0 < 5
        resp = c.post("/rank", content=body(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
    assert sent < 25 * MB, f"the client sent {sent / MB:.0f} MB before the answer"


# ------------------------------------------------------------------ body time


def test_a_stalled_body_answers_408(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        sock.sendall(head(Content_Length=len(RANK), X_Request_ID="slow-1") + RANK[:10])
        t0 = time.monotonic()
        status, headers, body = read_response(sock)
        assert 0.4 < time.monotonic() - t0 < 3
        payload = assert_error(status, headers, body, "request_timeout", 408)
        assert headers["x-request-id"] == "slow-1" and payload["timeout_s"] == 0.5
        assert closed_by_server(sock)


def test_a_trickled_body_answers_408_at_the_deadline_not_when_it_stalls(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        sock.sendall(head(Content_Length=len(RANK)))
        t0 = time.monotonic()
        sock.settimeout(0.05)
        answer = b""
        for byte in RANK[:-1]:  # a byte every 50 ms: never idle long, never finished
            sock.sendall(bytes([byte]))
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.4 < time.monotonic() - t0 < 2


def test_a_body_that_arrives_in_time_is_served(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        sock.sendall(head(Content_Length=len(RANK)) + RANK[:10])
        time.sleep(0.2)
        sock.sendall(RANK[10:])
        status, _, body = read_response(sock)
        assert status == 200, body
        assert len(json.loads(body)["items"]) == 2


# ------------------------------------------------------------------ the head (service.protocol)


def test_a_trickled_head_answers_408(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        sock.settimeout(0.05)
        answer = b""
        for _ in range(100):  # a header byte every 50 ms, never the blank line that ends the head
            with_data = True
            try:
                sock.sendall(b"X")
            except OSError:
                with_data = False
            try:
                answer += sock.recv(65536)
                if b"\r\n\r\n" in answer:
                    break
            except TimeoutError:
                if not with_data:
                    break
        assert 0.4 < time.monotonic() - t0 < 3
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", answer
        headers_blob, _, body = rest.partition(b"\r\n\r\n")
        payload = json.loads(body)
        assert payload["error"] == "request_timeout" and payload["request_id"]
        assert f"x-request-id: {payload['request_id']}".encode() in headers_blob


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with socket.create_connection(server.address) as sock:
        t0 = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed, without an answer
        assert 0.4 < time.monotonic() - t0 < 3


@pytest.mark.parametrize("parser", ["auto", "h11"])
def test_a_head_over_64kib_answers_431(bundle: BundleInfo, redis_server: EmbeddedRedis, parser: str) -> None:
    settings = make_settings(bundle.path, redis_server.url)
    options: dict[str, object] = {}
    if parser == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        # h11's own limit (16 KiB by default) raised, so ours is the one that answers
        options = {"http": protocol_class(10, base=H11Protocol), "h11_max_incomplete_event_size": 1 << 20}
    with Server(settings, **options) as s, socket.create_connection(s.address) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        try:
            for i in range(40):  # 40 x 4 KiB in separate writes
                sock.sendall(f"X-Pad-{i}: ".encode() + b"a" * 4096 + b"\r\n")
                time.sleep(0.002)
        except OSError:
            pass  # closed under us: the answer is already waiting
        status, headers, body = read_response(sock)
        payload = assert_error(status, headers, body, "headers_too_large", 431)
        assert payload["limit_bytes"] == 64 * 1024


def test_keep_alive_idles_for_its_own_timeout_not_the_head_deadline(
    bundle: BundleInfo, redis_server: EmbeddedRedis
) -> None:
    ping = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    settings = make_settings(
        bundle.path, redis_server.url, request_read_timeout_s=0.3, keep_alive_timeout_s=1.5
    )
    with Server(settings) as s, socket.create_connection(s.address) as sock:
        sock.sendall(ping)
        assert read_response(sock)[0] == 200
        time.sleep(0.8)  # idle longer than the head deadline, shorter than keep-alive
        sock.sendall(ping)
        assert read_response(sock)[0] == 200
        t0 = time.monotonic()
        assert closed_by_server(sock)  # then closed by the keep-alive timeout
        assert 1.0 < time.monotonic() - t0 < 4


# ------------------------------------------------------------------ din serve, as run


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory in /proc")
def test_din_serve_refuses_50mb_uploads_without_holding_them(bundle: BundleInfo, redis_url: str) -> None:
    env = {"DIN_REDIS_URL": redis_url, "DIN_REQUEST_READ_TIMEOUT_S": "1", "DIN_SHUTDOWN_DRAIN_S": "0"}
    proc, url = start_serve("--bundle", str(bundle.path), env=env)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            # warm the request path first, so the memory compared is the upload's alone
            for _ in range(20):
                assert c.post("/rank", content=RANK, headers={"content-type": "application/json"}).is_success
            before = _vm_hwm_kib(proc.pid)
            sent = 0

            def body() -> Iterator[bytes]:
                nonlocal sent
                for _ in range(50):
                    sent += MB
                    yield b" " * MB

            for content in (b" " * (50 * MB), body()):
                resp = c.post("/rank", content=content, headers={"content-type": "application/json"})
                assert resp.status_code == 413, resp.text
                assert resp.json()["error"] == "payload_too_large"
            assert sent < 25 * MB
            grown_mib = (_vm_hwm_kib(proc.pid) - before) / 1024
            assert grown_mib < 16, f"the server's peak memory grew by {grown_mib:.0f} MiB"
        # the head deadline is in din serve's uvicorn: a trickled head is answered 408
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            status, _, body_ = read_response(sock, timeout=10)
            assert status == 408 and json.loads(body_)["error"] == "request_timeout"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "413" in stderr and "408 request_timeout" in stderr  # access log and the head's refusal
