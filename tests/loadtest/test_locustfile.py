"""loadtest/locustfile.py without locust installed: it compiles, and run under a stand-in `locust`
module its user posts the shared mix's bodies (loadtest.sampling), with bundle items only."""

from __future__ import annotations

import py_compile
import runpy
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from contracts.vocab import RESERVED
from loadtest.sampling import items_from_bundle

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def test_locustfile_compiles() -> None:
    py_compile.compile(str(LOCUSTFILE), doraise=True)


class _Client:
    """Records what a locust HttpUser's `client.post` is asked to send."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def post(self, path: str, **kw: Any) -> None:
        self.posts.append((path, kw))


def _fake_locust() -> types.ModuleType:
    """The three names the locustfile takes from locust, reduced to what the test needs."""
    locust = types.ModuleType("locust")

    class HttpUser:
        def __init__(self) -> None:
            self.client = _Client()

    locust.HttpUser = HttpUser  # type: ignore[attr-defined]
    locust.constant_pacing = lambda seconds: seconds  # type: ignore[attr-defined]
    locust.task = lambda fn: fn  # type: ignore[attr-defined]
    return locust


def test_locust_user_posts_the_shared_mix(items_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = items_bundle
    monkeypatch.setitem(sys.modules, "locust", _fake_locust())
    monkeypatch.setenv("DIN_LT_BUNDLE", str(bundle))
    monkeypatch.setenv("DIN_LT_CANDIDATES", "10")
    monkeypatch.setenv("DIN_LT_UNKNOWN_ITEMS", "0")
    monkeypatch.setenv("DIN_LT_PACING_S", "0.5")
    for name in ("DIN_LT_REVIEWS", "DIN_LT_USERS_FILE", "DIN_LT_ITEMS_FILE", "DIN_LT_TOP_K"):
        monkeypatch.delenv(name, raising=False)
    ns = runpy.run_path(str(LOCUSTFILE))
    assert ns["MIX"].items == items_from_bundle(bundle) and ns["MIX"].candidates == 10
    user = ns["RankUser"]()
    assert ns["RankUser"].wait_time == 0.5
    for _ in range(50):
        user.rank()
    known = set(items_from_bundle(bundle))
    assert len(user.client.posts) == 50
    for path, kw in user.client.posts:
        assert path == "/rank" and kw["name"] == "/rank"
        body = kw["json"]
        assert set(body) == {"user_id", "candidates"} and isinstance(body["user_id"], str)
        cands = body["candidates"]
        assert 1 <= len(cands) <= 500
        # distinct unless the draw asked for more candidates than the bundle has items
        assert len(set(cands)) == len(cands) or len(cands) > len(known)
        assert set(cands) <= known and not set(cands) & set(RESERVED)
