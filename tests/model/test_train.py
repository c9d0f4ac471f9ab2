"""`din train` on the small synthetic fixture: it learns, it is deterministic, it writes the run dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main as din
from contracts.errors import InvalidArgument
from model.checkpoint import FORMAT, load_run
from model.data import load_prepared
from model.metrics import evaluate
from model.train import Samples, TrainConfig, add_arguments, bucketed_batches, predict, train

CFG = TrainConfig(epochs=3, batch_size=128, seed=3, threads=1)


@pytest.fixture(scope="module")
def run_a(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "a"
    return out, train(prepared_data, out, CFG, progress=False, verbose=False)


def test_learns(run_a):
    _, m = run_a
    assert m["test"]["auc"] > 0.65, m["test"]
    assert m["valid"]["auc"] > 0.65, m["valid"]
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]


def test_same_seed_same_numbers(run_a, prepared_data, tmp_path):
    _, a = run_a
    b = train(prepared_data, tmp_path / "b", CFG, progress=False, verbose=False)
    for ra, rb in zip(a["epochs"], b["epochs"], strict=True):
        assert ra["train_loss"] == rb["train_loss"]
        assert ra["valid"] == rb["valid"]
    assert a["test"] == b["test"]


def test_best_epoch_is_the_best_valid_auc(run_a):
    _, m = run_a
    aucs = [r["valid"]["auc"] for r in m["epochs"]]
    assert m["best_epoch"] == 1 + int(np.argmax(aucs))
    assert m["valid"] == m["epochs"][m["best_epoch"] - 1]["valid"]


def test_run_dir_and_restored_weights(run_a, prepared_data):
    out, m = run_a
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["format"] == FORMAT
    assert set(payload) == {
        "format", "config", "state_dict", "items", "categories",
        "max_history", "best_epoch", "metrics", "train_args",
    }  # fmt: skip
    model, ckpt = load_run(out)
    assert not model.training
    data = load_prepared(prepared_data)
    assert ckpt.items == data.items and ckpt.categories == data.categories
    assert ckpt.max_history == data.max_history == model.cfg.max_history
    assert ckpt.best_epoch == m["best_epoch"]
    assert ckpt.metrics["test"] == m["test"]
    # train_args: every option as run, in this order, then the data directory (the file format)
    assert list(ckpt.train_args.items()) == list(m["train_args"].items()) == [
        ("epochs", 3), ("batch_size", 128), ("lr", 3e-3), ("pooling", "attention"), ("seed", 3),
        ("softmax", False), ("head_activation", "dice"), ("threads", 1), ("patience", 2),
        ("eval_batch_size", 4096), ("bucket_batches", 50), ("data_dir", str(prepared_data)),
    ]  # fmt: skip
    # the saved weights are the best epoch's: they reproduce its test metrics
    test = Samples(data.test, data.seq_items, data.seq_offsets, data.max_history)
    got = evaluate(test.user, test.label, predict(model, test))
    assert got == pytest.approx(m["test"], abs=1e-9)


def test_bucketed_batches_cover_everything_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 100, 1001)
    batches = bucketed_batches(lengths, 100, rng, bucket_batches=3)
    idx = np.concatenate(batches)
    assert sorted(idx.tolist()) == list(range(1001))
    assert min(len(b) for b in batches) >= 2  # the size-1 tail was merged
    # within a batch the lengths are close: far less padding than random batches
    pad = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)
    rand = sum(
        int(lengths[b].max() * len(b) - lengths[b].sum()) for b in np.array_split(rng.permutation(1001), 10)
    )
    assert pad < rand / 2


def test_cli_sum_pooling(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(prepared_data), "--out", str(out), "--epochs", "1", "--pooling", "sum"]
    assert din([*argv, "--threads", "1", "--no-progress", "--batch-size", "200"]) == 0
    printed = capsys.readouterr().out
    assert "valid auc" in printed and "test (epoch 1)" in printed
    model, ckpt = load_run(out)
    assert model.cfg.pooling == "sum" and ckpt.train_args["batch_size"] == 200


def test_cli_defaults_are_train_config_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = vars(parser.parse_args(["--data", "d", "--out", "o"]))
    assert args == {
        "data": "d", "out": "o", "epochs": 5, "batch_size": 256, "lr": 3e-3, "pooling": "attention",
        "seed": 0, "softmax": False, "head_activation": "dice", "threads": 0, "patience": 2,
        "no_progress": False,
    }  # fmt: skip
    flags = {k: v for k, v in args.items() if k not in ("data", "out", "no_progress")}
    assert flags == {k: v for k, v in vars(TrainConfig()).items() if k in flags}
    assert TrainConfig().eval_batch_size == 4096 and TrainConfig().bucket_batches == 50


def test_cli_missing_data(tmp_path, capsys):
    assert din(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"din train: {tmp_path / 'nope'}: not a prepared data directory (no meta.json; run din prepare)"
    ]


def test_cli_bad_batch_size_is_one_clean_line(prepared_data, tmp_path, capsys):
    with pytest.raises(InvalidArgument, match="batch_size"):
        train(prepared_data, tmp_path / "lib", TrainConfig(batch_size=1), progress=False, verbose=False)
    argv = ["train", "--data", str(prepared_data), "--out", str(tmp_path / "run"), "--batch-size", "1"]
    assert din(argv) == 2
    assert capsys.readouterr().err == (
        "din train: batch_size must be at least 2 (batch norm in Dice needs two samples)\n"
    )
