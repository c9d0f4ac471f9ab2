"""`din report` on exported logs written here with pyarrow (the exporter's schemas): a real CTR difference
has an interval that excludes zero and a small p-value, equal rates one that includes zero; AUC and GAUC
of a perfect scorer are 1 and of a reversed one 0; forced arms are left out and impressions without an arm
(files exported before arms existed included) count as `(none)`; a shadow identical to the served model
agrees with it fully; --json and --plot write their files; no rows is one line and a non-zero exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.errors import DataError, InvalidArgument
from loop.export import SCHEMA, SHADOW_DIR, SHADOW_SCHEMA
from loop.report import _taus, build_report, format_report, newcombe, two_proportion_p, wilson
from model.metrics import kendall_tau_b
from service.impressions import new_impression_id

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000 // 3600 * 3600  # the start of an hour
ITEMS = ["a", "b", "c"]


def _impressions(
    arm: str | None,
    n: int,
    clicked: int,
    *,
    seed: int = 0,
    scorer: str = "random",
    forced: bool = False,
    hours: int = 1,
    users: int = 500,
) -> list[dict[str, Any]]:
    """`n` impressions of ITEMS in arm `arm`, the first `clicked` of them with a click on one item. Scores:
    random, `perfect` (the clicked item highest) or `reversed` (lowest)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        ts = T0 + (k * hours * 3600) / n
        imp = new_impression_id(now_ms=int(ts * 1000))
        hit = int(rng.integers(len(ITEMS))) if k < clicked else -1
        user = f"u{int(rng.integers(users))}"
        scores = rng.uniform(0.2, 0.8, len(ITEMS))
        if scorer != "random" and hit >= 0:
            scores[hit] = 0.9 if scorer == "perfect" else 0.1
        order = np.argsort(-scores).tolist()
        for j, item in enumerate(ITEMS):
            rows.append(
                {
                    "impression_id": imp,
                    "ts": ts,
                    "user_id": user,
                    "item_id": item,
                    "category": None,
                    "position": order.index(j),
                    "score": float(scores[j]),
                    "label": int(j == hit),
                    "model_version": f"v-{arm}",
                    "degraded": None,
                    "history": [],
                    "history_categories": [],
                    "arm": arm,
                    "arm_forced": forced,
                }
            )
    return rows


