"""The loop end to end on a small world (`din loop-demo --ab`'s own code path): a real redis-server, `din
serve --log-impressions` over HTTP, simulated users that click, a drift, `din log export`, `din train
--from-log --since --init`, an A/B test of the stale model against the retrained one (`din models
route`, `din report`, `din models promote`, `din models rollback`, each a child process), `din
promote`, and the same users again. What the users were shown is what the log holds, row for row (with
the arm that served it), each label is the click, the A/B arms, the promotion and the rollback show in
the answers, and the answers after the turn come from the new model version. One run (the module's
fixture) for all of it: a second world would double the serving and the retraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from demo.loop import (
    AB_PHASE,
    CONTROL,
    TREATMENT,
    LoopConfig,
    format_figures,
    format_table,
    run_loop,
    write_plot,
)
from demo.pipeline import Demo
from loop.simulate import load_world
from model.checkpoint import save_run
from model.din import DINConfig, build_model
from model.export import export
from model.synth import SynthParams, generate, load_truth

AB_S = 4.0  # 400 A/B answers at 100/s, one item shown each (the default --ab-top-k)
N_AB = 400


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo workdir holding what the loop reads: the world (raw/) and a served model (bundle/) whose
    manifest names the run it came from (run/, the warm start). The model is untrained: random weights."""
    root = tmp_path_factory.mktemp("demo")
    generate(root / "raw", SynthParams(users=40, items=240, categories=6, seed=5))
    t = load_truth(root / "raw")
    items = ["<pad>", "<oov>", *t.item_ids.tolist()]
    categories = ["<pad>", "<oov>", *t.category_names.tolist()]
    item_cate = torch.tensor([0, 1, *(t.item_cat + 2).tolist()], dtype=torch.int64)
    cfg = DINConfig(n_items=len(items), n_categories=len(categories), max_history=20)
    model = build_model(cfg, item_cate, seed=3)
    save_run(root / "run", model, items, categories, 20, 0, {}, {})
    export(root / "run", root / "bundle")
    return root


@pytest.fixture(scope="module")
def turn(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], LoopConfig]:
    out = tmp_path_factory.mktemp("loop") / "loop"
    cfg = LoopConfig(
        rate=100,
        before_s=2,
        after_s=8,
        again_s=2,
        candidates=20,
        top_k=5,
        epochs=3,
        window_s=1.0,
        seed=2,
        export_window_s=2.0,
        ab=True,
        ab_s=AB_S,
        checks=30,
    )
    result = run_loop(Demo(workdir), out, cfg, progress=False)
    return out, result, cfg


