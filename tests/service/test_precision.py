"""DIN_PRECISION: the int8 serving graph (model.int8.onnx) chosen explicitly serves scores within the
gate's tolerance of the PyTorch reference and says so (/readyz, /models, din_model_info); auto times
both and reports its choice; int8 asked of a bundle without the graph is a startup error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.bundle import INT8_GRAPH
from model.checkpoint import load_run
from tests.service.conftest import BundleInfo, LiveServer, make_settings

pytestmark = pytest.mark.slow  # the session's `trained` model (a minute on 2 cores)

# int8 vs the PyTorch reference, a request's scores: the gate's max |int8 - fp32| on held-out samples
# is ~1e-4 on these models; fp32 itself is within 1e-5 of PyTorch
INT8_TOLERANCE = 2e-3


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_int8_serves_within_tolerance_of_pytorch(trained: dict[str, Path], redis_url: str) -> None:
    bundle = trained["bundle"]
    int8 = _manifest(bundle)["precision"]["int8"]
    assert int8["written"], f"the trained model's int8 graph was refused: {int8['reason']}"
    assert (bundle / INT8_GRAPH).is_file()
    model, ckpt = load_run(trained["run"])
    items = ckpt.items[2:]
    rng = np.random.default_rng(0)
    with LiveServer(make_settings(bundle, redis_url, precision="int8")) as server, server.client() as c:
        server.wait_ready()
        ready = c.get("/readyz").json()
        assert ready["precision"] == "int8" and ready["model_version"] == _manifest(bundle)["model_version"]
        member = c.get("/models").json()["models"]["default"]
        assert member["precision"] == "int8" and member["has_int8"]
        info = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("din_model_info{")]
        assert info and 'precision="int8"' in info[0]
        worst = 0.0
        for _ in range(5):
            cands = [str(i) for i in rng.choice(items, size=60, replace=False)]
            history = [str(i) for i in rng.choice(items, size=int(rng.integers(0, 25)))]
            body = c.post("/rank", json={"user_id": "u1", "candidates": cands, "history": history}).json()
            served = {it["item_id"]: it["score"] for it in body["items"]}
            T = ckpt.max_history
            hist = torch.tensor([ckpt.vocab.lookup(history[:T]).tolist() or [0]] * len(cands))
            with torch.no_grad():
                want = torch.sigmoid(
                    model(
                        torch.from_numpy(ckpt.vocab.lookup(cands)),
                        hist,
                        torch.full((len(cands),), min(len(history), T)),
                    )
                ).numpy()
            got = np.array([served[i] for i in cands])
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= INT8_TOLERANCE


def test_auto_picks_one_and_reports_it(trained: dict[str, Path], redis_url: str) -> None:
    with LiveServer(make_settings(trained["bundle"], redis_url, precision="auto")) as server:
        server.wait_ready()
        with server.client() as c:
            ready = c.get("/readyz").json()
            member = c.get("/models").json()["models"]["default"]
            metrics = c.get("/metrics").text
    assert ready["precision"] in ("fp32", "int8") and member["precision"] == ready["precision"]
    assert set(member["timings_ms"]) == {"fp32", "int8"} and all(v > 0 for v in member["timings_ms"].values())
    faster = min(member["timings_ms"], key=member["timings_ms"].__getitem__)
    if ready["precision"] == "int8":  # int8 only when the faster, by a margin
        assert faster == "int8"
    assert re.search(r'din_model_info\{[^}]*precision="' + ready["precision"] + '"', metrics)


def test_auto_serves_fp32_without_the_graph(bundle: BundleInfo, redis_url: str) -> None:
    assert INT8_GRAPH not in bundle.manifest["files"]
    with LiveServer(make_settings(bundle.path, redis_url, precision="auto")) as server:
        server.wait_ready()
        with server.client() as c:
            assert c.get("/readyz").json()["precision"] == "fp32"
            member = c.get("/models").json()["models"]["default"]
    assert member["has_int8"] is False and member["timings_ms"] == {}


def test_int8_without_the_graph_is_a_startup_error(bundle: BundleInfo) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "--bundle",
            str(bundle.path),
            "--precision",
            "int8",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "DIN_PRECISION=int8" in proc.stderr and INT8_GRAPH in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reload_keeps_the_precision_rule(
    trained: dict[str, Path], bundle: BundleInfo, redis_url: str
) -> None:
    """DIN_PRECISION holds for hot reloads too: with int8 asked, a bundle without the graph is refused
    (422) and the int8 model keeps serving; the trained bundle reloads as int8."""
    with LiveServer(make_settings(trained["bundle"], redis_url, precision="int8")) as server:
        server.wait_ready()
        with server.client() as c:
            r = c.post("/admin/reload", json={"bundle": str(bundle.path)})
            assert r.status_code == 422 and INT8_GRAPH in r.text, r.text
            assert c.get("/readyz").json()["precision"] == "int8"
            r = c.post("/admin/reload", json={"bundle": str(trained["bundle"])})
            assert r.status_code == 200, r.text
            assert c.get("/readyz").json()["precision"] == "int8"
