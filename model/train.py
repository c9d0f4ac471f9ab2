"""`din train`: fit a DIN on prepared samples, keep the epoch with the best validation AUC.

Training uses `DIN.forward_fast` on length-bucketed batches whose histories are trimmed to their
longest member, so little time goes into padding. Same seed + same data => identical numbers.
`TrainConfig` holds every training option and its default, once: `train` takes one, and the
`din train` flags take their defaults from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from contracts.errors import DataError, InvalidArgument
from model.checkpoint import save_run
from model.data import Prepared, gather_histories, load_prepared
from model.din import DIN, DINConfig, build_model
from model.metrics import evaluate


@dataclass
class TrainConfig:
    """How `din train` fits a model. The checkpoint keeps it as `train_args`, with the threads
    actually used and the data directory added.

    Defaults: tuned on `din synth --users 4000 --items 3000` against DeepCTR-Torch
    (bench/deepctr_compare.py).
    """

    epochs: int = 5  # at most this many epochs
    batch_size: int = 256  # samples per step; at least 2 (batch norm in Dice needs two)
    lr: float = 3e-3  # Adam learning rate
    pooling: str = "attention"  # "attention" (DIN) or "sum" (the paper's BaseModel)
    seed: int = 0  # initial weights and batch order
    softmax: bool = False  # softmax over attention scores (off in the paper, §4.3)
    head_activation: str = "dice"  # "dice" or "prelu"
    threads: int = 0  # torch threads; 0: every core
    patience: int = 2  # stop after this many epochs without a better validation AUC
    eval_batch_size: int = 4096  # samples per forward call when evaluating
    bucket_batches: int = 50  # sort by history length within chunks of this many batches


# ---------------------------------------------------------------- batching


def _hist_lengths(pos: np.ndarray, max_history: int) -> np.ndarray:
    """A sample's history is its user's events before `pos`, at most max_history of them."""
    return np.minimum(pos.astype(np.int64), max_history)


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 50
) -> list[np.ndarray]:
    """Shuffle, sort by history length within chunks of `bucket_batches` batches, cut, shuffle batches.

    Returns index arrays covering every sample once. No batch has a single sample (batch norm in
    Dice cannot train on one): a size-1 tail is merged into the previous batch.
    """
    n = len(lengths)
    perm = rng.permutation(n)
    chunk = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, n, chunk):
        idx = perm[start : start + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        tail = batches.pop()
        batches[-1] = np.concatenate([batches[-1], tail])
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class Samples:
    """One split's samples with a way to build model inputs for any subset of them.

    `split.user` indexes the sequences the histories are cut from; `group` (default: the same) is who
    GAUC groups by. They differ when each sample carries its own history snapshot (the impression log:
    one sequence per impression, grouped by user).
    """

    def __init__(
        self,
        split: Any,
        seq_items: np.ndarray,
        seq_offsets: np.ndarray,
        max_history: int,
        group: np.ndarray | None = None,
    ) -> None:
        self.user = np.asarray(split.user)
        self.group = self.user if group is None else np.asarray(group)
        self.pos = np.asarray(split.pos)
        self.target = np.asarray(split.target)
        self.label = np.asarray(split.label, dtype=np.float32)
        self.seq_items = seq_items
        self.seq_offsets = seq_offsets
        self.max_history = max_history
        self.lengths = _hist_lengths(self.pos, max_history)

    def __len__(self) -> int:
        return len(self.label)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """idx (B,) -> target (B,), hist (B, L), hist_len (B,), label (B,)."""
        hist, hist_len = gather_histories(
            self.seq_items, self.seq_offsets, self.user[idx], self.pos[idx], self.max_history
        )
        return (
            torch.from_numpy(self.target[idx].astype(np.int64)),
            torch.as_tensor(hist, dtype=torch.int64),
            torch.as_tensor(hist_len, dtype=torch.int64),
            torch.from_numpy(self.label[idx]),
        )


@torch.no_grad()
def predict(model: DIN, samples: Samples, batch_size: int = 4096) -> np.ndarray:
    """CTR of every sample, in sample order. Batches are sorted by length so padding stays small."""
    was_training = model.training
    model.eval()
    order = np.argsort(samples.lengths, kind="stable")
    probs = np.empty(len(samples), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        target, hist, hist_len, _ = samples.batch(idx)
        probs[idx] = torch.sigmoid(model.forward_fast(target, hist, hist_len)).numpy()
    model.train(was_training)
    return probs


def evaluate_samples(model: DIN, samples: Samples, batch_size: int = 4096) -> dict[str, float]:
    """AUC, GAUC (by `samples.group`) and log loss of `model` on `samples`."""
    return evaluate(samples.group, samples.label, predict(model, samples, batch_size))


# ---------------------------------------------------------------- the loop


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train, keep the best epoch by validation AUC, write the run dir; returns metrics.json's content.

    cfg: the training options (TrainConfig's defaults when None); progress: tqdm bars on stderr;
    verbose: the summary line and the per-epoch table on stdout.
    """
    opt = cfg if cfg is not None else TrainConfig()
    check_config(opt)
    say = print if verbose else (lambda *a, **k: None)
    threads = int(opt.threads) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()

    data = load_prepared(data_dir)
    train_s, valid_s, test_s = (
        Samples(getattr(data, name), data.seq_items, data.seq_offsets, data.max_history)
        for name in ("train", "valid", "test")
    )
    model = _build(data, opt)
    say(_overview(model.cfg, opt, threads, train_s, valid_s, test_s))
    history, best = fit(model, train_s, valid_s, opt, progress=progress, say=say)
    test = evaluate_samples(model, test_s, opt.eval_batch_size)

    # The options as run: the threads actually used (not 0) and where the data came from.
    train_args = asdict(opt) | {"threads": threads, "data_dir": str(data_dir)}
    result: dict[str, Any] = {
        "epochs": history,
        "best_epoch": best["epoch"],
        "valid": best["valid"],
        "test": test,
        "train_seconds": sum(row["train_seconds"] for row in history),
        "total_seconds": time.perf_counter() - t_start,
        "samples": {"train": len(train_s), "valid": len(valid_s), "test": len(test_s)},
        "config": model.cfg.to_dict(),
        "train_args": train_args,
    }
    _write_run(Path(out_dir), model, data, result)
    say(epoch_table(history, best["epoch"]))
    say(
        f"test (epoch {best['epoch']}): auc {test['auc']:.4f}  gauc {test['gauc']:.4f}  "
        f"logloss {test['logloss']:.4f}   training {result['train_seconds']:.1f}s, wrote {out_dir}"
    )
    return result


