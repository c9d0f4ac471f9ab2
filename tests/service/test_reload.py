"""Hot reload over real HTTP: a good bundle switches, a bad one is refused while the old one serves,
and a reload under load fails no request; every answer names the model that scored it."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx

from tests.service.conftest import BundleInfo, LiveServer, make_settings, metric_value

TOL = 1e-5
CANDIDATES = ["i2", "i3", "i4", "i5", "i6"]
HISTORY = [f"i{k}" for k in range(20, 45)]  # longer than either model's T


def _scores(body: dict) -> dict[str, float]:
    return {it["item_id"]: it["score"] for it in body["items"]}


def _matches(bundle: BundleInfo, body: dict) -> bool:
    want = dict(zip(CANDIDATES, bundle.reference(CANDIDATES, HISTORY), strict=True))
    got = _scores(body)
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= TOL for k in want)


def _rank(c: httpx.Client) -> dict:
    r = c.post("/rank", json={"user_id": "u", "candidates": CANDIDATES, "history": HISTORY})
    assert r.status_code == 200, r.text
    return r.json()


def test_reload_switches_models_and_back(bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str) -> None:
    with LiveServer(make_settings(bundle.path, redis_url)) as server, server.client() as c:
        server.wait_ready()
        before = _rank(c)
        assert before["model_version"] == "test-v1" and _matches(bundle, before)

        r = c.post("/admin/reload", json={"bundle": str(bundle_v2.path)})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "test-v2" and r.json()["previous_version"] == "test-v1"
        after = _rank(c)
        assert after["model_version"] == "test-v2" and _matches(bundle_v2, after)
        assert after["history_length"] == 10  # the new model's T
        assert c.get("/model").json()["model_version"] == "test-v2"
        assert c.get("/readyz").json()["model_version"] == "test-v2"

        r = c.post("/admin/reload")  # no body: the configured bundle
        assert r.status_code == 200 and r.json()["model_version"] == "test-v1"
        assert _matches(bundle, _rank(c))
        text = c.get("/metrics").text
    assert metric_value(text, "din_reloads_total", {"outcome": "ok"}) == 2
    assert 'model_version="test-v1"' in text


def _corrupt(src: BundleInfo, dst: Path) -> Path:
    shutil.copytree(src.path, dst)
    with open(dst / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    return dst


def _wrong_format(src: BundleInfo, dst: Path) -> Path:
    shutil.copytree(src.path, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["format_version"] = 999
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_bad_bundles_are_refused_and_the_old_model_serves_on(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    cases = {
        "corrupt": (_corrupt(bundle_v2, tmp_path / "corrupt"), "checksum mismatch for model.onnx"),
        "format": (_wrong_format(bundle_v2, tmp_path / "format"), "format_version 999"),
        "missing": (tmp_path / "nowhere", "not a directory"),
    }
    with LiveServer(make_settings(bundle.path, redis_url)) as server, server.client() as c:
        server.wait_ready()
        for name, (path, reason) in cases.items():
            r = c.post("/admin/reload", json={"bundle": str(path)})
            assert r.status_code == 422, (name, r.text)
            body = r.json()
            assert body["error"] == "bundle_rejected" and reason in body["message"], (name, body)
            assert body["still_serving"] == "test-v1" and "test-v1" in body["message"]
            assert body["request_id"]
            served = _rank(c)
            assert served["model_version"] == "test-v1" and _matches(bundle, served)
        r = c.post("/admin/reload", json={"bundle": ""})
        assert r.status_code == 422 and r.json()["error"] == "validation_error"
        assert c.get("/readyz").status_code == 200
        text = c.get("/metrics").text
    assert metric_value(text, "din_reloads_total", {"outcome": "rejected"}) == 3


def test_reload_under_load_fails_no_request(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str
) -> None:
    # a generous budget: the new model warms up on the same 2 cores, and this is about the swap, not load
    settings = make_settings(bundle.path, redis_url, batch_max_delay_ms=1, request_timeout_ms=10_000)
    with LiveServer(settings) as server:
        server.wait_ready()

        async def go() -> tuple[list[httpx.Response], list[httpx.Response]]:
            answers: list[httpx.Response] = []
            stop = asyncio.Event()
            async with server.async_client() as ac:

                async def client() -> None:
                    while not stop.is_set():
                        answers.append(
                            await ac.post(
                                "/rank", json={"user_id": "u", "candidates": CANDIDATES, "history": HISTORY}
                            )
                        )

                clients = [asyncio.create_task(client()) for _ in range(6)]
                await asyncio.sleep(0.3)
                reloads = [await ac.post("/admin/reload", json={"bundle": str(bundle_v2.path)})]
                await asyncio.sleep(0.3)
                reloads.append(await ac.post("/admin/reload"))
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*clients)
            return answers, reloads

        answers, reloads = asyncio.run(go())
    assert [r.status_code for r in reloads] == [200, 200]
    assert len(answers) > 20 and all(r.status_code == 200 for r in answers), {r.status_code for r in answers}
    versions = [r.json()["model_version"] for r in answers]
    assert {"test-v1", "test-v2"} <= set(versions)
    for r in answers:  # each answer is exactly the model it names
        body = r.json()
        assert _matches(bundle if body["model_version"] == "test-v1" else bundle_v2, body)


def test_concurrent_reloads_run_one_at_a_time(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str
) -> None:
    with LiveServer(make_settings(bundle.path, redis_url, warmup_rounds=5)) as server:
        server.wait_ready()

        async def go() -> list[httpx.Response]:
            async with server.async_client() as ac:
                body = {"bundle": str(bundle_v2.path)}
                return list(await asyncio.gather(*(ac.post("/admin/reload", json=body) for _ in range(3))))

        statuses = sorted(r.status_code for r in asyncio.run(go()))
    assert statuses[0] == 200 and set(statuses) <= {200, 409} and 409 in statuses
