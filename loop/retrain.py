"""`din train`: on prepared samples (`--data`, model.train) or on the exported impression log (`--from-log`).

From the log, every Parquet row (`loop.export.SCHEMA`: one per impression and candidate) is a sample:
the candidate is the target, the history snapshot the service scored is the history (so training sees
the features as they were served), `label` the click. Ids map through the vocabulary of the `--init`
model (ids it never saw -> OOV), or, without `--init`, a vocabulary built from the log.

The split is by time, never random: rows of the most recent clock hour (UTC, the export's partition)
are validation, every earlier row is training, so no training row is younger than a validation row.
A log of fewer than two hours, or a validation hour without both clicks and non-clicks, is refused.
`--valid-seconds S` validates on the log's last S seconds instead (a log of minutes: the loop demo);
the split stays a time split. `--since TIME` keeps only the rows logged from TIME on (after a drift,
yesterday's world is noise).

`--init` warm-starts from the parent's weights. A bundle holds ONNX only, so its weights are read
from the checkpoint of the run that produced it (`source.run_dir` in its manifest); a run directory
may be given instead. The parent and the new model are both scored on the validation hour, and the
bundle written carries the comparison as `lineage` in its manifest, which `din promote` reads.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from contracts.bundle import load_bundle
from contracts.errors import BundleError, DataError, ExportError, InvalidArgument
from contracts.vocab import OOV, RESERVED, Vocab
from loop.export import SCHEMA
from model import train as prepared_training
from model.checkpoint import CHECKPOINT_FILE, load_run, save_run
from model.din import DIN, DINConfig, build_model
from model.export import export_model
from model.metrics import evaluate
from model.train import Samples, TrainConfig, check_config, evaluate_samples, fit

HOUR_S = 3600
LINEAGE_FORMAT = "din-lineage/1"
# the columns read; the rest of the export's schema (position, degraded) is not needed to train
COLUMNS = (
    "impression_id",
    "ts",
    "user_id",
    "item_id",
    "category",
    "score",
    "label",
    "model_version",
    "history",
    "history_categories",
)


# ---------------------------------------------------------------- reading the log


def read_log(log_dir: str | Path) -> pa.Table:
    """Every exported row under LOG_DIR (`hour=*/part-*.parquet`, as `din log export` writes them)."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise DataError(f"{log_dir}: not a directory (write one with `din log export --out`)")
    files = sorted(log_dir.glob("hour=*/part-*.parquet"))
    if not files:
        raise DataError(f"{log_dir}: no exported impressions (no hour=*/part-*.parquet; run din log export)")
    schema = pa.schema([SCHEMA.field(name) for name in COLUMNS])  # the exporter's types, one schema
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, columns=list(COLUMNS)).cast(schema))
        except (pa.ArrowException, ValueError, OSError) as e:  # ValueError: a null where none may be
            raise DataError(f"{path}: not an impression log file of `din log export` ({e})") from None
    return pa.concat_tables(tables).combine_chunks()


@dataclass(frozen=True)
class TimeSplit:
    """Row indices of training (before `boundary`) and validation (the most recent period, from it on)."""

    boundary: float  # start of the validation period: every train ts < boundary <= every valid ts
    train: np.ndarray  # int64 row indices
    valid: np.ndarray
    first_ts: float
    last_ts: float
    hours: int  # distinct clock hours holding rows


def split_by_time(ts: np.ndarray, valid_seconds: float | None = None) -> TimeSplit:
    """Validation is the most recent clock hour (or, with `valid_seconds`, the last that many seconds
    of the log), every earlier row training; refuses a split that leaves either side empty."""
    ts = np.asarray(ts, dtype=np.float64)
    if len(ts) == 0:
        raise DataError("the log holds no rows")
    hours = np.unique(np.floor(ts / HOUR_S))
    if valid_seconds is None:
        boundary = float(hours[-1] * HOUR_S)
        if len(hours) < 2:
            raise DataError(
                f"the log spans one hour only ({_iso(boundary)[:13]}): need at least 2 hours, "
                "the most recent for validation and earlier ones for training "
                "(or validate on its last seconds: --valid-seconds)"
            )
    else:
        if not (valid_seconds > 0 and math.isfinite(valid_seconds)):
            raise InvalidArgument(f"--valid-seconds must be a positive number, got {valid_seconds}")
        boundary = float(ts.max()) - float(valid_seconds)
        if not (ts < boundary).any():
            span = float(ts.max() - ts.min())
            raise DataError(
                f"the log spans {span:.0f} s, not more than --valid-seconds {valid_seconds:g}: "
                "no row is left to train on"
            )
    train = np.flatnonzero(ts < boundary)
    valid = np.flatnonzero(ts >= boundary)
    return TimeSplit(boundary, train, valid, float(ts.min()), float(ts.max()), len(hours))


