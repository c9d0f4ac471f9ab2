"""The whole chain, as a user runs it: din prepare -> din train -> din export -> din seed -> /rank,
checked against din score on the held-out pairs (same scores to 1e-5, same AUC)."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.data import load_prepared
from model.metrics import auc
from tests.service.conftest import TRAINED_T, LiveServer, din_cli, make_settings

T = TRAINED_T  # below the longest histories, so truncation in seed, score and serving is exercised

pytestmark = pytest.mark.slow  # trains a model (the session's `trained`): a minute on 2 cores


def test_served_scores_equal_din_score_on_held_out_pairs(
    trained: dict[str, Path], redis_url: str, tmp_path: Path
) -> None:
    root, prep = tmp_path, load_prepared(trained["data"])
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
    din_cli(
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
    din_cli("score", str(trained["run"]), "--input", str(rows), "--output", str(root / "scores.jsonl"))
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
