"""Writing an impression log as the service does and exporting it with the real exporter, shared by the
tests of `din log export` and of retraining on its output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import redis

from contracts.records import Feedback, Impression
from loop.export import ExportOptions, ExportStats, export_log
from service.store.keys import feedback_key, impressions_key
from service.store.streams import FIELD


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def log_records(url: str, records: list[Impression | Feedback]) -> None:
    """XADD each record as the service's writers do: one field, the record's JSON."""
    r = client(url)
    try:
        with r.pipeline(transaction=False) as pipe:
            for rec in records:
                key = impressions_key("din:") if isinstance(rec, Impression) else feedback_key("din:")
                pipe.xadd(key, {FIELD: orjson.dumps(rec)})
            pipe.execute()
    finally:
        r.close()


def export(url: str, out: Path, now: float, window_s: float = 5.0, **kw: Any) -> ExportStats:
    """`din log export` of everything older than the window at `now`, into `out`."""
    r = client(url)
    try:
        return export_log(r, out, ExportOptions(window_s=window_s, **kw), now=lambda: now)
    finally:
        r.close()
