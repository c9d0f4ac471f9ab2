"""`din train --from-log` and `din promote` on a log written as the service writes it and exported by the
real exporter: the time split leaks nothing, a warm start starts from the parent's weights, the lineage
is right, and a live service is reloaded only with a model no worse than its parent, and rolled back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import redis
import torch

from cli import main as din
from contracts.records import Candidate, Feedback, Impression
from loop.retrain import read_log, retrain, split_by_time
from model.checkpoint import load_run, save_run
from model.din import DINConfig, build_model
from model.export import export
from model.train import TrainConfig
from service.impressions import new_impression_id
from tests.loop.helpers import export as export_log
from tests.loop.helpers import log_records
from tests.service.conftest import LiveServer, make_settings

HOUR0 = 1_700_000_000 // 3600 * 3600  # 2023-11-14T22:00Z: the log covers HOUR0 .. HOUR0 + 3h
N_ITEMS, N_CATE = 42, 6  # items i2..i41, categories c2..c5 (item k is in c{2 + k % 4})
KEY = "promote-key"


def _category(k: int) -> str:
    return f"c{2 + k % 4}"


def _world(hours: int, per_hour: int, seed: int = 0) -> list[Impression | Feedback]:
    """Users who like one category: a history from it, a click on a shown item of it (p 0.6), rarely
    on another (p 0.05). Impressions spread over `hours` clock hours from HOUR0."""
    rng = np.random.default_rng(seed)
    records: list[Impression | Feedback] = []
    for n in range(hours * per_hour):
        ts = HOUR0 + n * (3600 / per_hour) + 1.0
        user = int(rng.integers(30))
        liked = [k for k in range(2, N_ITEMS) if k % 4 == user % 4]
        history = [int(k) for k in rng.choice(liked, size=5, replace=False)]
        shown = [int(k) for k in rng.choice(np.arange(2, N_ITEMS), size=6, replace=False)]
        imp = Impression(
            impression_id=new_impression_id(now_ms=int(ts * 1000)),
            ts=ts,
            user_id=f"u{user}",
            model_version="served-v",
            history=[f"i{k}" for k in history],
            history_categories=[_category(k) for k in history],
            candidates=[Candidate(f"i{k}", _category(k), 0.5, j) for j, k in enumerate(shown)],
            degraded=None,
        )
        records.append(imp)
        for k in shown:
            if rng.random() < (0.6 if k % 4 == user % 4 else 0.05):
                records.append(Feedback(imp.impression_id, ts + 5, imp.user_id, f"i{k}", None, None))
    return records


def _export_world(url: str, out: Path, hours: int, per_hour: int) -> Path:
    redis.Redis.from_url(url).flushall()
    log_records(url, _world(hours, per_hour))
    stats = export_log(url, out, now=HOUR0 + hours * 3600 + 600, window_s=60)
    assert stats.impressions == hours * per_hour and stats.waiting == 0
    return out


@pytest.fixture(scope="module")
def log_dir(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_world(redis_server.url, tmp_path_factory.mktemp("log"), hours=3, per_hour=200)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random DIN over the world's vocabulary, trained by no one, exported by `din export`."""
    root = tmp_path_factory.mktemp("parent")
    items = ["<pad>", "<oov>", *(f"i{k}" for k in range(2, N_ITEMS))]
    categories = ["<pad>", "<oov>", *(f"c{k}" for k in range(2, N_CATE))]
    item_cate = torch.tensor([0, 1, *(2 + k % 4 for k in range(2, N_ITEMS))])
    model = build_model(DINConfig(n_items=N_ITEMS, n_categories=N_CATE, max_history=20), item_cate, seed=3)
    save_run(root / "run", model, items, categories, 20, 0, {}, {})
    export(root / "run", root / "bundle")
    return root / "bundle"


def _cfg(epochs: int, **kw: Any) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, threads=1, seed=1, **kw)


