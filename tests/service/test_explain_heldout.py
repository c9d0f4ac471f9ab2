"""The acceptance check, end to end: a model trained by `din train` and exported by `din export` (the
session's `trained`, tests/service/conftest.py, shared with test_end_to_end), held-out
(history, candidates) rows of its test split, `din score --explain` on them, and the same rows through
`din serve`'s `/rank` with `explain` (histories from Redis for half, explicit for the other half). Every
listed contribution and weight equals `din score --explain`'s at that position to 1e-5, `because` and
`against` are the largest positive and most negative contributions, and the scores equal `din score`'s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from cli import main as din
from model.data import load_prepared
from service.store.embedded import EmbeddedRedis
from tests.service.conftest import TRAINED_T, LiveServer, make_settings

pytestmark = pytest.mark.slow
TOL = 1e-5
T = TRAINED_T  # the prepared data's max_history: below the longest histories, so truncation is exercised


def heldout_rows(data_dir: Path, n: int = 12) -> list[dict]:
    """Rows of the test split: the user's history before the sample (newest first, all of it: the
    service and din score cut it to T), the sample's target and other candidates (one unknown)."""
    p = load_prepared(data_dir)
    rng = np.random.default_rng(0)
    rows, seen = [], set()
    for k in rng.permutation(len(p.test.user)):
        u, pos, target = int(p.test.user[k]), int(p.test.pos[k]), int(p.test.target[k])
        if (u, pos) in seen or pos == 0:
            continue
        seen.add((u, pos))
        off = int(p.seq_offsets[u])
        history = [p.items[i] for i in p.seq_items[off : off + pos][::-1]]
        others = [p.items[i] for i in rng.choice(np.arange(2, len(p.items)), size=9, replace=False)]
        candidates = list(dict.fromkeys([p.items[target], *others, "not-in-the-catalogue"]))
        rows.append({"history": history, "candidates": candidates})
        if len(rows) == n:
            break
    assert any(len(r["history"]) > T for r in rows), "no row exercises the truncation to T"
    return rows


def test_rank_explain_equals_din_score_explain_on_heldout_rows(
    trained: dict[str, Path], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    data_dir, run_dir, bundle = trained["data"], trained["run"], trained["bundle"]
    rows = heldout_rows(data_dir)
    inp, out = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert din(["score", str(run_dir), "--input", str(inp), "--output", str(out), "--explain"]) == 0
    offline = [json.loads(line) for line in out.read_text().splitlines()]

    client = redis.Redis.from_url(redis_server.url)
    for i, row in enumerate(rows[::2]):  # half of the rows read their history from Redis
        client.delete(f"din:hist:held-{2 * i}")
        client.rpush(f"din:hist:held-{2 * i}", *row["history"][:T])
    client.close()

    checked = 0
    with LiveServer(make_settings(bundle, redis_server.url)) as server, server.client() as c:
        server.wait_ready()
        for i, (row, ref) in enumerate(zip(rows, offline, strict=True)):
            body: dict = {
                "user_id": f"held-{i}",
                "candidates": row["candidates"],
                "explain": True,
                "explain_top": 8,
            }
            if i % 2:
                body["history"] = row["history"]
            resp = c.post("/rank", json=body)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            seen = row["history"][:T]
            assert answer["explained"] is True and answer["history_length"] == len(seen)
            index = {cand: j for j, cand in enumerate(row["candidates"])}
            for item in answer["items"]:
                j = index[item["item_id"]]
                weights = np.asarray(ref["attention"][j])
                contributions = np.asarray(ref["contribution"][j])
                assert len(weights) == len(contributions) == len(seen)
                assert abs(item["score"] - ref["scores"][j]) <= TOL
                because, against = item["because"], item["against"]
                for b in because + against:
                    assert b["item_id"] == seen[b["position"]]
                    assert abs(b["weight"] - weights[b["position"]]) <= TOL, (i, item["item_id"], b)
                    assert abs(b["contribution"] - contributions[b["position"]]) <= TOL, (
                        i,
                        item["item_id"],
                        b,
                    )
                    checked += 1
                # the extremes: the k largest positive and k most negative of din score's, in order
                up = np.sort(contributions[contributions > TOL])[::-1][:8]
                down = np.sort(contributions[contributions < -TOL])[:8]
                np.testing.assert_allclose(
                    [b["contribution"] for b in because][: len(up)], up, atol=TOL, rtol=0
                )
                np.testing.assert_allclose(
                    [b["contribution"] for b in against][: len(down)], down, atol=TOL, rtol=0
                )
                assert len(up) <= len(because) <= 8 and len(down) <= len(against) <= 8
    assert checked > 500
