"""`din log export`: the impression log, labelled with its clicks, as Parquet rows partitioned by hour.

It reads every impression stream (`service.store.keys`: `{prefix}log:imp`, or one per log stream on a
Redis Cluster) through a consumer group (`--group`, created at the stream's start if absent), and the
feedback streams beside them. An impression is exported once its attribution window has passed
(`now - ts >= --window-s`): one row per logged candidate, `label` 1 when a feedback record of the same
impression, user and item arrived within the window, else 0. Younger impressions stay pending in the
group and are exported by a later run. Feedback that labels nothing is counted, never an error:
`orphan` (its impression was never logged, was trimmed, or its id is malformed), `wrong_user`,
`not_shown` (an item the impression did not log), `late` (after the window).

Exactly once, whenever it is killed. A batch of impressions is written as one file per hour
(`DIR/hour=YYYY-MM-DDTHH/part-<first impression id>-<last>.parquet`): to a temporary name, fsynced,
renamed into place, the directory fsynced; only then are its stream entries acknowledged (XACK). A run
killed between the rename and the XACK leaves those entries pending in the group; the next run first
re-reads the group's pending entries (claiming those of any other consumer name), and drops every
impression whose id is already in the files of its hour partition (the only partitions read: those of
the pending impressions), acknowledging it without writing it again. A run killed before the rename
leaves only a temporary file, removed by the next run. Entries never delivered to the group cannot
have been written. So the output is idempotent by impression id, and the group is the only cursor.
One export at a time per directory and group (a lock file in `DIR/_export/`).

Shadow scores (`contracts.records.ShadowScores`: a shadow model version's scores of an impression's
items, never shown) travel in the same impression streams, marked `"type": "shadow"`. They need no
window (they carry no label: the report joins them with the impression rows), so each is exported as
soon as it is read, as rows of a second dataset beside the impressions: one row per (impression, item),
`DIR/_shadow/hour=YYYY-MM-DDTHH/part-<first impression id>-<last>-<digest>.parquet` (`SHADOW_SCHEMA`;
the digest of the batch's (impression id, shadow version) keys keeps the name unique when one
impression has several shadow versions). Its directory starts with "_" so that `pyarrow.dataset.dataset
(DIR, partitioning="hive")` and `din train --from-log DIR` (`hour=*/part-*.parquet`) still read
impression rows only; read the shadows with `pyarrow.dataset.dataset(DIR / "_shadow", ...)`. Exactly
once the same way: written, fsynced and renamed before their entries are acknowledged, and a pending
shadow record whose (impression id, shadow version) is already in its hour's shadow files is
acknowledged without being written again.

The counts of feedback are kept honest across runs by one small file per group (`DIR/_export/<group>
.json`: per feedback stream, the last entry read): feedback of an impression exported in this run is
classified with it; any other feedback is counted once, in the first run that reads it after its
impression's window (from the impression id's time) has passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from tqdm import tqdm

from contracts.bundle import fsync_path
from contracts.errors import ConfigError, ExportBusy, RedisServerError
from contracts.records import IMPRESSION_ID_PATTERN, SHADOW_RECORD, Feedback, Impression, ShadowScores
from service.store.client import SyncRedisCluster, redis_endpoint, sync_client
from service.store.config import RedisConfig, add_redis_options
from service.store.keys import DEFAULT_PREFIX, feedback_key, impressions_key, log_streams
from service.store.streams import FIELD

DEFAULT_WINDOW_S = 1800.0
DEFAULT_GROUP = "din-export"
DEFAULT_CONSUMER = "export"
DEFAULT_BATCH = 5000
SKEW_S = 60.0  # feedback is read from this long before the oldest impression it may label (clocks differ)
STATE_DIR = "_export"  # under DIR: a leading "_" keeps it out of Parquet datasets
SHADOW_DIR = "_shadow"  # under DIR: the shadow rows' dataset (kept out of the impressions' dataset too)
TMP_PREFIX = ".tmp-"

SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),  # unix seconds the impression was answered
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),  # None: unknown to the model that scored it
        pa.field("position", pa.int32()),  # place in the answer, 0 = best
        pa.field("score", pa.float64(), nullable=False),  # the CTR the model predicted
        pa.field("label", pa.int8(), nullable=False),  # 1: clicked within the window
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("degraded", pa.string()),  # why the history could not be read (history then empty)
        pa.field("history", pa.list_(pa.string()), nullable=False),  # item ids scored, newest first
        pa.field("history_categories", pa.list_(pa.string()), nullable=False),
        pa.field("arm", pa.string()),  # the routing arm that served it; None: no routing in force
        pa.field("arm_forced", pa.bool_(), nullable=False),  # the arm came from the QA header: not A/B
    ]
)

# One row per (impression, item) a shadow version scored: the items its impression logged.
SHADOW_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),  # the impression's ts (its hour partition)
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("shadow_version", pa.string(), nullable=False),
        pa.field("shadow_score", pa.float64(), nullable=False),  # the CTR the shadow predicted
        pa.field("shadow_position", pa.int32(), nullable=False),  # its rank among all candidates, 0 = best
    ]
)

_ID = re.compile(IMPRESSION_ID_PATTERN)
Entry = tuple[str, dict[str, Any] | None]  # (stream entry id, fields; None when trimmed away)
R = TypeVar("R", Impression, ShadowScores)


@dataclass
class ExportStats:
    impressions: int = 0  # exported by this run
    rows: int = 0
    positives: int = 0  # rows labelled 1
    clicks: int = 0  # feedback records that labelled a row
    late: int = 0
    orphan: int = 0
    wrong_user: int = 0
    not_shown: int = 0
    files: int = 0
    waiting: int = 0  # impressions still inside their window (pending, for a later run)
    already_exported: int = 0  # found in the output after a crash: acknowledged, not written again
    trimmed: int = 0  # pending entries the stream no longer holds (trimmed before they were exported)
    malformed: int = 0  # entries that are not an impression record
    shadow_records: int = 0  # shadow scores exported by this run (one per impression and shadow version)
    shadow_rows: int = 0
    shadow_files: int = 0
    shadow_already_exported: int = 0  # found in the shadow output after a crash: not written again
    seconds: float = 0.0

    @property
    def click_rate(self) -> float:
        return self.positives / self.rows if self.rows else 0.0

    def table(self) -> str:
        rows = [
            ("impressions exported", f"{self.impressions:,}"),
            ("rows (impression, candidate)", f"{self.rows:,}"),
            ("labelled positive", f"{self.positives:,}"),
            ("click rate", f"{self.click_rate:.2%}"),
            ("clicks in window", f"{self.clicks:,}"),
            ("late clicks", f"{self.late:,}"),
            ("orphan clicks", f"{self.orphan:,}"),
            ("wrong-user clicks", f"{self.wrong_user:,}"),
            ("clicks on items not shown", f"{self.not_shown:,}"),
            ("files written", f"{self.files:,}"),
            ("still waiting for the window", f"{self.waiting:,}"),
            ("already exported (skipped)", f"{self.already_exported:,}"),
            ("trimmed before export", f"{self.trimmed:,}"),
            ("malformed entries", f"{self.malformed:,}"),
            ("shadow scores exported", f"{self.shadow_records:,}"),
            ("shadow rows (impression, item)", f"{self.shadow_rows:,}"),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>12}" for k, v in rows)


@dataclass(frozen=True)
class ExportOptions:
    window_s: float = DEFAULT_WINDOW_S
    group: str = DEFAULT_GROUP
    consumer: str = DEFAULT_CONSUMER
    prefix: str = DEFAULT_PREFIX
    streams: int = 1  # log streams (resolved: `service.store.keys.log_streams`)
    batch: int = DEFAULT_BATCH  # impressions read per XREADGROUP (and at most per file)
    progress: bool = False


@dataclass
class _Shard:
    """One impression stream and its feedback stream, during one run."""

    imp_key: str
    fb_key: str
    feedback: dict[str, list[tuple[str, Feedback]]] = field(default_factory=dict)  # by impression id
    fb_orphans: list[tuple[str, str, Feedback | None]] = field(default_factory=list)  # (entry, imp id, fb)
    fb_last: str | None = None  # the last feedback entry read
    decided: set[str] = field(default_factory=set)  # impressions whose feedback this run classified


def export_log(
    client: redis.Redis | SyncRedisCluster,
    out: Path,
    opts: ExportOptions,
    *,
    now: Callable[[], float] = time.time,
    after_write: Callable[[Path], None] | None = None,
) -> ExportStats:
    """Export what the log holds that is older than the window (see the module docstring).

    `now`: the clock deciding the window (tests inject one); `after_write(path)` runs after each file
    is durably in place and before its entries are acknowledged (a test's crash point)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    stats = ExportStats()
    with _locked(state_dir / f"{opts.group}.lock"):
        _remove_temporaries(out)
        state_path = state_dir / f"{opts.group}.json"
        state: dict[str, str] = orjson.loads(state_path.read_bytes()) if state_path.exists() else {}
        cutoff = now() - opts.window_s  # fixed for the run: an impression at or before it is done
        shards = [
            _Shard(impressions_key(opts.prefix, k, opts.streams), feedback_key(opts.prefix, k, opts.streams))
            for k in range(opts.streams)
        ]
        for shard in shards:
            _create_group(client, shard.imp_key, opts.group)
        total = sum(_backlog(client, s.imp_key, opts.group) for s in shards)
        with tqdm(total=total, unit="imp", desc="export", disable=not opts.progress) as bar:
            for shard in shards:
                _read_feedback(client, shard, opts, state.get(shard.fb_key))
                exporter = _ShardExport(client, out, opts, cutoff, shard, stats, after_write, bar)
                exporter.run()
                _count_undecided(shard, state.get(shard.fb_key), cutoff, opts.window_s, stats)
                if shard.fb_last is not None:
                    state[shard.fb_key] = shard.fb_last
                _write_atomic(state_path, orjson.dumps(state))
    stats.seconds = time.perf_counter() - start
    return stats


class _ShardExport:
    """One impression stream's run: pending entries first (a crashed run's), then the new ones."""

    def __init__(
        self,
        client: redis.Redis | SyncRedisCluster,
        out: Path,
        opts: ExportOptions,
        cutoff: float,
        shard: _Shard,
        stats: ExportStats,
        after_write: Callable[[Path], None] | None,
        bar: tqdm[Any],
    ) -> None:
        self.client, self.out, self.opts, self.cutoff = client, out, opts, cutoff
        self.shard, self.stats, self.after_write, self.bar = shard, stats, after_write, bar
        self._exported: dict[str, set[str]] = {}  # hour -> impression ids in its files (pending check)
        self._shadows: dict[str, set[tuple[str, str]]] = {}  # hour -> (impression id, shadow version)

    def run(self) -> None:
        key = self.shard.imp_key
        last: Any = self.client.xrevrange(key, count=1)
        end = _entry_id(last[0][0]) if last else (0, 0)  # new entries after the run began wait
        self._claim_pending()
        cursor = "0"  # this consumer's pending entries, in id order
        while entries := self._read({key: cursor}):
            cursor = entries[-1][0]
            self._process(entries, pending=True)
        while True:
            entries = self._read({key: ">"})
            if not entries:
                break
            self._process([e for e in entries if _entry_id(e[0]) <= end], pending=False)
            self._process_late_arrivals([e for e in entries if _entry_id(e[0]) > end])
            if _entry_id(entries[-1][0]) >= end:
                break

    def _claim_pending(self) -> None:
        """Take over what other consumer names of the group hold pending (a renamed or lost exporter)."""
        start = "0-0"
        while True:
            reply = self.client.xautoclaim(
                self.shard.imp_key, self.opts.group, self.opts.consumer, 0, start, count=1000
            )
            start = reply[0]
            if start in ("0-0", b"0-0"):
                return

    def _read(self, streams: dict[Any, Any]) -> list[Entry]:
        reply: Any = self.client.xreadgroup(
            self.opts.group, self.opts.consumer, streams, count=self.opts.batch
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {key: [entries]}
            return [(i, f) for i, f in next(iter(reply.values()))[0]]
        return list(reply[0][1])

    def _process_late_arrivals(self, entries: list[Entry]) -> None:
        """Entries added after the run began: pending now, they wait for the next run."""
        self.stats.waiting += len(entries)

    def _process(self, entries: list[Entry], *, pending: bool) -> None:
        ready: list[tuple[str, Impression]] = []
        shadows: list[tuple[str, ShadowScores]] = []
        done: list[str] = []  # entry ids to acknowledge without writing
        for entry_id, fields in entries:
            if not fields:  # trimmed from the stream while pending: nothing left to export
                self.stats.trimmed += 1
                done.append(entry_id)
                continue
            try:
                data = orjson.loads(fields[FIELD])
                if not isinstance(data, dict):
                    raise ValueError("not an object")
                if data.get("type") == SHADOW_RECORD:
                    shadow = ShadowScores.from_dict(data)
                    if pending and (shadow.impression_id, shadow.model_version) in self._shadows_in(
                        _hour(shadow.ts)
                    ):
                        self.stats.shadow_already_exported += 1
                        done.append(entry_id)
                    else:  # no window to wait for: it carries no label
                        shadows.append((entry_id, shadow))
                    continue
                imp = Impression.from_dict(data)
            except (KeyError, TypeError, ValueError):
                self.stats.malformed += 1
                done.append(entry_id)
                continue
            if imp.ts > self.cutoff:  # inside its window: stays pending for a later run
                self.stats.waiting += 1
                continue
            if pending and imp.impression_id in self._exported_in(_hour(imp.ts)):
                self.stats.already_exported += 1
                self._classify(imp)  # its feedback was counted by a run whose summary never printed
                done.append(entry_id)
                continue
            ready.append((entry_id, imp))
        for hour, group in _by_hour(ready).items():
            self._write(hour, group)
        for hour, shadow_group in _by_hour(shadows).items():
            self._write_shadows(hour, shadow_group)
        if done:
            self.client.xack(self.shard.imp_key, self.opts.group, *done)
        self.bar.update(len(entries))

    def _classify(self, imp: Impression) -> set[str]:
        """The items of `imp` clicked within the window; every feedback record of it counted once."""
        shown = {c.item_id for c in imp.candidates}
        clicked: set[str] = set()
        self.shard.decided.add(imp.impression_id)
        for _, fb in self.shard.feedback.get(imp.impression_id, []):
            if fb.user_id != imp.user_id:
                self.stats.wrong_user += 1
            elif fb.item_id not in shown:
                self.stats.not_shown += 1
            elif fb.ts - imp.ts > self.opts.window_s:
                self.stats.late += 1
            else:
                self.stats.clicks += 1
                clicked.add(fb.item_id)
        return clicked

    def _write(self, hour: str, group: list[tuple[str, Impression]]) -> None:
        cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        for _, imp in group:
            clicked = self._classify(imp)
            history_categories = list(imp.history_categories)
            for c in imp.candidates:
                cols["impression_id"].append(imp.impression_id)
                cols["ts"].append(imp.ts)
                cols["user_id"].append(imp.user_id)
                cols["item_id"].append(c.item_id)
                cols["category"].append(c.category)
                cols["position"].append(c.position)
                cols["score"].append(c.score)
                cols["label"].append(1 if c.item_id in clicked else 0)
                cols["model_version"].append(imp.model_version)
                cols["degraded"].append(imp.degraded)
                cols["history"].append(imp.history)
                cols["history_categories"].append(history_categories)
                cols["arm"].append(imp.arm)
                cols["arm_forced"].append(imp.arm_forced)
        table = pa.table(cols, schema=SCHEMA)
        ids = sorted(imp.impression_id for _, imp in group)
        self._write_file(self.out / f"hour={hour}", f"part-{ids[0]}-{ids[-1]}.parquet", table)
        self.stats.files += 1
        self.stats.impressions += len(group)
        self.stats.rows += table.num_rows
        self.stats.positives += sum(cols["label"])
        self.client.xack(self.shard.imp_key, self.opts.group, *(entry_id for entry_id, _ in group))

    def _write_shadows(self, hour: str, group: list[tuple[str, ShadowScores]]) -> None:
        cols: dict[str, list[Any]] = {name: [] for name in SHADOW_SCHEMA.names}
        for _, rec in group:
            n = len(rec.items)
            cols["impression_id"] += [rec.impression_id] * n
            cols["ts"] += [rec.ts] * n
            cols["user_id"] += [rec.user_id] * n
            cols["item_id"] += rec.items
            cols["shadow_version"] += [rec.model_version] * n
            cols["shadow_score"] += rec.scores
            cols["shadow_position"] += rec.positions
        table = pa.table(cols, schema=SHADOW_SCHEMA)
        keys = sorted((rec.impression_id, rec.model_version) for _, rec in group)
        digest = hashlib.sha256(orjson.dumps(keys)).hexdigest()[:12]
        name = f"part-{keys[0][0]}-{keys[-1][0]}-{digest}.parquet"
        self._write_file(self.out / SHADOW_DIR / f"hour={hour}", name, table)
        self.stats.shadow_files += 1
        self.stats.shadow_records += len(group)
        self.stats.shadow_rows += table.num_rows
        self.client.xack(self.shard.imp_key, self.opts.group, *(entry_id for entry_id, _ in group))

    def _write_file(self, directory: Path, name: str, table: pa.Table) -> None:
        """`table` to `directory/name`, durably: a temporary file, fsynced, renamed, the directory (and
        any directory this made) fsynced; then the test's crash point."""
        made = [d for d in (directory.parent, directory) if not d.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        for d in made:
            fsync_path(d.parent)
        path = directory / name
        tmp = directory / f"{TMP_PREFIX}{name}"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(directory)
        if self.after_write is not None:
            self.after_write(path)

    def _exported_in(self, hour: str) -> set[str]:
        """The impression ids already in partition `hour` (read once per run, only for pending ones)."""
        if hour not in self._exported:
            ids: set[str] = set()
            for path in sorted((self.out / f"hour={hour}").glob("part-*.parquet")):
                ids.update(pq.read_table(path, columns=["impression_id"]).column(0).to_pylist())
            self._exported[hour] = ids
        return self._exported[hour]

    def _shadows_in(self, hour: str) -> set[tuple[str, str]]:
        """The (impression id, shadow version) keys already in shadow partition `hour` (pending check)."""
        if hour not in self._shadows:
            keys: set[tuple[str, str]] = set()
            for path in sorted((self.out / SHADOW_DIR / f"hour={hour}").glob("part-*.parquet")):
                part = pq.read_table(path, columns=["impression_id", "shadow_version"])
                keys.update(zip(*(part.column(k).to_pylist() for k in (0, 1)), strict=True))
            self._shadows[hour] = keys
        return self._shadows[hour]


def _read_feedback(
    client: redis.Redis | SyncRedisCluster, shard: _Shard, opts: ExportOptions, last_read: str | None
) -> None:
    """Read the feedback stream: from a little before the oldest impression this run may label (the
    group's pending entries, else where it stands), or from the last entry an earlier run read."""
    lows: list[int] = []
    summary = client.xpending(shard.imp_key, opts.group)
    if summary and summary.get("pending"):
        lows.append(_entry_id(summary["min"])[0])
    for info in client.xinfo_groups(shard.imp_key):
        if info["name"] in (opts.group, opts.group.encode()):
            lows.append(_entry_id(info["last-delivered-id"])[0])
    if last_read is not None:
        lows.append(_entry_id(last_read)[0])
    start = f"{max(0, min(lows) - int(SKEW_S * 1000))}-0" if lows and last_read is not None else "-"
    while True:
        chunk: Any = client.xrange(shard.fb_key, min=start, max="+", count=10_000)
        if not chunk:
            return
        for entry_id, fields in chunk:
            shard.fb_last = entry_id
            try:
                fb = Feedback.from_dict(orjson.loads(fields[FIELD]))
            except (KeyError, TypeError, ValueError):
                shard.fb_orphans.append((entry_id, "", None))
                continue
            shard.feedback.setdefault(fb.impression_id, []).append((entry_id, fb))
        start = f"({chunk[-1][0]}"


def _count_undecided(
    shard: _Shard, last_read: str | None, cutoff: float, window_s: float, stats: ExportStats
) -> None:
    """Feedback no impression of this run classified: counted once, by the first run that reads it
    after its impression's window is over (its time from the impression id). Late if it came after
    that window, else an orphan (the impression was never logged, or trimmed before it was exported)."""
    seen = _entry_id(last_read) if last_read is not None else (-1, -1)
    for entry_id, _, _ in shard.fb_orphans:
        if _entry_id(entry_id) > seen:
            stats.orphan += 1
    for imp_id, fbs in shard.feedback.items():
        if imp_id in shard.decided:
            continue
        shown_at = int(imp_id[:12], 16) / 1000 if _ID.match(imp_id) else None
        if shown_at is not None and shown_at > cutoff:
            continue  # its impression may still be exported, with this feedback
        for entry_id, fb in fbs:
            if _entry_id(entry_id) <= seen:
                continue
            if shown_at is not None and fb.ts - shown_at > window_s:
                stats.late += 1
            else:
                stats.orphan += 1


# ------------------------------------------------------------------ Redis and files


def _create_group(client: redis.Redis | SyncRedisCluster, key: str, group: str) -> None:
    """XGROUP CREATE key group 0 MKSTREAM, unless it exists: a new group reads the stream from its start."""
    try:
        client.xgroup_create(key, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _backlog(client: redis.Redis | SyncRedisCluster, key: str, group: str) -> int:
    """Entries the group holds pending plus those not yet delivered (for the progress bar)."""
    for info in client.xinfo_groups(key):
        if info["name"] in (group, group.encode()):
            lag = info.get("lag")
            return int(info.get("pending") or 0) + (int(lag) if lag is not None else client.xlen(key))
    return 0


def _entry_id(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _hour(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H")


def _by_hour(ready: list[tuple[str, R]]) -> dict[str, list[tuple[str, R]]]:
    groups: dict[str, list[tuple[str, R]]] = defaultdict(list)
    for entry in ready:
        groups[_hour(entry[1].ts)].append(entry)
    return dict(sorted(groups.items()))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _remove_temporaries(out: Path) -> None:
    """What a killed run left half written (never renamed, never acknowledged)."""
    for tmp in [
        *out.glob(f"hour=*/{TMP_PREFIX}*"),
        *out.glob(f"{SHADOW_DIR}/hour=*/{TMP_PREFIX}*"),
        *out.glob(f"{STATE_DIR}/{TMP_PREFIX}*"),
    ]:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportBusy(f"{path}: another export of this group is running on this directory") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory (hour=... partitions)")
    add_redis_options(
        parser,
        cluster_help="--redis-url names one node of a Redis Cluster (every log stream is read)",
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="key prefix (the service's DIN_REDIS_PREFIX)"
    )
    parser.add_argument(
        "--log-streams",
        type=int,
        default=0,
        help="streams the log is spread over: the service's DIN_LOG_STREAMS (0 = 1, or 8 on a cluster)",
    )
    parser.add_argument(
        "--window-s",
        type=float,
        default=DEFAULT_WINDOW_S,
        help=f"attribution window: a click counts within this many seconds of its impression, and an "
        f"impression is exported once it is this old (default {DEFAULT_WINDOW_S:g})",
    )
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group (one per output directory)")
    parser.add_argument("--consumer", default=DEFAULT_CONSUMER, help="consumer name within the group")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="impressions read per call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    name = "din log export"
    if not args.window_s >= 0:
        print(f"{name}: --window-s must be >= 0, got {args.window_s}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.log_streams < 0:
        print(f"{name}: --batch must be >= 1 and --log-streams >= 0", file=sys.stderr)
        return 2
    if not args.group or not args.consumer:
        print(f"{name}: --group and --consumer must not be empty", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"{name}: --out {args.out}: not a directory", file=sys.stderr)
        return 2
    try:
        cfg = RedisConfig(url=args.redis_url, data_dir=args.redis_data, cluster=args.redis_cluster)
    except ConfigError as exc:
        print(f"{name}: --redis-cluster: {exc}", file=sys.stderr)
        return 2
    opts = ExportOptions(
        window_s=args.window_s,
        group=args.group,
        consumer=args.consumer,
        prefix=args.prefix,
        streams=log_streams(args.log_streams, args.redis_cluster),
        batch=args.batch,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        with redis_endpoint(cfg, share_running=True) as endpoint:
            client = sync_client(endpoint.url, cfg)
            try:
                stats = export_log(client, args.out, opts)
            finally:
                client.close()
    except ExportBusy as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except (RedisServerError, redis.RedisError, OSError) as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(stats.table())
    return 0