def _outcomes(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_one_turn_changes_the_served_version_to_the_retrained_child(
    workdir: Path, turn: tuple[Path, dict[str, Any], LoopConfig]
) -> None:
    out, result, cfg = turn
    parent = _manifest(workdir / "bundle")["model_version"]
    child = _manifest(out / "retrained" / "bundle")
    before, drifted, ab, after = result["phases"]
    assert ab["name"] == AB_PHASE
    assert [p["count"] for p in result["phases"]] == [200, 800, N_AB, 200]
    failed = [o for o in _outcomes(out) if o.get("error")]
    assert not failed, failed[:3]
    for p in result["phases"]:
        assert p["summary"]["errors"] == 0 and p["summary"]["requests"] == p["count"]
    assert before["model_version"] == drifted["model_version"] == parent
    # the child was trained on the drifted world's impressions and beat its random parent there
    assert result["promotion"]["promoted"], result["promotion"]
    assert after["model_version"] == child["model_version"] != parent
    lineage = child["lineage"]
    assert lineage["parent"]["model_version"] == parent
    assert lineage["data"]["since"] is not None and lineage["data"]["served_versions"] == [parent]
    assert sum(lineage["data"]["rows"].values()) == drifted["count"] * cfg.top_k  # the drift's rows only
    assert lineage["valid"]["new"]["auc"] > lineage["valid"]["parent"]["auc"]
    # the table and the plot say the same
    table = format_table(result)
    assert child["model_version"][:23] in table and "after one turn" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert write_plot(result, out / "again.png") and (out / "again.png").stat().st_size > 1000


def test_the_log_holds_what_each_user_was_shown_and_labels_their_clicks(
    workdir: Path, turn: tuple[Path, dict[str, Any], LoopConfig]
) -> None:
    out, _, cfg = turn
    parent = _manifest(workdir / "bundle")["model_version"]
    outcomes = _outcomes(out)
    assert [o["step"] for o in outcomes] == list(range(1200 + N_AB))
    exported = [o for o in outcomes if o["step"] < 1000 + N_AB]  # the phases exported before the turn
    rows = pq.read_table(sorted((out / "log").glob("hour=*/part-*.parquet"))).to_pylist()
    by_impression: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_impression.setdefault(row["impression_id"], []).append(row)
    assert len(by_impression) == len(exported)
    assert len(rows) == 1000 * cfg.top_k + N_AB * cfg.ab_top_k
    saved = json.loads((out / "loop.json").read_text())
    assert saved["phases"][0]["summary"]["clicks"] == sum(sum(o["clicked"]) for o in outcomes[:200])
    assert len({o["impression_id"] for o in exported}) == len(exported)  # one impression id per answer
    user_ids = load_world(workdir / "raw", users=None, drift_fraction=1.0, drift_seed=1).user_ids
    versions = {CONTROL: parent, TREATMENT: _manifest(out / "retrained" / "bundle")["model_version"]}
    for o in exported:
        logged = sorted(by_impression[o["impression_id"]], key=lambda r: r["position"])
        assert [r["item_id"] for r in logged] == o["shown"]
        assert [r["score"] for r in logged] == pytest.approx(o["scores"], abs=1e-6)
        assert [r["label"] for r in logged] == o["clicked"]
        assert {r["user_id"] for r in logged} == {user_ids[o["user"]]}
        if o["step"] < 1000:  # no routing in force: the service's own bundle, no arm
            assert {(r["model_version"], r["arm"]) for r in logged} == {(parent, None)}
        else:  # the A/B: each answer's arm and that arm's version
            (arm,) = {r["arm"] for r in logged}
            assert {r["model_version"] for r in logged} == {versions[arm]} and len(logged) == 1
    assert sum(r["label"] for r in rows) == sum(sum(o["clicked"]) for o in exported) > 0


def test_the_ab_test_serves_both_arms_then_promotes_and_rolls_back(
    workdir: Path, turn: tuple[Path, dict[str, Any], LoopConfig]
) -> None:
    """`din models route` half and half, `din report` on the A/B's impressions (only those: the log holds
    the phases before it), `din models promote treatment`: every next answer is the retrained version;
    `din models rollback`: the users are back in their A/B arms."""
    out, result, cfg = turn
    ab = result["ab"]
    parent = _manifest(workdir / "bundle")["model_version"]
    child = _manifest(out / "retrained" / "bundle")["model_version"]
    assert ab["versions"] == {CONTROL: parent, TREATMENT: child} and ab["salt"] == cfg.ab_salt
    # the A/B answers: both arms, each with its version, one routing revision throughout
    (revision,) = ab["routing_revisions"]
    arms = ab["arms"]
    assert set(arms) == {CONTROL, TREATMENT}
    assert sum(a["summary"]["requests"] for a in arms.values()) == N_AB
    assert all(a["summary"]["requests"] > N_AB // 5 and a["summary"]["errors"] == 0 for a in arms.values())
    checks = {c["check"]: c for c in ab["checks"]}
    assert len(checks) == 4 and all(c["ok"] for c in checks.values()), ab["checks"]
    promoted, rolled_back = ab["checks"][2]["answers"], ab["checks"][3]["answers"]
    assert len(promoted) == len(rolled_back) == min(cfg.checks, 40)  # 40 users in the small world
    assert {(a["arm"], a["model_version"], a["revision"]) for a in promoted} == {
        (TREATMENT, child, revision + 1)
    }
    assert {a["arm"] for a in rolled_back} == {CONTROL, TREATMENT}
    assert {a["revision"] for a in rolled_back} == {revision + 2}
    for a in rolled_back:
        assert a["model_version"] == ab["versions"][a["arm"]]
    # din report on the A/B's impressions only: a row per arm, the difference with its interval
    report = json.loads((out / "ab.json").read_text())
    assert report == ab["report"] and report["control"] == CONTROL and report["forced_excluded"] == 0
    by_arm = {a["arm"]: a for a in report["arms"]}
    assert set(by_arm) == {CONTROL, TREATMENT} and report["impressions"] == N_AB
    for name, a in by_arm.items():
        assert a["versions"] == [ab["versions"][name]]
        assert a["impressions"] == arms[name]["summary"]["requests"]
        assert a["clicks"] == arms[name]["summary"]["clicks"]  # one item shown: a clicked impression, a click
        assert a["ctr_low"] <= a["ctr"] <= a["ctr_high"]
    t, c = by_arm[TREATMENT], by_arm[CONTROL]
    assert t["diff"] == pytest.approx(t["ctr"] - c["ctr"])
    assert t["diff_low"] <= t["diff"] <= t["diff_high"] and 0 <= t["p_value"] <= 1
    assert c["diff"] is None  # the control row has no difference
    f = ab["figures"]
    assert f["diff"] == t["diff"] and f["diff_ci"] == [t["diff_low"], t["diff_high"]]
    assert f["treatment_ahead"] == (t["diff_low"] > 0)
    assert "difference treatment - control" in format_figures(f)
    table = format_table(result)
    assert "A/B control" in table and "A/B treatment" in table
    assert (out / "ab.png").stat().st_size > 1000 or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
