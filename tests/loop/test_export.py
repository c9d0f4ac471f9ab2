"""`din log export` against real redis-server processes: the rows are what was served, the labels the
clicks within the window; impressions inside their window wait for a later run; a run killed between
writing a file and acknowledging it, then run again, gives every impression exactly once; feedback that
labels nothing is counted, never an error; bad arguments are one line and exit 2. Impression rows carry
their arm; shadow scores become rows of the `_shadow` dataset, exactly once, and never training rows."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pytest

from contracts.records import Candidate, Feedback, Impression, ShadowScores
from loop.export import SHADOW_DIR, ExportOptions, export_log
from service.impressions import new_impression_id
from service.store.keys import feedback_key, impressions_key
from service.store.streams import FIELD
from tests.loop.helpers import client as _client
from tests.loop.helpers import export as _export
from tests.loop.helpers import log_records as _log
from tests.service.conftest import BundleInfo, LiveServer, make_settings, seed_histories
from tests.service.conftest import bundle as bundle  # the fixture

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = ["i2", "i3", "i4", "i5", "i6", "i7"]


def _rows(out: Path) -> list[dict[str, Any]]:
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["impression_id"], r["item_id"]))


def _shadow_rows(out: Path) -> list[dict[str, Any]]:
    table = ds.dataset(out / SHADOW_DIR, format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["impression_id"], r["shadow_version"], r["item_id"]))


def _shadow(imp: Impression, version: str) -> ShadowScores:
    """A shadow version's scores of `imp`'s items (the reverse of the served order)."""
    n = len(imp.candidates)
    return ShadowScores(
        imp.impression_id,
        imp.ts,
        imp.user_id,
        version,
        [c.item_id for c in imp.candidates],
        [c.score / 2 for c in imp.candidates],
        [n - 1 - (c.position or 0) for c in imp.candidates],
    )


def _log_shadows(url: str, shadows: list[ShadowScores]) -> None:
    r = _client(url)
    for rec in shadows:
        r.xadd(impressions_key("din:"), {FIELD: orjson.dumps(rec.to_dict())})
    r.close()


def _impression(ts: float, user: str, items: list[str], k: int = 0) -> Impression:
    return Impression(
        impression_id=new_impression_id(now_ms=int(ts * 1000)),
        ts=ts,
        user_id=user,
        model_version="v1",
        history=["i9", "i8"],
        history_categories=["c3", None],
        candidates=[Candidate(i, f"c{j}", 0.5 - j / 100, j) for j, i in enumerate(items)],
        degraded=None,
    )


def test_end_to_end_rows_are_what_was_served_and_labels_the_clicks(
    bundle: BundleInfo, redis_url: str, tmp_path: Path
) -> None:
    seed_histories(redis_url, {"u0": ["i10", "i11"], "u1": ["i12"]})
    answers = []
    with LiveServer(make_settings(bundle.path, redis_url, log_impressions=True)) as server:
        server.wait_ready()
        with server.client() as c:
            for k in range(9):
                resp = c.post("/rank", json={"user_id": f"u{k % 3}", "candidates": CANDIDATES, "top_k": 4})
                assert resp.status_code == 200, resp.text
                answers.append(resp.json())
            clicked = [(a, a["items"][k % 2]["item_id"]) for k, a in enumerate(answers[:5])]
            clicks = {(a["impression_id"], item) for a, item in clicked}
            events = [
                {"user_id": a["user_id"], "item_id": item, "impression_id": a["impression_id"]}
                for a, item in clicked
            ]
            assert c.post("/events", json={"events": events}).status_code == 200
        r = _client(redis_url)
        deadline = time.monotonic() + 15
        while r.xlen(impressions_key("din:")) < 9 or r.xlen(feedback_key("din:")) < len(clicks):
            assert time.monotonic() < deadline, "the log was not written"
            time.sleep(0.02)
        r.close()
    stats = _export(redis_url, tmp_path / "out", now=time.time() + 10)
    rows = _rows(tmp_path / "out")
    served = {(a["impression_id"], it["item_id"]): (a, it) for a in answers for it in a["items"]}
    assert len(rows) == len(served) == 9 * 4 == stats.rows
    assert stats.impressions == 9 and stats.positives == len(clicks) == stats.clicks
    for row in rows:
        answer, item = served[(row["impression_id"], row["item_id"])]
        assert row["user_id"] == answer["user_id"] and row["model_version"] == answer["model_version"]
        assert row["score"] == pytest.approx(item["score"], abs=1e-6)
        assert row["position"] == answer["items"].index(item)
        assert row["label"] == int((row["impression_id"], row["item_id"]) in clicks)
        assert row["degraded"] is None and row["category"] is not None
        assert row["hour"] == time.strftime("%Y-%m-%dT%H", time.gmtime(row["ts"]))
    u0 = next(row for row in rows if row["user_id"] == "u0")
    assert u0["history"] == ["i10", "i11"] and len(u0["history_categories"]) == 2
    assert _export(redis_url, tmp_path / "out", now=time.time() + 10).impressions == 0  # all acknowledged


def test_impressions_inside_their_window_wait_for_a_later_run(redis_url: str, tmp_path: Path) -> None:
    now = time.time()
    old = [_impression(now - 100, "u", ["a", "b"]) for _ in range(3)]
    young = [_impression(now - 1, "u", ["a", "b"]) for _ in range(2)]
    _log(redis_url, [*old, *young])
    first = _export(redis_url, tmp_path, now=now, window_s=30)
    assert (first.impressions, first.waiting, first.rows) == (3, 2, 6)
    again = _export(redis_url, tmp_path, now=now + 10, window_s=30)  # still young: pending, not re-exported
    assert (again.impressions, again.waiting, again.already_exported) == (0, 2, 0)
    later = _export(redis_url, tmp_path, now=now + 60, window_s=30)
    assert (later.impressions, later.waiting) == (2, 0)
    ids = [r["impression_id"] for r in _rows(tmp_path)]
    assert sorted(set(ids)) == sorted(i.impression_id for i in [*old, *young]) and len(ids) == 10


def test_rows_are_partitioned_by_the_hour_of_their_impression(redis_url: str, tmp_path: Path) -> None:
    hour = 1_700_000_000 // 3600 * 3600
    imps = [_impression(hour - 10, "u", ["a"]), _impression(hour + 10, "u", ["a"])]
    _log(redis_url, imps)
    assert _export(redis_url, tmp_path, now=hour + 1000).files == 2
    parts = sorted(p.relative_to(tmp_path).parent.name for p in tmp_path.glob("hour=*/part-*.parquet"))
    assert parts == ["hour=2023-11-14T21", "hour=2023-11-14T22"]


def test_feedback_that_labels_nothing_is_counted_never_an_error(redis_url: str, tmp_path: Path) -> None:
    now = time.time()
    imp = _impression(now - 100, "alice", ["a", "b", "c"])
    fb = [
        Feedback(imp.impression_id, imp.ts + 1, "alice", "a", None, None),  # a click
        Feedback(imp.impression_id, imp.ts + 2, "alice", "a", None, None),  # the same item again
        Feedback(imp.impression_id, imp.ts + 3, "bob", "b", None, None),  # another user
        Feedback(imp.impression_id, imp.ts + 4, "alice", "zz", None, None),  # not shown
        Feedback(imp.impression_id, imp.ts + 50, "alice", "c", None, None),  # after the 30 s window
        Feedback(new_impression_id(now_ms=int((now - 90) * 1000)), now - 80, "alice", "a", None, None),
        Feedback("not-an-impression-id", now - 80, "alice", "a", None, None),
    ]
    _log(redis_url, [imp, *fb])
    r = _client(redis_url)
    r.xadd(feedback_key("din:"), {FIELD: b"{not json"})
    r.close()
    stats = _export(redis_url, tmp_path, now=now, window_s=30)
    assert (stats.impressions, stats.rows, stats.positives, stats.clicks) == (1, 3, 1, 2)
    assert (stats.wrong_user, stats.not_shown, stats.late, stats.orphan) == (1, 1, 1, 3)
    assert [r["label"] for r in _rows(tmp_path)] == [1, 0, 0]
    # a later run counts nothing twice; a click arriving now on the exported impression is late
    _log(redis_url, [Feedback(imp.impression_id, now + 5, "alice", "b", None, None)])
    later = _export(redis_url, tmp_path, now=now + 10, window_s=30)
    assert (later.late, later.orphan, later.wrong_user, later.clicks) == (1, 0, 0, 0)


def test_a_crash_between_write_and_acknowledge_then_a_rerun_gives_each_impression_once(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    imps = [_impression(now - 100 + k / 10, f"u{k % 4}", ["a", "b"]) for k in range(20)]
    _log(redis_url, imps)

    class Crash(Exception):
        pass

    def crash(path: Path) -> None:
        raise Crash(path)

    r = _client(redis_url)
    with pytest.raises(Crash):
        export_log(r, tmp_path, ExportOptions(window_s=5, batch=6), now=lambda: now, after_write=crash)
    # renamed into place, never acknowledged: pending
    assert len(list(tmp_path.glob("hour=*/part-*.parquet"))) == 1
    assert r.xpending(impressions_key("din:"), "din-export")["pending"] == 6
    r.close()
    stats = _export(redis_url, tmp_path, now=now)
    assert (stats.already_exported, stats.impressions) == (6, 14)
    ids = [row["impression_id"] for row in _rows(tmp_path)]
    assert len(ids) == 40 and sorted(set(ids)) == sorted(i.impression_id for i in imps)


def test_killed_with_sigkill_mid_run_then_rerun_gives_each_impression_exactly_once(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    imps = [_impression(now - 100 + k / 10, f"u{k % 4}", ["a", "b", "c"]) for k in range(50)]
    _log(redis_url, imps)
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        import redis
        from loop.export import ExportOptions, export_log
        written = []
        def kill(path):
            written.append(path)
            if len(written) == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # the file is in place, its entries not acknowledged
        r = redis.Redis.from_url({redis_url!r}, decode_responses=True)
        opts = ExportOptions(window_s=5, batch=7)
        export_log(r, Path({str(out)!r}), opts, now=lambda: {now!r}, after_write=kill)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr
    assert len(list(out.glob("hour=*/part-*.parquet"))) == 3
    stats = _export(redis_url, out, now=now)
    assert stats.already_exported == 7 and stats.impressions == 50 - 21
    ids = [r["impression_id"] for r in _rows(out)]
    assert len(ids) == 50 * 3 and sorted(set(ids)) == sorted(i.impression_id for i in imps)
    r = _client(redis_url)
    assert r.xpending(impressions_key("din:"), "din-export")["pending"] == 0
    r.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "log", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_command_exports_and_prints_its_summary(redis_url: str, tmp_path: Path) -> None:
    now = time.time()
    _log(redis_url, [_impression(now - 5, "u", ["a", "b"]), _impression(now + 60, "u", ["a"])])
    proc = _cli("--out", str(tmp_path), "--redis-url", redis_url, "--window-s", "1")
    assert proc.returncode == 0, proc.stderr
    assert "impressions exported" in proc.stdout and "still waiting for the window" in proc.stdout
    assert len(_rows(tmp_path)) == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--window-s", "-1"],
        ["--batch", "0"],
        ["--group", ""],
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], tmp_path: Path, redis_url: str) -> None:
    proc = _cli("--out", str(tmp_path), "--redis-url", redis_url, *args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("din log export:")


def test_an_output_that_is_a_file_is_refused(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "f").write_text("")
    proc = _cli("--out", str(tmp_path / "f"), "--redis-url", redis_url)
    assert proc.returncode == 2 and "not a directory" in proc.stderr and proc.stderr.count("\n") == 1


def test_arms_and_shadow_scores_are_exported_each_once_and_never_as_training_rows(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    arms = [("control", False), ("treatment", False), ("treatment", True)]
    imps = [
        dataclasses.replace(_impression(now - 100 + k, f"u{k}", ["a", "b", "c"]), arm=arm, arm_forced=forced)
        for k, (arm, forced) in enumerate(arms)
    ]
    young = _impression(now - 1, "u9", ["a", "b"])  # inside the window: waits; its shadow does not
    shadows = [_shadow(i, "v2") for i in [*imps, young]] + [_shadow(imps[0], "v3")]
    _log(redis_url, [*imps, young])
    old = _impression(now - 90, "old", ["a"]).to_dict()
    del old["arm"], old["arm_forced"]  # logged by a service from before the arms issue
    r = _client(redis_url)
    r.xadd(impressions_key("din:"), {FIELD: orjson.dumps(old)})
    r.xadd(impressions_key("din:"), {FIELD: b'{"type": "shadow", "impression_id": "x"}'})  # malformed
    r.close()
    _log_shadows(redis_url, shadows)
    stats = _export(redis_url, tmp_path, now=now, window_s=30)
    assert (stats.impressions, stats.rows, stats.waiting, stats.malformed) == (4, 10, 1, 1)
    assert (stats.shadow_records, stats.shadow_rows) == (5, 3 * 3 + 2 + 3)
    assert "shadow scores exported" in stats.table()
    rows = _rows(tmp_path)  # the impressions' dataset: no shadow rows in it
    assert len(rows) == 10
    got = {r["impression_id"]: (r["arm"], r["arm_forced"]) for r in rows}
    served = {i.impression_id: (i.arm, i.arm_forced) for i in imps}
    assert got == {**served, old["impression_id"]: (None, False)}
    want = sorted(
        (s.impression_id, s.model_version, item, score, pos)
        for s in shadows
        for item, score, pos in zip(s.items, s.scores, s.positions, strict=True)
    )
    exported = [
        (r["impression_id"], r["shadow_version"], r["item_id"], r["shadow_score"], r["shadow_position"])
        for r in _shadow_rows(tmp_path)
    ]
    assert exported == want
    one = next(r for r in _shadow_rows(tmp_path) if r["impression_id"] == imps[0].impression_id)
    assert one["user_id"] == "u0" and one["ts"] == imps[0].ts and one["hour"] == rows[0]["hour"]
    again = _export(redis_url, tmp_path, now=now + 60, window_s=30)  # the young impression, nothing twice
    assert (again.impressions, again.shadow_records, again.already_exported) == (1, 0, 0)
    assert len(_shadow_rows(tmp_path)) == len(want) and len(_rows(tmp_path)) == 12

    from loop.retrain import read_log  # what `din train --from-log` reads: impression rows only

    assert read_log(tmp_path).num_rows == 12


def test_a_crash_before_shadow_rows_are_acknowledged_then_a_rerun_writes_them_once(
    redis_url: str, tmp_path: Path
) -> None:
    now = time.time()
    imps = [_impression(now - 100 + k / 10, f"u{k % 4}", ["a", "b"]) for k in range(8)]
    _log_shadows(redis_url, [_shadow(i, "v2") for i in imps])

    class Crash(Exception):
        pass

    def crash(path: Path) -> None:
        raise Crash(path)

    r = _client(redis_url)
    with pytest.raises(Crash):
        export_log(r, tmp_path, ExportOptions(window_s=5, batch=3), now=lambda: now, after_write=crash)
    assert len(list((tmp_path / SHADOW_DIR).glob("hour=*/part-*.parquet"))) == 1
    assert r.xpending(impressions_key("din:"), "din-export")["pending"] == 3
    r.close()
    stats = _export(redis_url, tmp_path, now=now)
    assert (stats.shadow_already_exported, stats.shadow_records) == (3, 5)
    rows = _shadow_rows(tmp_path)
    assert len(rows) == 16 and {r["impression_id"] for r in rows} == {i.impression_id for i in imps}
