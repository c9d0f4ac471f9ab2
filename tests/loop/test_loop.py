"""The loop end to end on a small world (`din loop-demo`'s own code path): a real redis-server, `din
serve --log-impressions` over HTTP, simulated users that click, a drift, `din log export`, `din train
--from-log --since --init`, `din promote`, and the same users again. What the users were shown is what
the log holds, row for row, each label is the click, and the answers after the turn come from the new
model version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from demo.loop import LoopConfig, format_table, run_loop, write_plot
from demo.pipeline import Demo
from loop.simulate import load_world
from model.checkpoint import save_run
from model.din import DINConfig, build_model
from model.export import export
from model.synth import SynthParams, generate, load_truth


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
    )
    result = run_loop(Demo(workdir), out, cfg, progress=False)
    return out, result, cfg


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_one_turn_changes_the_served_version_to_the_retrained_child(
    workdir: Path, turn: tuple[Path, dict[str, Any], LoopConfig]
) -> None:
    out, result, cfg = turn
    parent = _manifest(workdir / "bundle")["model_version"]
    child = _manifest(out / "retrained" / "bundle")
    before, drifted, after = result["phases"]
    assert [p["count"] for p in result["phases"]] == [200, 800, 200]
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
    outcomes = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    assert [o["step"] for o in outcomes] == list(range(1200))
    exported = [o for o in outcomes if o["step"] < 1000]  # the two phases exported before the turn
    rows = pq.read_table(sorted((out / "log").glob("hour=*/part-*.parquet"))).to_pylist()
    by_impression: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_impression.setdefault(row["impression_id"], []).append(row)
    assert len(by_impression) == len(exported) and len(rows) == len(exported) * cfg.top_k
    saved = json.loads((out / "loop.json").read_text())
    assert saved["phases"][0]["summary"]["clicks"] == sum(sum(o["clicked"]) for o in outcomes[:200])
    assert len({o["impression_id"] for o in exported}) == len(exported)  # one impression id per answer
    user_ids = load_world(workdir / "raw", users=None, drift_fraction=1.0, drift_seed=1).user_ids
    for o in exported:
        logged = sorted(by_impression[o["impression_id"]], key=lambda r: r["position"])
        assert [r["item_id"] for r in logged] == o["shown"]
        assert [r["score"] for r in logged] == pytest.approx(o["scores"], abs=1e-6)
        assert [r["label"] for r in logged] == o["clicked"]
        assert {r["model_version"] for r in logged} == {parent}
        assert {r["user_id"] for r in logged} == {user_ids[o["user"]]}
    assert sum(r["label"] for r in rows) == sum(sum(o["clicked"]) for o in exported) > 0