# ---------------------------------------------------------------- vocabularies and samples


@dataclass
class Vocabularies:
    items: list[str]  # item id per index, reserved rows first
    categories: list[str]
    item_cate: np.ndarray  # int64 (n_items,): category index of every item index


def vocab_from_log(table: pa.Table) -> Vocabularies:
    """Items and categories in order of first appearance (candidates, then histories); an item's
    category is the first one logged for it, OOV when the serving model did not know it."""
    item_cat: dict[str, str | None] = {}
    for item, cat in zip(table["item_id"].to_pylist(), table["category"].to_pylist(), strict=True):
        item_cat.setdefault(item, cat)
    hist = pc.list_flatten(table["history"]).to_pylist()
    hist_cat = pc.list_flatten(table["history_categories"]).to_pylist()
    for item, cat in zip(hist, hist_cat, strict=True):
        if item_cat.get(item) is None:
            item_cat[item] = cat
    categories = list(RESERVED) + sorted({c for c in item_cat.values() if c is not None})
    cat_vocab = Vocab(categories)
    items = list(RESERVED) + list(item_cat)
    item_cate = np.full(len(items), OOV, dtype=np.int64)
    item_cate[0] = 0  # padding's category is padding
    for i, item in enumerate(items[len(RESERVED) :], len(RESERVED)):
        cat = item_cat[item]
        item_cate[i] = cat_vocab.index(cat) if cat is not None else OOV
    return Vocabularies(items, categories, item_cate)


@dataclass
class LogSamples:
    """The log's rows as model inputs: one history sequence per impression (the snapshot it was
    scored with), one sample per row; GAUC groups by user."""

    seq_items: np.ndarray  # int64: every impression's history, oldest first, concatenated
    seq_offsets: np.ndarray  # int64 (n_impressions + 1,)
    impression: np.ndarray  # int64 (rows,): the row's sequence
    hist_len: np.ndarray  # int64 (rows,)
    target: np.ndarray  # int64 (rows,)
    label: np.ndarray  # float32 (rows,)
    user: np.ndarray  # int64 (rows,): user codes, for GAUC

    def subset(self, rows: np.ndarray, max_history: int) -> Samples:
        split = SimpleNamespace(
            user=self.impression[rows],
            pos=self.hist_len[rows],
            target=self.target[rows],
            label=self.label[rows],
        )
        return Samples(split, self.seq_items, self.seq_offsets, max_history, group=self.user[rows])


def log_samples(table: pa.Table, items: Vocab) -> LogSamples:
    imp_ids = np.asarray(table["impression_id"].to_numpy(zero_copy_only=False))
    _, first, impression = np.unique(imp_ids, return_index=True, return_inverse=True)
    histories = table["history"].take(pa.array(first))  # one snapshot per impression
    lengths = pc.list_value_length(histories).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = items.lookup(pc.list_flatten(histories).to_pylist())  # newest first within each impression
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(len(flat)) - offsets[seq]
    oldest_first = flat[offsets[seq] + lengths[seq] - 1 - within]  # the layout gather_histories reads
    users = np.asarray(table["user_id"].to_numpy(zero_copy_only=False))
    _, user_codes = np.unique(users, return_inverse=True)
    impression = impression.astype(np.int64)
    return LogSamples(
        seq_items=oldest_first.astype(np.int64),
        seq_offsets=offsets,
        impression=impression,
        hist_len=lengths[impression],
        target=items.lookup(table["item_id"].to_pylist()),
        label=table["label"].to_numpy().astype(np.float32),
        user=user_codes.astype(np.int64),
    )


# ---------------------------------------------------------------- the parent


@dataclass
class Parent:
    model: DIN
    items: list[str]
    categories: list[str]
    run_dir: Path  # the checkpoint the weights come from
    bundle: Path | None  # the bundle the service served it from (None: --init named a run dir)
    model_version: str | None