def _write(out: Path, rows: list[dict[str, Any]], *, schema: pa.Schema = SCHEMA, sub: str = "") -> None:
    """One file per hour, as the exporter lays them out (`sub`: the shadow dataset's directory)."""
    by_hour: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_hour.setdefault(int(r["ts"]) // 3600, []).append(r)
    for hour, part in by_hour.items():
        name = f"hour={np.datetime64(hour * 3600, 's').astype(str)[:13]}"
        directory = out / sub / name if sub else out / name
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(part, schema=schema)
        n = len(list(directory.iterdir()))
        pq.write_table(table, directory / f"part-{part[0]['impression_id']}-{n}.parquet")


def _shadow(rows: list[dict[str, Any]], version: str, *, reverse: bool = False) -> list[dict[str, Any]]:
    """A shadow that scores exactly as the served model (or the reverse), ranking the logged items
    first among the request's candidates."""
    out = []
    for r in rows:
        score = 1 - r["score"] if reverse else r["score"]
        position = len(ITEMS) - 1 - r["position"] if reverse else r["position"]
        out.append(
            {
                "impression_id": r["impression_id"],
                "ts": r["ts"],
                "user_id": r["user_id"],
                "item_id": r["item_id"],
                "shadow_version": version,
                "shadow_score": score,
                "shadow_position": position,
            }
        )
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# ------------------------------------------------------------------ the statistics


def test_the_intervals_and_the_test_match_published_values() -> None:
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    low, high = newcombe(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    # Wilson: 81/263 (Newcombe 1998, the single-proportion companion paper): 0.2553 to 0.3662
    assert tuple(round(v, 4) for v in wilson(81, 263)) == (0.2553, 0.3662)
    assert math.isnan(wilson(0, 0)[0]) and wilson(0, 10)[0] == 0.0
    assert two_proportion_p(50, 100, 50, 100) == 1.0 and two_proportion_p(0, 10, 0, 10) == 1.0
    assert two_proportion_p(30, 100, 50, 100) == pytest.approx(0.00389, abs=2e-5)  # z = -2.887
    assert kendall_tau_b(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(1 / 3)
    assert kendall_tau_b(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == -1.0
    assert kendall_tau_b(np.array([1.0, 1, 2]), np.array([1.0, 2, 3])) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau_b(np.array([1.0, 1]), np.array([1.0, 2])))


def test_the_vectorised_taus_are_the_per_impression_ones() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 7, 300)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    x = rng.integers(0, 4, sizes.sum()).astype(float)  # many ties
    y = rng.integers(0, 4, sizes.sum()).astype(float)
    want = [kendall_tau_b(x[a : a + n], y[a : a + n]) for a, n in zip(starts, sizes, strict=True)]
    np.testing.assert_allclose(_taus(x, y, starts, sizes), want, equal_nan=True)


# ------------------------------------------------------------------ arms


def test_a_real_difference_has_an_interval_that_excludes_zero_and_a_small_p(tmp_path: Path) -> None:
    n = 20_000
    _write(tmp_path, _impressions("control", n, 2000, seed=1) + _impressions("new", n, 2600, seed=2))
    rep = build_report(tmp_path)
    control, new = rep.arms
    assert (control.arm, new.arm, rep.control) == ("control", "new", "control")
    assert (control.impressions, control.clicks, new.clicks) == (n, 2000, 2600)
    assert control.ctr == 0.10 and new.ctr == 0.13 and control.ctr_low < 0.10 < control.ctr_high
    assert new.diff == pytest.approx(0.03) and 0 < new.diff_low < 0.03 < new.diff_high
    assert new.p_value < 1e-15 and math.isnan(control.diff)
    assert new.item_ctr == pytest.approx(2600 / (3 * n)) and new.versions == ["v-new"]
    assert 0.45 < new.auc < 0.55  # random scores
    assert "diff vs control" in format_report(rep)


def test_equal_rates_have_an_interval_that_includes_zero(tmp_path: Path) -> None:
    _write(tmp_path, _impressions("a", 20_000, 2000, seed=1) + _impressions("b", 20_000, 2000, seed=2))
    rep = build_report(tmp_path, control="b")
    treated = next(a for a in rep.arms if a.arm == "a")
    assert rep.arms[0].arm == "b" and treated.diff_low < 0 < treated.diff_high and treated.p_value == 1.0


def test_the_control_defaults_to_the_largest_arm_and_must_exist(tmp_path: Path) -> None:
    _write(tmp_path, _impressions("a", 100, 10, seed=1) + _impressions("b", 300, 10, seed=2))
    assert build_report(tmp_path).control == "b"
    with pytest.raises(InvalidArgument, match="names no arm"):
        build_report(tmp_path, control="zz")


def test_auc_and_gauc_of_a_perfect_scorer_are_1_and_of_a_reversed_one_0(tmp_path: Path) -> None:
    rows = _impressions("good", 400, 200, scorer="perfect", seed=1, users=20)
    rows += _impressions("bad", 400, 200, scorer="reversed", seed=2, users=20)
    _write(tmp_path, rows)
    arms = {a.arm: a for a in build_report(tmp_path).arms}
    assert arms["good"].auc == 1.0 and arms["good"].gauc == 1.0
    assert arms["bad"].auc == 0.0 and arms["bad"].gauc == 0.0


def test_forced_arms_are_left_out_and_no_arm_counts_as_none(tmp_path: Path) -> None:
    rows = _impressions("control", 100, 10, seed=1) + _impressions("control", 50, 50, seed=2, forced=True)
    rows += _impressions(None, 30, 3, seed=3)
    _write(tmp_path, rows)
    # a file exported before arms existed: no arm columns at all
    old = pa.Table.from_pylist(_impressions(None, 20, 2, seed=4), schema=SCHEMA).drop_columns(
        ["arm", "arm_forced"]
    )
    pq.write_table(old, next(tmp_path.glob("hour=*")) / "part-old.parquet")
    rep = build_report(tmp_path)
    arms = {a.arm: a for a in rep.arms}
    assert set(arms) == {"control", "(none)"} and rep.forced_excluded == 50
    assert (arms["control"].impressions, arms["control"].clicks) == (100, 10)
    assert (arms["(none)"].impressions, arms["(none)"].clicks) == (50, 5)
    assert rep.impressions == 150


def test_since_and_until_select_impressions_by_time(tmp_path: Path) -> None:
    _write(tmp_path, _impressions("control", 300, 30, seed=1, hours=3))
    rep = build_report(tmp_path)
    assert [h.hour for h in rep.hours] == ["2023-11-14T22", "2023-11-14T23", "2023-11-15T00"]
    from loop.report import Window

    one = build_report(tmp_path, window=Window(T0 + 3600, T0 + 7200))
    assert one.impressions == 100 and len(one.hours) == 1
    with pytest.raises(DataError, match="between --since and --until"):
        build_report(tmp_path, window=Window(T0 + 10 * 3600, None))


# ------------------------------------------------------------------ shadows


def test_a_shadow_identical_to_the_served_model_agrees_fully(tmp_path: Path) -> None:
    rows = _impressions("control", 300, 100, seed=1)
    _write(tmp_path, rows)
    _write(tmp_path, _shadow(rows, "same"), schema=SHADOW_SCHEMA, sub=SHADOW_DIR)
    _write(tmp_path, _shadow(rows, "upside-down", reverse=True), schema=SHADOW_SCHEMA, sub=SHADOW_DIR)
    rep = build_report(tmp_path)
    same, flipped = sorted(rep.shadows, key=lambda s: s.version != "same")
    assert (same.version, same.impressions, same.rows) == ("same", 300, 900)
    assert same.tau_b == 1.0 and same.overlap == 1.0 and same.tau_impressions == 300
    assert same.shadow_auc == same.served_auc and same.both_rows == 900 and same.both_clicks == 100
    assert flipped.tau_b == -1.0 and flipped.overlap == 1.0  # k = every logged item: all are shown
    top1 = build_report(tmp_path, top_k=1)
    same1, flipped1 = sorted(top1.shadows, key=lambda s: s.version != "same")
    assert same1.overlap == 1.0 and flipped1.overlap == 0.0
    assert same1.both_rows == 300 and flipped1.both_rows == 0 and math.isnan(flipped1.shadow_auc)
    assert "Kendall tau-b" in format_report(rep)


# ------------------------------------------------------------------ the command


def test_the_command_prints_the_table_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    log = tmp_path / "log"
    rows = _impressions("control", 600, 60, seed=1, hours=2) + _impressions("new", 600, 90, seed=2, hours=2)
    _write(log, rows)
    _write(log, _shadow(rows[:300], "v9"), schema=SHADOW_SCHEMA, sub=SHADOW_DIR)
    proc = _cli("--log", str(log), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    assert "control" in proc.stdout and "new" in proc.stdout and "v9" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert [a["arm"] for a in data["arms"]] == ["control", "new"] and data["arms"][0]["diff"] is None
    assert data["arms"][1]["clicks"] == 90 and data["shadows"][0]["version"] == "v9"
    assert len(data["hours"]) == 4
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make", ["empty", "missing", "not-parquet"])
def test_no_exported_rows_is_one_line_and_a_non_zero_exit(tmp_path: Path, make: str) -> None:
    log = tmp_path / "log"
    if make != "missing":
        log.mkdir()
    if make == "not-parquet":
        (log / "hour=2026-01-01T00").mkdir()
        (log / "hour=2026-01-01T00" / "part-x.parquet").write_text("not parquet")
    proc = _cli("--log", str(log))
    assert proc.returncode == 1 and proc.stderr.startswith("din report:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    _write(tmp_path, _impressions("control", 10, 1))
    proc = _cli("--log", str(tmp_path), "--control", "nope")
    assert proc.returncode == 2 and "names no arm" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("--log", str(tmp_path), "--top-k", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
