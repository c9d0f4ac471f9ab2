"""The whole chain, as a user runs it: din prepare -> din train -> din export -> din seed -> /rank,
checked against din score on the held-out pairs (same scores to 1e-5, same AUC)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.data import load_prepared
from model.metrics import auc
from model.synth import SynthParams, generate
from tests.service.conftest import LiveServer, make_settings

T = 20  # below the longest histories, so truncation in seed, score and serving is exercised


def din(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"din {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


pytestmark = pytest.mark.slow  # trains a model: a minute on 2 cores


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    raw, data, run, bundle = root / "raw", root / "data", root / "run", root / "bundle"
    generate(raw, SynthParams(users=120, items=150, categories=5, events_per_user=15.0, seed=3))
    din("prepare", "--reviews", str(raw / "reviews.json.gz"), "--meta", str(raw / "meta.json.gz"),
        "--out", str(data), "--max-history", str(T), "--no-progress")  # fmt: skip
    din("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--no-progress")
    din("export", str(run), "--out", str(bundle))
    return {"root": root, "data": data, "run": run, "bundle": bundle}


def test_served_scores_equal_din_score_on_held_out_pairs(trained: dict[str, Path], redis_url: str) -> None:
    root, prep = trained["root"], load_prepared(trained["data"])
    items = np.asarray(prep.items)

    # What the service will know: every user's behaviours except the held-out last one.
    held_out = root / "reviews_without_last.json.gz"
    histories: dict[str, list[str]] = {}  # newest first, complete
    with gzip.open(held_out, "wt") as f:
        for u, user in enumerate(prep.users):
            seq = items[prep.seq_items[prep.seq_offsets[u] : prep.seq_offsets[u + 1]]][:-1]
            for k, item in enumerate(seq):
                f.write(
                    json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": 1_600_000_000 + k}) + "\n"
                )
            histories[user] = list(seq[::-1])
    din(
        "seed", "--reviews", str(held_out), "--redis-url", redis_url, "--max-history", str(T), "--no-progress"
    )

    # The held-out pairs: each user's last positive and its sampled negative.
    test = prep.test
    pairs: dict[str, dict[str, float]] = defaultdict(dict)
    for u, target, label in zip(test.user, test.target, test.label, strict=True):
        pairs[prep.users[u]][str(items[target])] = float(label)
    users = sorted(pairs)
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"history": histories[u], "candidates": list(pairs[u])}) + "\n" for u in users)
    )
    din("score", str(trained["run"]), "--input", str(rows), "--output", str(root / "scores.jsonl"))
    offline = [json.loads(line)["scores"] for line in (root / "scores.jsonl").read_text().splitlines()]

    labels, served, reference = [], [], []
    with LiveServer(make_settings(trained["bundle"], redis_url)) as server, server.client() as client:
        server.wait_ready()
        for user, ref in zip(users, offline, strict=True):
            cands = list(pairs[user])
            resp = client.post("/rank", json={"user_id": user, "candidates": cands})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["history_length"] == min(len(histories[user]), T)
            assert body["degraded"] is False
            got = {i["item_id"]: i["score"] for i in body["items"]}
            for cand, want in zip(cands, ref, strict=True):
                assert abs(got[cand] - want) <= 1e-5, (user, cand, got[cand], want)
                labels.append(pairs[user][cand])
                served.append(got[cand])
                reference.append(want)

    run_metrics = json.loads((trained["run"] / "metrics.json").read_text())
    served_auc, reference_auc = (
        auc(np.array(labels), np.array(served)),
        auc(np.array(labels), np.array(reference)),
    )
    assert served_auc == pytest.approx(reference_auc, abs=1e-9)
    assert reference_auc == pytest.approx(
        run_metrics["test"]["auc"], abs=1e-3
    )  # din score = din train's test
    assert served_auc > 0.6  # two epochs on the trigger-driven synth data learn something
