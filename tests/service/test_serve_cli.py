"""`din serve` as a user runs it: a subprocess, its flags, its exit codes, its private Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import Settings, usable_cores
from service.server import add_arguments
from tests.service.conftest import BundleInfo, start_serve


def _din(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_every_setting_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in flags, name
    args = parser.parse_args(["--redis-url", "redis://x:1/0", "--max-candidates", "7", "--log-json"])
    assert vars(args) == {"redis_url": "redis://x:1/0", "max_candidates": "7", "log_json": True}


def test_workers_and_threads_default_to_the_usable_cores() -> None:
    """Auto: one ONNX Runtime call per usable core, one thread each; explicit values win; the workers
    never outnumber the batches in flight."""
    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    auto = Settings(_env_file=None)  # type: ignore[call-arg]
    assert auto.workers == min(8, cores)
    assert auto.workers * auto.threads_per_call <= max(cores, auto.workers)
    assert auto.inflight_batches == auto.workers + 2
    one = Settings(_env_file=None, inference_workers=1)  # type: ignore[call-arg]
    assert (one.workers, one.threads_per_call, one.inflight_batches) == (1, cores, 3)
    fixed = Settings(_env_file=None, inference_workers=3, intra_op_threads=2, max_inflight_batches=1)  # type: ignore[call-arg]
    assert (fixed.workers, fixed.threads_per_call, fixed.inflight_batches) == (3, 2, 3)


@pytest.mark.parametrize("name", ["model.onnx", "items.txt"])
def test_corrupt_bundle_exits_non_zero_naming_the_file(bundle: BundleInfo, tmp_path: Path, name: str) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    with open(path / name, "ab") as f:
        f.write(b"tampered")
    proc = _din("serve", "--bundle", str(path), "--redis-url", "redis://127.0.0.1:1/0", "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert name in proc.stderr and "checksum mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_bundle_and_bad_flag_exit_2(tmp_path: Path) -> None:
    proc = _din("serve", "--bundle", str(tmp_path / "none"), "--redis-url", "redis://127.0.0.1:1/0")
    assert proc.returncode == 2 and "not a directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = _din("serve", "--port", "eighty")
    assert proc.returncode == 2 and "--port" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_with_private_redis_end_to_end(bundle: BundleInfo, tmp_path: Path) -> None:
    data = tmp_path / "redis-data"
    # the flag beats the environment; the environment fills in what no flag gives
    proc, url = start_serve(
        "--bundle",
        str(bundle.path),
        "--redis-data",
        str(data),
        "--log-json",
        "--max-candidates",
        "3",
        "--shutdown-drain-s",
        "0",
        env={"DIN_MAX_CANDIDATES": "50"},
    )
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert (data / "redis.url").exists()  # the private redis-server runs on the data dir
            events = {"events": [{"user_id": "zoe", "item_id": "i4"}, {"user_id": "zoe", "item_id": "i5"}]}
            assert c.post("/events", json=events).json() == {"written": 2, "duplicates": 0}
            resp = c.post(
                "/rank", json={"user_id": "zoe", "candidates": ["i2", "i3"]}, headers={"X-Request-ID": "r-1"}
            )
            assert resp.status_code == 200 and resp.json()["history_length"] == 2
            ref = dict(zip(["i2", "i3"], bundle.reference(["i2", "i3"], ["i5", "i4"]), strict=True))
            for item in resp.json()["items"]:
                assert abs(item["score"] - ref[item["item_id"]]) <= 1e-5
            too_many = c.post("/rank", json={"user_id": "zoe", "candidates": ["i2", "i3", "i4", "i5"]})
            assert too_many.status_code == 422 and too_many.json()["detail"][0]["field"] == "candidates"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert not (data / "redis.url").exists()  # the private redis-server was stopped
    assert (data / "appendonlydir").exists() or any(data.glob("appendonly*"))  # persistence on disk
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(rec.get("request_id") == "r-1" and "/rank" in rec["message"] for rec in logs), stderr
    assert "Traceback" not in stderr


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"`DIN_([A-Z0-9_]+)`", readme))
    missing = [name for name in Settings.model_fields if name.upper() not in documented]
    assert not missing, f"README's configuration table lacks {missing}"


def test_sigterm_drains_then_exits_cleanly_under_load(bundle: BundleInfo, tmp_path: Path) -> None:
    data = tmp_path / "redis-data"
    drain = 1.5
    proc, url = start_serve(
        "--bundle", str(bundle.path), "--redis-data", str(data), "--shutdown-drain-s", str(drain)
    )
    body = {"user_id": "u", "candidates": ["i2", "i3", "i4"], "history": ["i5", "i6"]}

    async def go() -> tuple[list[int], float, float]:
        statuses: list[int] = []
        not_ready = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=10) as ac:

            async def client() -> None:  # stops sending once readiness says so, as a load balancer does
                while not not_ready.is_set():
                    statuses.append((await ac.post("/rank", json=body)).status_code)

            async def probe() -> None:
                while (await ac.get("/readyz")).status_code == 200:
                    await asyncio.sleep(0.01)
                not_ready.set()

            clients = [asyncio.create_task(client()) for _ in range(4)]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await probe()
            seen_not_ready = time.monotonic() - t0
            ready = await ac.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"] == "shutting_down"
            await asyncio.gather(*clients)
            during = await ac.post("/rank", json=body)  # still served while draining
            statuses.append(during.status_code)
        exited = await asyncio.to_thread(proc.wait, 30)
        assert exited == 0
        return statuses, seen_not_ready, time.monotonic() - t0

    statuses, seen_not_ready, total = asyncio.run(go())
    _, stderr = proc.communicate(timeout=10)
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    assert seen_not_ready < 1.0  # readiness fails at once, not after the drain
    assert total >= drain  # and the process kept serving through the drain
    assert not (data / "redis.url").exists()  # the private redis-server was stopped cleanly
    assert "Traceback" not in stderr


def test_sighup_reloads_the_configured_bundle(
    bundle: BundleInfo, bundle_v2: BundleInfo, tmp_path: Path
) -> None:
    live = tmp_path / "live-bundle"
    shutil.copytree(bundle.path, live)
    proc, url = start_serve(
        "--bundle", str(live), "--redis-data", str(tmp_path / "r"), "--shutdown-drain-s", "0"
    )
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/model").json()["model_version"] == "test-v1"
            shutil.rmtree(live)
            shutil.copytree(bundle_v2.path, live)  # a deploy puts the new bundle in place, then signals
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while c.get("/model").json()["model_version"] != "test-v2":
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
            r = c.post("/rank", json={"user_id": "u", "candidates": ["i2"], "history": ["i3"]})
            assert r.status_code == 200 and r.json()["model_version"] == "test-v2"
            # a broken bundle on SIGHUP is refused: the running model serves on
            (live / "model.onnx").write_bytes(b"broken")
            proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert c.get("/model").json()["model_version"] == "test-v2"
            assert c.get("/readyz").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "SIGHUP reload refused" in stderr and "checksum mismatch for model.onnx" in stderr
