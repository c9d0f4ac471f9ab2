"""The live OpenAPI schema, fuzzed by schemathesis against a running `din serve` (API keys on): for every
operation, valid and invalid requests generated from the schema itself (bounded, derandomised), one in
ten without the key, and a body over the size limit; then valid ones again with Redis gone. No answer
is a server error (a 5xx other than 503 overloaded / not_ready, and /events' 503 store_unavailable /
store_timeout while Redis is down), and every answer is one the schema documents: its status code,
content type, headers and body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from service.store.embedded import EmbeddedRedis
from service.store.keys import DEFAULT_PREFIX, history_key
from tests.service.conftest import BundleInfo, FaultProxy, ServeOutput, start_serve, stop_serve

MAX_EXAMPLES = 30  # per operation and generation mode, Redis up
MAX_EXAMPLES_DOWN = 10  # per operation, valid requests only, Redis down
API_KEY = "fuzz-key-7f3a91"
MAX_BODY = 16384  # DIN_MAX_BODY_BYTES: far above what the fuzzer sends, cheap to pass on purpose
RETRYABLE = {"overloaded", "not_ready"}  # 503s a client is told to retry: not server errors
REDIS_DOWN = {"store_unavailable", "store_timeout"}  # /events' 503s, only while Redis is down


def not_a_server_error(allowed: set[str]) -> Any:
    """schemathesis' own check, except for the 503s the service answers on purpose (`allowed` codes)."""

    def check(ctx: Any, response: Any, case: Any) -> None:
        if response.status_code < 500:
            return
        body: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert response.status_code == 503 and error in allowed, (
            f"server error {response.status_code}: {response.text[:500]}"
        )

    check.__name__ = "not_a_server_error"
    return check


SCHEMA_CHECKS = [
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def served(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[tuple[str, FaultProxy]]:
    """`din serve` with API keys, on the session's Redis behind a proxy (so Redis can be taken away)."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.flushall()
        for user in ("A1B2C3D4", "u", "0"):  # the schema's example user, and short ids generators like
            client.rpush(history_key(DEFAULT_PREFIX, user), *bundle.items[2:12])
    finally:
        client.close()
    with FaultProxy(redis_server.url) as proxy:
        proc, url = start_serve(
            "--bundle", str(bundle.path), "--redis-url", proxy.url, "--shutdown-drain-s", "0",
            "--intra-op-threads", "1", "--log-level", "WARNING", "--api-keys", API_KEY,
            "--request-timeout-ms", "2000",  # a loaded machine: fuzzing is not about shedding
            "--max-body-bytes", str(MAX_BODY),
        )  # fmt: skip
        out = ServeOutput(proc)
        try:
            yield url, proxy
            assert proc.poll() is None, f"din serve died\n{out.tail()}"
        finally:
            stop_serve(proc)
            out.close()


def _fuzz(schema: Any, modes: list[GenerationMode], max_examples: int, allowed_503: set[str]) -> list[str]:
    """Every operation, in each mode; one request in ten without the API key. Returns the findings."""
    checks = [not_a_server_error(allowed_503), *SCHEMA_CHECKS]
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in modes:

                @settings(
                    max_examples=max_examples,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    report_multiple_bugs=False,
                )
                @given(case=operation.as_strategy(generation_mode=mode), keyless=st.integers(0, 9))
                def fuzz(case: Any, keyless: int) -> None:
                    headers = {} if keyless == 9 else {"Authorization": f"Bearer {API_KEY}"}
                    case.call_and_validate(session=session, headers=headers, checks=checks, timeout=30)

                try:
                    fuzz()
                except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                    assert mode is GenerationMode.NEGATIVE
                except (Exception, BaseExceptionGroup) as e:  # every operation's findings, not the first's
                    failures.append(f"--- {operation.label} ({mode.value}):\n{e}")
    return failures


@pytest.mark.slow
def test_every_answer_is_documented_and_none_is_a_server_error(served: tuple[str, FaultProxy]) -> None:
    url, proxy = served
    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth, timeout=30)
    labels = {r.ok().label for r in schema.get_all_operations()}
    assert {"POST /rank", "POST /events", "GET /readyz", "GET /metrics", "POST /admin/reload"} <= labels

    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    failures = _fuzz(schema, modes, MAX_EXAMPLES, RETRYABLE)

    # What the fuzzer does not send: a body over the size limit, refused unread, as documented.
    big = {"user_id": "u", "candidates": ["i2"] * (MAX_BODY // 4)}
    checks = [not_a_server_error(RETRYABLE), *SCHEMA_CHECKS]
    with requests.Session() as session:
        for label in ("POST /rank", "POST /events", "POST /admin/reload"):
            case = schema.find_operation_by_label(label).Case(body=big, media_type="application/json")
            try:
                r = case.call_and_validate(session=session, headers=auth, checks=checks, timeout=30)
                assert r.status_code == 413, (label, r.status_code, r.text[:300])
            except (Exception, BaseExceptionGroup) as e:
                failures.append(f"--- {label} (a body over the limit):\n{e}")

    # Redis gone (connections cut, new ones refused): degraded answers, 503s, all documented.
    proxy.refuse(True)
    proxy.cut()
    try:
        failures += _fuzz(schema, [GenerationMode.POSITIVE], MAX_EXAMPLES_DOWN, RETRYABLE | REDIS_DOWN)
    finally:
        proxy.refuse(False)
    assert not failures, "\n".join(failures)