def check_config(opt: TrainConfig) -> None:
    """Refuse options no training can run with, before any data is read."""
    if opt.batch_size < 2:
        raise InvalidArgument("batch_size must be at least 2 (batch norm in Dice needs two samples)")
    if opt.epochs < 0:
        raise InvalidArgument(f"epochs must be >= 0, got {opt.epochs}")


def _build(data: Prepared, opt: TrainConfig) -> DIN:
    """The model for `data`'s vocabularies and T, initialised from `opt.seed`."""
    din_cfg = DINConfig(
        n_items=len(data.items),
        n_categories=len(data.categories),
        max_history=data.max_history,
        pooling=opt.pooling,
        att_softmax=bool(opt.softmax),
        head_activation=opt.head_activation,
    )
    item_cate = torch.as_tensor(np.asarray(data.item_cate), dtype=torch.int64)
    return build_model(din_cfg, item_cate, seed=opt.seed)


def _overview(
    din_cfg: DINConfig, opt: TrainConfig, threads: int, train_s: Samples, valid_s: Samples, test_s: Samples
) -> str:
    return (
        f"train {len(train_s):,} / valid {len(valid_s):,} / test {len(test_s):,} samples, "
        f"{din_cfg.n_items:,} items, {din_cfg.n_categories:,} categories, T={din_cfg.max_history}, "
        f"pooling={din_cfg.pooling}, "
        f"batch {opt.batch_size}, lr {opt.lr}, {threads} threads"
    )


