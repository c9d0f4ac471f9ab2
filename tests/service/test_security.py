"""Operating safely, over real HTTP: API keys (every route but the probes, /docs and /openapi.json
included, new routes by default), keys never logged, CORS only when configured, and no internal detail
in any error answer."""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contracts.errors import ConfigError
from service.log import RequestIdFilter
from service.security import ApiKeys, load_api_keys
from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, LiveServer, make_settings, start_serve

KEYS = ("k-alpha-0123456789", "k-beta-0123456789")
FILE_KEY = "k-gamma-from-the-file"
ALL_KEYS = (*KEYS, FILE_KEY)
OPEN = {"/healthz", "/readyz", "/metrics"}
RANK = {"user_id": "u", "candidates": ["i2", "i3"]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_file(path: Path) -> Path:
    path.write_text(f"# din-rank API keys\n\n  {FILE_KEY}  \n# {KEYS[0]}-commented-out\n")
    return path


@pytest.fixture(scope="module")
def secured(bundle: BundleInfo, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory):
    path = keys_file(tmp_path_factory.mktemp("keys") / "keys.txt")
    settings = make_settings(
        bundle.path,
        redis_server.url,
        api_keys=",".join(KEYS),
        api_keys_file=path,
        cors_origins="https://app.example, https://admin.example",
    )
    with LiveServer(settings) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def open_server(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    with LiveServer(make_settings(bundle.path, redis_server.url)) as server:
        server.wait_ready()
        yield server


# ------------------------------------------------------------------ the keys themselves


def test_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    path = keys_file(tmp_path / "keys")
    keys = load_api_keys(
        make_settings(tmp_path, None, api_keys=f" {KEYS[0]} ,{KEYS[1]},", api_keys_file=path)
    )
    assert len(keys) == 3 and all(keys.matches(k) for k in ALL_KEYS)
    for near_miss in ("", KEYS[0][:-1], KEYS[0] + "x", KEYS[0].upper(), f"{KEYS[0]}-commented-out", " "):
        assert not keys.matches(near_miss)
    assert repr(keys) == "ApiKeys(3 keys)"  # never the keys
    assert not load_api_keys(make_settings(tmp_path, None))  # none configured: open
    assert not load_api_keys(make_settings(tmp_path, None, api_keys=" "))  # an empty variable is unset


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys(ALL_KEYS)
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (ALL_KEYS[0], ALL_KEYS[-1], "wrong", "x" * 5000):
        calls.clear()
        keys.matches(presented)
        assert calls == [32, 32, 32]  # every key, always, and digests of one length


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read (No such file or directory)"),
        ("dir", "cannot be read (Is a directory)"),
        (b"\xff\xfe not utf-8", "cannot be read (not UTF-8 text)"),
        ("# only a comment\n\n", "no API key in it"),
        (f"{FILE_KEY}\nhas a space\n", "line 2: an API key must be printable ASCII without spaces"),
    ],
)
def test_a_bad_keys_file_is_a_clear_config_error(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "keys.txt"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_api_keys(make_settings(tmp_path, None, api_keys_file=path))
    assert str(path) in str(e.value) and message in str(e.value)
    assert "has a space" not in str(e.value)  # the message names the line, never the key


def test_a_variable_without_keys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DIN_API_KEYS is set but holds no key"):
        load_api_keys(make_settings(tmp_path, None, api_keys=" , ,"))


def test_din_serve_exits_2_naming_an_unreadable_keys_file(bundle: BundleInfo, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "--bundle",
            str(bundle.path),
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DIN_API_KEYS_FILE": str(missing)},
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        == f"din serve: DIN_API_KEYS_FILE {missing}: cannot be read (No such file or directory)"
    )


# ------------------------------------------------------------------ HTTP


def _operations(server: LiveServer) -> list[tuple[str, str]]:
    """Every (method, path) the app serves: the schema's operations and the documentation routes."""
    with server.client() as c:
        schema = c.get("/openapi.json", headers=bearer(KEYS[0])).json()
    ops = [(m.upper(), p) for p, item in schema["paths"].items() for m in item]
    return [*ops, ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]


def test_every_route_but_the_probes_needs_a_key(secured: LiveServer) -> None:
    ops = _operations(secured)
    assert ("POST", "/admin/reload") in ops and ("POST", "/rank") in ops  # the list is the app's own
    with secured.client() as c:
        for method, path in ops:
            for headers in (
                {},
                bearer("wrong"),
                {"Authorization": f"Basic {KEYS[0]}"},
                {"Authorization": "Bearer"},
            ):
                resp = c.request(method, path, headers=headers, json={})
                if path in OPEN:
                    assert resp.status_code != 401, (method, path)
                    continue
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"
                body = resp.json()
                assert body["error"] == "unauthorized"
                assert body["request_id"] == resp.headers["x-request-id"]
        assert c.get("/metrics").status_code == 200 and c.get("/healthz").status_code == 200


def test_each_key_opens_the_api(secured: LiveServer) -> None:
    with secured.client() as c:
        for key in ALL_KEYS:
            resp = c.post("/rank", json=RANK, headers=bearer(key))
            assert resp.status_code == 200, resp.text
            assert c.get("/model", headers=bearer(key)).json()["model_version"] == "test-v1"
            assert c.get("/docs", headers=bearer(key)).status_code == 200
        assert c.post("/admin/reload", headers=bearer("wrong")).status_code == 401  # nothing reloaded


def test_openapi_shows_the_bearer_scheme_only_when_keys_are_set(
    secured: LiveServer, open_server: LiveServer
) -> None:
    with secured.client() as c:
        schema = c.get("/openapi.json", headers=bearer(KEYS[0])).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from DIN_API_KEYS or DIN_API_KEYS_FILE: `Authorization: Bearer <key>`",
    }
    secured_ops = {p for p, item in schema["paths"].items() for op in item.values() if op.get("security")}
    assert secured_ops == set(schema["paths"]) - OPEN
    with open_server.client() as c:
        schema = c.get("/openapi.json").json()  # no keys: open, docs included
        assert c.get("/docs").status_code == 200 and c.post("/rank", json=RANK).status_code == 200
    assert "securitySchemes" not in schema.get("components", {})
    assert not any(op.get("security") for item in schema["paths"].values() for op in item.values())