def load_parent(path: str | Path) -> Parent:
    """--init: a run directory (checkpoint.pt), or a bundle whose manifest names the run that made it."""
    path = Path(path).resolve()
    if (path / CHECKPOINT_FILE).is_file():
        model, ckpt = load_run(path)
        return Parent(model, ckpt.items, ckpt.categories, path, None, None)
    if not (path / "manifest.json").is_file():
        raise InvalidArgument(
            f"--init {path}: neither a bundle (manifest.json) nor a run dir ({CHECKPOINT_FILE})"
        )
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        raise InvalidArgument(f"--init: {e}") from None
    run_dir = (bundle.manifest.get("source") or {}).get("run_dir")
    if not run_dir or not (Path(run_dir) / CHECKPOINT_FILE).is_file():
        raise InvalidArgument(
            f"--init {path}: the bundle holds ONNX only and its manifest names no run dir with "
            f"{CHECKPOINT_FILE} (source.run_dir: {run_dir!r}); pass the run dir that produced it"
        )
    model, ckpt = load_run(run_dir)
    if list(ckpt.items) != bundle.vocab.ids or ckpt.config.to_dict() != bundle.manifest.get("config"):
        raise InvalidArgument(
            f"--init {path}: {run_dir}/{CHECKPOINT_FILE} is not the model of this bundle "
            "(vocabulary or config differ); pass the run dir that produced it"
        )
    return Parent(model, ckpt.items, ckpt.categories, Path(run_dir), path, bundle.model_version)


# ---------------------------------------------------------------- retraining