@pytest.fixture(scope="module")
def trained(log_dir: Path, parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    retrain(log_dir, out, _cfg(4), init=parent, progress=False, verbose=False)
    return out / "bundle"


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the split


def test_the_time_split_leaks_nothing(log_dir: Path) -> None:
    table = read_log(log_dir)
    ts = table["ts"].to_numpy()
    split = split_by_time(ts)
    last_hour = HOUR0 + 2 * 3600
    assert split.boundary == last_hour and split.hours == 3
    assert ts[split.train].max() < ts[split.valid].min()  # every training row precedes every validation row
    assert (ts[split.valid] >= last_hour).all() and not (ts[split.train] >= last_hour).any()
    assert sorted([*split.train, *split.valid]) == list(range(len(ts)))
    # the partitions agree: the validation rows are exactly those of the newest hour=... directory
    newest = sorted(log_dir.glob("hour=*"))[-1]
    assert len(split.valid) == ds.dataset(newest, format="parquet").count_rows()


def test_the_last_seconds_split_and_since_leak_nothing(log_dir: Path, parent: Path, tmp_path: Path) -> None:
    ts = read_log(log_dir)["ts"].to_numpy()
    split = split_by_time(ts, valid_seconds=600.0)
    assert split.boundary == ts.max() - 600.0
    assert ts[split.train].max() < split.boundary <= ts[split.valid].min()
    assert len(split.valid) == int((ts >= ts.max() - 600.0).sum()) and len(split.train) + len(
        split.valid
    ) == len(ts)
    # --since drops the older rows before the split: the child trains on the last two hours only
    since = HOUR0 + 3600
    lineage = retrain(
        log_dir,
        tmp_path / "run",
        _cfg(0),
        init=parent,
        since=since,
        valid_seconds=600.0,
        progress=False,
        verbose=False,
    )
    data = lineage["data"]
    assert data["since"] == "2023-11-14T23:00:00+00:00" and data["from"] >= data["since"]
    assert data["rows"] == {
        "train": int(((ts >= since) & (ts < ts.max() - 600.0)).sum()),
        "valid": int((ts >= ts.max() - 600.0).sum()),
    }


def test_a_log_of_one_hour_is_refused_in_one_line(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _export_world(redis_url, tmp_path / "log", hours=1, per_hour=20)
    assert din(["train", "--from-log", str(one), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("din train: the log spans one hour only")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- warm start and lineage


def test_a_warm_start_starts_from_the_parents_weights(
    log_dir: Path, parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--from-log", str(log_dir), "--init", str(parent), "--out", str(run), "--epochs", "0"]
    assert din([*argv, "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"warm start from {parent.resolve()}" in printed and "on the validation rows" in printed
    lineage = _manifest(run / "bundle")["lineage"]
    parent_model, _ = load_run(_manifest(parent)["source"]["run_dir"])
    new_model, ckpt = load_run(tmp_path / "run")
    for name, value in parent_model.state_dict().items():
        assert torch.equal(value, new_model.state_dict()[name]), name
    assert lineage["valid"]["new"] == lineage["valid"]["parent"]  # same weights, same scores
    assert ckpt.items == load_run(_manifest(parent)["source"]["run_dir"])[1].items  # the parent's vocabulary


def test_the_lineage_names_the_parent_the_data_and_both_scores(
    trained: Path, parent: Path, log_dir: Path
) -> None:
    manifest = _manifest(trained)
    lineage = manifest["lineage"]
    assert lineage["parent"] == {
        "model_version": _manifest(parent)["model_version"],
        "bundle": str(parent.resolve()),
        "run_dir": _manifest(parent)["source"]["run_dir"],
    }
    rows = (
        ds.dataset(log_dir, format="parquet", partitioning="hive").to_table(columns=["ts"])["ts"].to_numpy()
    )
    data = lineage["data"]
    assert data["log_dir"] == str(log_dir.resolve()) and data["hours"] == 3
    assert (data["from"], data["valid_from"]) == ("2023-11-14T22:00:01+00:00", "2023-11-15T00:00:00+00:00")
    assert data["to"] < "2023-11-15T01:00:00+00:00"
    assert data["rows"] == {
        "train": int((rows < HOUR0 + 7200).sum()),
        "valid": int((rows >= HOUR0 + 7200).sum()),
    }
    assert data["served_versions"] == ["served-v"]
    valid = lineage["valid"]
    for who in ("parent", "new", "served"):
        assert set(valid[who]) == {"auc", "gauc", "logloss"}
    assert valid["served"]["auc"] == 0.5  # the log's scores were all 0.5
    assert valid["new"]["auc"] > valid["parent"]["auc"] + 0.1  # the clicks follow the categories: learnt
    assert manifest["metrics"] == valid["new"] and manifest["source"]["run_dir"] == str(trained.parent)


def test_without_init_a_fresh_model_takes_its_vocabulary_from_the_log(log_dir: Path, tmp_path: Path) -> None:
    lineage = retrain(log_dir, tmp_path / "run", _cfg(1), progress=False, verbose=False)
    assert lineage["parent"] is None and lineage["valid"]["parent"] is None
    assert lineage["valid"]["new"]["auc"] is not None and lineage["valid"]["served"]["auc"] == 0.5
    model, ckpt = load_run(tmp_path / "run")
    table = read_log(log_dir)
    seen = set(table["item_id"].to_pylist()) | {i for h in table["history"].to_pylist() for i in h}
    assert set(ckpt.items[2:]) == seen and ckpt.items[:2] == ["<pad>", "<oov>"]
    assert ckpt.categories[2:] == ["c2", "c3", "c4", "c5"]
    for index, item in enumerate(ckpt.items[2:], 2):  # each item keeps the category it was logged with
        assert ckpt.categories[int(model.item_cate[index])] == _category(int(item[1:]))
    assert _manifest(tmp_path / "run" / "bundle")["lineage"] == lineage


def test_bad_arguments_are_one_line_and_exit_2(
    log_dir: Path, parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orphan = tmp_path / "orphan"  # a bundle whose run dir is gone: ONNX only, no weights to start from
    shutil.copytree(parent, orphan)
    manifest = _manifest(orphan)
    (orphan / "manifest.json").write_text(
        json.dumps(manifest | {"source": {"run_dir": str(tmp_path / "gone")}})
    )
    cases = [
        (
            ["train", "--from-log", str(log_dir), "--init", str(orphan), "--out", str(tmp_path / "r")],
            "ONNX only",
        ),
        (
            ["train", "--data", str(tmp_path), "--init", "x", "--out", str(tmp_path / "r")],
            "--init, --bundle, --since and --valid-seconds go with --from-log",
        ),
        (
            ["train", "--from-log", str(log_dir), "--valid-seconds", "0", "--out", str(tmp_path / "r")],
            "--valid-seconds must be a positive number",
        ),
        (
            ["train", "--from-log", str(log_dir), "--valid-seconds", "99999", "--out", str(tmp_path / "r")],
            "not more than --valid-seconds 99999",
        ),
        (
            ["train", "--from-log", str(log_dir), "--since", "2030-01-01", "--out", str(tmp_path / "r")],
            "no rows since 2030-01-01T00:00:00+00:00",
        ),
        (["train", "--from-log", str(tmp_path / "no"), "--out", str(tmp_path / "r")], "not a directory"),
        (
            ["train", "--from-log", str(log_dir), "--init", str(tmp_path), "--out", str(tmp_path / "r")],
            "neither",
        ),
        (["promote", "--url", "http://127.0.0.1:1"], "give a BUNDLE"),
        (["promote", str(tmp_path), "--rollback", "--url", "http://127.0.0.1:1"], "give a BUNDLE"),
        (["promote", str(tmp_path), "--url", "127.0.0.1:1"], "--url must start"),
        (["promote", str(tmp_path), "--url", "http://127.0.0.1:1", "--min-gain", "nan"], "--min-gain"),
        (["promote", str(tmp_path), "--url", "http://127.0.0.1:1"], "manifest.json is missing"),
    ]
    for argv, says in cases:
        assert din(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and says in err[0], (argv, err)


# ---------------------------------------------------------------- promote and roll back, over HTTP


def _live_version(server: LiveServer) -> str:
    with server.client() as c:
        resp = c.get("/model", headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["model_version"])


def test_promote_refuses_worse_accepts_no_worse_and_rolls_back(
    trained: Path,
    parent: Path,
    log_dir: Path,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parent_version, new_version = _manifest(parent)["model_version"], _manifest(trained)["model_version"]
    # a model worse than its parent on the held-out hour: trained on the earlier hours' clicks turned
    # upside down (the validation hour is left as it was logged)
    flipped = tmp_path / "flipped"
    newest = sorted(log_dir.glob("hour=*"))[-1]
    for path in log_dir.glob("hour=*/part-*.parquet"):
        part = pq.read_table(path)
        if path.parent != newest:
            upside_down = pc.subtract(1, part["label"]).cast("int8")
            part = part.set_column(
                part.schema.get_field_index("label"), part.schema.field("label"), upside_down
            )
        dest = flipped / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, dest)
    worse = tmp_path / "worse"
    lineage = retrain(flipped, worse, _cfg(1), init=parent, progress=False, verbose=False)
    assert lineage["valid"]["new"]["auc"] < lineage["valid"]["parent"]["auc"]
    settings = make_settings(parent, redis_url, api_keys=KEY)
    with LiveServer(settings) as server:
        server.wait_ready()
        url = ["--url", server.url, "--api-key", KEY]

        assert din(["promote", str(worse / "bundle"), *url]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("din promote: refused:") and "keeps serving" in err[0]
        assert _live_version(server) == parent_version

        assert din(["promote", str(trained), *url, "--min-gain", "0.9"]) == 1  # better, not by enough
        assert "min gain is 0.9" in capsys.readouterr().err
        assert _live_version(server) == parent_version

        assert din(["promote", str(trained), "--url", server.url]) == 1  # no key: the service says 401
        assert "401" in capsys.readouterr().err
        assert _live_version(server) == parent_version

        assert din(["promote", str(trained), *url]) == 0
        assert capsys.readouterr().out.startswith(f"promoted {new_version}")
        assert _live_version(server) == new_version

        # a bundle compared with a parent that is no longer live says nothing about the live model
        assert din(["promote", str(worse / "bundle"), *url]) == 1
        assert f"the live model is {new_version}" in capsys.readouterr().err
        assert _live_version(server) == new_version

        assert din(["promote", "--rollback", *url]) == 0
        assert f"to its parent {parent_version}" in capsys.readouterr().out
        assert _live_version(server) == parent_version

        assert din(["promote", "--rollback", *url]) == 1  # the parent has no parent of its own
        assert "nothing to roll back to" in capsys.readouterr().err