def test_metrics_need_a_key_with_metrics_auth(bundle: BundleInfo, redis_url: str) -> None:
    settings = make_settings(bundle.path, redis_url, api_keys=KEYS[0], metrics_auth=True)
    with LiveServer(settings) as server, server.client() as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(KEYS[0])).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_keys_are_never_logged_nor_answered(secured: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    presented = [*ALL_KEYS, "wrong-key-1234567890"]
    answers = []
    with caplog.at_level(logging.DEBUG), secured.client() as c:
        for key in presented:
            for resp in (
                c.post("/rank", json=RANK, headers=bearer(key)),
                c.post("/rank", json={"user_id": 1}, headers=bearer(key)),
                c.get("/nope", headers=bearer(key)),
                c.get("/model", headers={"Authorization": f"Basic {key}"}),
            ):
                answers.append(resp.text + json.dumps(dict(resp.headers)))
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "POST /rank 200" in logged and "POST /rank 401" in logged  # the access log did run
    for key in presented:
        assert key not in logged
        assert not any(key in a for a in answers)


def test_din_serve_logs_no_key(bundle: BundleInfo, redis_url: str, tmp_path: Path) -> None:
    env = {
        "DIN_REDIS_URL": redis_url,
        "DIN_API_KEYS_FILE": str(keys_file(tmp_path / "keys")),
        "DIN_API_KEYS": KEYS[0],
        "DIN_LOG_LEVEL": "DEBUG",
        "DIN_LOG_JSON": "true",
        "DIN_SHUTDOWN_DRAIN_S": "0",
    }
    proc, url = start_serve("--bundle", str(bundle.path), env=env)
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.post("/rank", json=RANK, headers=bearer(FILE_KEY)).status_code == 200
            assert c.post("/rank", json=RANK, headers=bearer(KEYS[0])).status_code == 200
            assert c.post("/rank", json=RANK, headers=bearer("wrong-key-1234567890")).status_code == 401
            assert c.get("/model").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert '"status": 401' in stderr or '"status":401' in stderr
    for key in (FILE_KEY, KEYS[0], "wrong-key-1234567890"):
        assert key not in stderr


# ------------------------------------------------------------------ CORS


def test_cors_allows_exactly_the_configured_origins(secured: LiveServer) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with secured.client() as c:
        resp = c.options("/rank", headers=preflight)  # no key: browsers send none on a preflight
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        assert set(resp.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
        allowed = {h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "access-control-allow-credentials" not in resp.headers

        for bad in (
            {**preflight, "Origin": "https://evil.example"},
            {**preflight, "Access-Control-Request-Method": "DELETE"},
            {**preflight, "Access-Control-Request-Headers": "x-custom"},
        ):
            resp = c.options("/rank", headers=bad)
            assert resp.status_code == 400
            body = resp.json()
            assert body["error"] == "cors_refused" and body["request_id"] == resp.headers["x-request-id"]
            assert body["message"].startswith("Disallowed CORS")

        # simple requests: the allowed origin is named, errors included (so the page can read them)
        resp = c.post("/rank", json=RANK, headers={"Origin": "https://admin.example"})
        assert resp.status_code == 401
        assert resp.headers["access-control-allow-origin"] == "https://admin.example"
        assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()
        resp = c.post("/rank", json=RANK, headers={"Origin": "https://evil.example", **bearer(KEYS[0])})
        assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


def test_no_cors_unless_configured(open_server: LiveServer) -> None:
    with open_server.client() as c:
        resp = c.options(
            "/rank", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
        assert resp.status_code == 405 and resp.json()["error"] == "method_not_allowed"
        resp = c.post("/rank", json=RANK, headers={"Origin": "https://app.example"})
        assert resp.status_code == 200
        assert not any(h.startswith("access-control-") for h in resp.headers)


# ------------------------------------------------------------------ no internal detail in errors

_LEAKS = re.compile(  # a traceback, a source path, a server file path, the store, an object address
    r"Traceback|File \"|\.py\b|site-packages|/work/|/tmp/|/usr/|/home/|redis|0x[0-9a-f]{6,}|<class|"
    r"pydantic|starlette|fastapi|uvicorn|asyncio",
    re.IGNORECASE,
)
_CLASS_NAMES = re.compile(  # a Python class name: FooError, SomeException, the request models, NoneType
    r"\b[A-Z]\w*(Error|Exception|Request|Response|Body)\b|\bNoneType\b|\bdict\[|\blist\["
)
_HUGE = "u" * 300_000


def _bad_requests() -> list[tuple[str, str, dict[str, str], bytes | None]]:
    key = bearer(KEYS[0])
    as_json = {**key, "Content-Type": "application/json"}

    def j(obj: object) -> bytes:
        return json.dumps(obj).encode()

    return [
        # malformed bodies
        ("POST", "/rank", as_json, b'{"user_id": "u", "candidates": ['),
        ("POST", "/rank", as_json, b"not json at all"),
        ("POST", "/rank", as_json, b"\xff\xfe\x00garbage"),
        ("POST", "/rank", as_json, b""),
        ("POST", "/rank", as_json, b"null"),
        ("POST", "/rank", as_json, b"[1, 2, 3]"),
        ("POST", "/rank", as_json, b'"a string"'),
        ("POST", "/rank", {**key, "Content-Type": "text/plain"}, j(RANK)),
        ("POST", "/rank", {**key, "Content-Type": "application/x-www-form-urlencoded"}, b"user_id=u"),
        # wrong types and values
        ("POST", "/rank", as_json, j({"user_id": 123, "candidates": "i2"})),
        ("POST", "/rank", as_json, j({"user_id": "u", "candidates": [1, None, {"a": 1}]})),
        ("POST", "/rank", as_json, j({**RANK, "top_k": "5"})),
        ("POST", "/rank", as_json, j({**RANK, "top_k": 1.5})),
        ("POST", "/rank", as_json, j({**RANK, "top_k": -1})),
        ("POST", "/rank", as_json, j({**RANK, "history": {"a": 1}})),
        ("POST", "/rank", as_json, j({"user_id": "u", "candidates": []})),
        ("POST", "/rank", as_json, j({"user_id": "u", "candidates": [f"i{k}" for k in range(1001)]})),
        ("POST", "/rank", as_json, j({"user_id": "u", "candidates": [7] * 1000})),
        # huge ids: refused without being echoed
        ("POST", "/rank", as_json, j({"user_id": _HUGE, "candidates": ["i2"]})),
        ("POST", "/rank", as_json, j({"user_id": "u", "candidates": [_HUGE]})),
        ("POST", "/events", as_json, j({"events": [{"user_id": _HUGE, "item_id": "i2"}]})),
        # unknown fields, a huge one too
        ("POST", "/rank", as_json, j({**RANK, "unknown": 1})),
        ("POST", "/rank", as_json, j({**RANK, _HUGE: 1})),
        ("POST", "/events", as_json, j({"events": [{"user_id": "u", "item_id": "i2", "extra": True}]})),
        ("POST", "/events", as_json, j({"events": [{"user_id": "u", "item_id": "i2", "ts": "yesterday"}]})),
        ("POST", "/events", as_json, b'{"events": [{"user_id": "u", "item_id": "i2", "ts": NaN}]}'),
        ("POST", "/events", as_json, j({"events": []})),
        ("POST", "/admin/reload", as_json, j({"bundle": 5})),
        ("POST", "/admin/reload", as_json, j({"bundle": ""})),
        # too large
        ("POST", "/rank", as_json, b" " * (3 * 1024 * 1024)),
        # wrong method, unknown paths
        ("GET", "/rank", key, None),
        ("DELETE", "/events", key, None),
        ("PUT", "/healthz", {}, None),
        ("POST", "/model", key, None),
        ("GET", "/nope", key, None),
        ("GET", "/admin", key, None),
        ("GET", "/ranks", key, None),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd", key, None),
        ("GET", "/" + "x" * 4000, key, None),
        # bad authentication
        ("POST", "/rank", {"Content-Type": "application/json"}, j(RANK)),
        ("POST", "/rank", {**as_json, **bearer("wrong")}, j(RANK)),
        ("POST", "/rank", {**as_json, "Authorization": "Bearer"}, j(RANK)),
        ("POST", "/rank", {**as_json, "Authorization": "Basic dXNlcjpwYXNz"}, j(RANK)),
        ("POST", "/rank", {**as_json, **bearer("k" * 8000)}, j(RANK)),
        ("GET", "/openapi.json", {}, None),
    ]


def test_bad_requests_answer_json_without_internal_detail(secured: LiveServer) -> None:
    with secured.client() as c:
        for method, path, headers, body in _bad_requests():
            resp = c.request(method, path, headers=headers, content=body)
            what = f"{method} {path[:40]} {body[:60] if body else body!r}"
            assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:500])
            assert resp.headers["content-type"] == "application/json", what
            payload = resp.json()
            assert {"error", "message", "request_id"} <= set(payload), (what, payload)
            assert payload["request_id"] == resp.headers["x-request-id"]
            assert len(resp.content) < 4096, (what, len(resp.content))  # nothing echoed at length
            text = json.dumps(payload)
            assert not _LEAKS.search(text), (what, _LEAKS.search(text), text[:500])
            assert not _CLASS_NAMES.search(text), (what, _CLASS_NAMES.search(text), text[:500])
            assert KEYS[0] not in text


def test_an_unexpected_failure_is_a_json_500_without_its_detail(
    bundle: BundleInfo, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = LiveServer(make_settings(bundle.path, redis_url))

    async def boom() -> None:  # a route of this test's own: a bug, as a handler would have one
        raise RuntimeError("secret detail at /work/service/x.py line 3 redis://10.0.0.1:6379")

    server.app.add_api_route("/boom", boom)
    caplog.handler.addFilter(RequestIdFilter())  # as configure_logging's handler does
    with caplog.at_level(logging.ERROR), server, server.client() as c:
        resp = c.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert resp.status_code == 500
    assert resp.json() == {
        "error": "internal_error",
        "message": "internal server error",
        "request_id": "boom-1",
    }
    logged = [r for r in caplog.records if r.exc_info and "secret detail" in str(r.exc_info[1])]
    assert (
        logged and logged[0].__dict__["request_id"] == "boom-1"
    )  # the detail is in the log, with the request id