def retrain(
    log_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    init: str | Path | None = None,
    bundle_dir: str | Path | None = None,
    since: float | None = None,
    valid_seconds: float | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train on the exported log (warm from `init` when given), write RUN_DIR (checkpoint.pt,
    metrics.json) and a bundle (`bundle_dir`, default RUN_DIR/bundle) with lineage; returns the lineage."""
    opt = cfg if cfg is not None else TrainConfig()
    check_config(opt)
    say = print if verbose else (lambda *a, **k: None)
    threads = int(opt.threads) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    bundle_path = Path(bundle_dir) if bundle_dir is not None else out_dir / "bundle"
    t_start = time.perf_counter()

    parent = load_parent(init) if init is not None else None
    table = read_log(log_dir)
    if since is not None:
        table = table.filter(pc.greater_equal(table["ts"], since))
        if len(table) == 0:
            raise DataError(f"the log holds no rows since {_iso(since)} (--since)")
    split = split_by_time(table["ts"].to_numpy(), valid_seconds)
    if parent is not None:
        vocab = Vocabularies(parent.items, parent.categories, parent.model.item_cate.numpy())
    else:
        vocab = vocab_from_log(table)
    rows = log_samples(table, Vocab(vocab.items))
    valid_labels = rows.label[split.valid]
    if valid_labels.min() == valid_labels.max():
        raise DataError(
            f"the validation rows (from {_iso(split.boundary)}) hold only "
            f"{'clicks' if valid_labels[0] else 'non-clicks'}: AUC is undefined there"
        )

    if parent is not None:
        model = copy.deepcopy(parent.model)
    else:
        din_cfg = DINConfig(
            n_items=len(vocab.items),
            n_categories=len(vocab.categories),
            pooling=opt.pooling,
            att_softmax=bool(opt.softmax),
            head_activation=opt.head_activation,
        )
        model = build_model(din_cfg, torch.as_tensor(vocab.item_cate), seed=opt.seed)
    max_history = model.cfg.max_history
    train_s = rows.subset(split.train, max_history)
    valid_s = rows.subset(split.valid, max_history)
    say(
        f"log {log_dir}: {len(table):,} rows over {split.hours} hours; train {len(train_s):,} rows before "
        f"{_iso(split.boundary)}, valid {len(valid_s):,} rows from then on; "
        + (f"warm start from {parent.bundle or parent.run_dir}" if parent else "fresh model")
    )
    parent_valid = evaluate_samples(parent.model, valid_s, opt.eval_batch_size) if parent else None
    served = evaluate(rows.user[split.valid], valid_labels, table["score"].to_numpy()[split.valid])
    history, best = fit(model, train_s, valid_s, opt, progress=progress, say=say)
    new_valid = best["valid"]

    lineage: dict[str, Any] = {
        "format": LINEAGE_FORMAT,
        "parent": (
            {
                "model_version": parent.model_version,
                "bundle": str(parent.bundle) if parent.bundle else None,
                "run_dir": str(parent.run_dir),
            }
            if parent
            else None
        ),
        "data": {
            "log_dir": str(Path(log_dir).resolve()),
            "since": _iso(since) if since is not None else None,
            "from": _iso(split.first_ts),
            "to": _iso(split.last_ts),
            "valid_from": _iso(split.boundary),
            "hours": split.hours,
            "rows": {"train": len(train_s), "valid": len(valid_s)},
            "served_versions": sorted(set(table["model_version"].to_pylist())),
        },
        "valid": {
            "parent": _finite(parent_valid),
            "new": _finite(new_valid),
            "served": _finite(served),  # the scores the live model(s) logged, on the same rows
        },
    }
    train_args = asdict(opt) | {
        "threads": threads,
        "from_log": str(log_dir),
        "init": str(init) if init else None,
    }
    save_run(
        out_dir,
        model,
        items=vocab.items,
        categories=vocab.categories,
        max_history=max_history,
        best_epoch=best["epoch"],
        metrics={"valid": new_valid, "parent_valid": parent_valid},
        train_args=train_args,
    )
    result = {
        "epochs": history,
        "best_epoch": best["epoch"],
        "valid": _finite(new_valid),
        "train_seconds": sum(row["train_seconds"] for row in history),
        "total_seconds": time.perf_counter() - t_start,
        "config": model.cfg.to_dict(),
        "train_args": train_args,
        "lineage": lineage,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    manifest = export_model(
        model,
        vocab.items,
        bundle_path,
        name=out_dir.resolve().name,
        metrics=_finite(new_valid),
        source={"run_dir": str(out_dir.resolve()), "best_epoch": best["epoch"]},
        categories=vocab.categories,
        lineage=lineage,
    )
    if history:
        say(prepared_training.epoch_table(history, best["epoch"]))
    say(_comparison(lineage["valid"]))
    say(f"wrote {out_dir} and bundle {bundle_path}  model_version={manifest['model_version']}")
    return lineage


def _comparison(valid: dict[str, Any]) -> str:
    lines = [f"{'on the validation rows':<24}  {'auc':>7}  {'gauc':>7}"]
    for who in ("served", "parent", "new"):
        m = valid.get(who)
        if m is not None:
            cells = [f"{m[k]:>7.4f}" if m[k] is not None else f"{'-':>7}" for k in ("auc", "gauc")]
            lines.append(f"{who:<24}  {'  '.join(cells)}")
    return "\n".join(lines)


def _finite(metrics: dict[str, float] | None) -> dict[str, float | None] | None:
    """NaN (a GAUC with no user holding both classes) becomes null: the manifest is strict JSON."""
    if metrics is None:
        return None
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- CLI


def _timestamp(text: str) -> float:
    """--since: unix seconds, or ISO 8601 (naive = UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (ISO 8601 or unix seconds): {text!r}") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="prepared data directory (din prepare)")
    source.add_argument(
        "--from-log",
        metavar="DIR",
        help="the exported impression log (din log export --out): its last hour validates, "
        "earlier hours train",
    )
    parser.add_argument("--out", required=True, help="run directory to write (checkpoint.pt, metrics.json)")
    parser.add_argument(
        "--init",
        metavar="BUNDLE_OR_RUN_DIR",
        help="with --from-log: warm start from this model, the parent. A bundle holds ONNX only: its "
        "weights come from the run dir its manifest names (source.run_dir); or give that run dir. "
        "The parent's vocabulary and architecture are kept (--pooling etc. are then ignored)",
    )
    parser.add_argument(
        "--bundle", metavar="DIR", help="with --from-log: the bundle to write (default OUT/bundle)"
    )
    parser.add_argument(
        "--since",
        type=_timestamp,
        default=None,
        metavar="TIME",
        help="with --from-log: only the rows logged at or after TIME (ISO 8601, UTC unless it says, "
        "or unix seconds): e.g. the data since a drift",
    )
    parser.add_argument(
        "--valid-seconds",
        type=float,
        default=None,
        metavar="S",
        help="with --from-log: validate on the log's last S seconds instead of its most recent clock hour",
    )
    prepared_training.add_training_options(parser)


def run(args: argparse.Namespace) -> int:
    if args.data is not None:
        if any(v is not None for v in (args.init, args.bundle, args.since, args.valid_seconds)):
            print(
                "din train: --init, --bundle, --since and --valid-seconds go with --from-log", file=sys.stderr
            )
            return 2
        return prepared_training.run(args)
    try:
        retrain(
            args.from_log,
            args.out,
            prepared_training.config_from_args(args),
            init=args.init,
            bundle_dir=args.bundle,
            since=args.since,
            valid_seconds=args.valid_seconds,
            progress=not args.no_progress,
        )
    except (DataError, InvalidArgument, ExportError, ValueError) as e:
        print(f"din train: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"din train: {e}", file=sys.stderr)
        return 1
    return 0