def fit(
    model: DIN,
    train_s: Samples,
    valid_s: Samples,
    opt: TrainConfig,
    *,
    progress: bool,
    say: Callable[..., object],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Epochs until `opt.epochs`, or until `opt.patience` epochs bring no better validation AUC; leaves
    `model` with the best epoch's weights, in eval mode. Returns one row per epoch run, and the best.

    With `opt.epochs == 0` the model is left as it came (a warm start's parent, unchanged): no rows,
    and the best is "epoch 0" with its validation numbers."""
    if opt.epochs == 0:
        model.eval()
        return [], {"epoch": 0, "valid": evaluate_samples(model, valid_s, opt.eval_batch_size)}
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(opt.seed)
    torch.manual_seed(opt.seed)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, opt.epochs + 1):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, train_s, optimizer, loss_fn, rng, opt, epoch, progress)
        fit_seconds = time.perf_counter() - t0
        valid = evaluate_samples(model, valid_s, opt.eval_batch_size)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid": valid,
            "train_seconds": fit_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if best is None or valid["auc"] > best["valid"]["auc"]:
            best = row
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best["epoch"] >= opt.patience:
            say(f"no better validation AUC for {opt.patience} epochs: stopping after epoch {epoch}")
            break

    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return history, best


def _train_epoch(
    model: DIN,
    samples: Samples,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    rng: np.random.Generator,
    opt: TrainConfig,
    epoch: int,
    progress: bool,
) -> float:
    """One pass over the training samples in length-bucketed batches; returns the mean loss."""
    model.train()
    batches = bucketed_batches(samples.lengths, opt.batch_size, rng, opt.bucket_batches)
    total, seen = 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, file=sys.stderr)
    for i, idx in enumerate(bar):
        target, hist, hist_len, label = samples.batch(idx)
        loss = loss_fn(model.forward_fast(target, hist, hist_len), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{total / seen:.4f}")
    bar.close()
    return total / max(seen, 1)


def _write_run(out_dir: Path, model: DIN, data: Prepared, result: dict[str, Any]) -> None:
    """The checkpoint (the best epoch's weights, with the vocabularies) and metrics.json."""
    save_run(
        out_dir,
        model,
        items=list(data.items),
        categories=list(data.categories),
        max_history=data.max_history,
        best_epoch=result["best_epoch"],
        metrics={"valid": result["valid"], "test": result["test"]},
        train_args=result["train_args"],
    )
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")


def epoch_table(history: list[dict[str, Any]], best_epoch: int) -> str:
    lines = [
        f"{'epoch':>5}  {'train loss':>10}  {'valid auc':>9}  {'gauc':>6}  {'logloss':>7}  {'seconds':>7}"
    ]
    for r in history:
        v = r["valid"]
        mark = "  *" if r["epoch"] == best_epoch else ""
        lines.append(
            f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {v['auc']:>9.4f}  {v['gauc']:>6.4f}  "
            f"{v['logloss']:>7.4f}  {r['seconds']:>7.1f}{mark}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared data directory (din prepare)")
    parser.add_argument("--out", required=True, help="run directory to write (checkpoint.pt, metrics.json)")
    add_training_options(parser)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig flags, shared by `din train --data` and `din train --from-log`."""
    d = TrainConfig()  # every default comes from TrainConfig, so it is written once
    parser.add_argument("--epochs", type=int, default=d.epochs, help="at most this many epochs")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--pooling", choices=["attention", "sum"], default=d.pooling)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--softmax",
        action="store_true",
        default=d.softmax,
        help="softmax over attention scores (off in the paper)",
    )
    parser.add_argument("--head-activation", choices=["dice", "prelu"], default=d.head_activation)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: every core)")
    parser.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience, epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        pooling=args.pooling,
        seed=args.seed,
        softmax=args.softmax,
        head_activation=args.head_activation,
        threads=args.threads,
        patience=args.patience,
    )


def run(args: argparse.Namespace) -> int:
    try:
        train(args.data, args.out, config_from_args(args), progress=not args.no_progress)
    except (DataError, InvalidArgument, OSError, ValueError) as e:  # ValueError: DIN's own checks
        print(f"din train: {e}", file=sys.stderr)
        return 2
    return 0
