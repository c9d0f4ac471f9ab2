"""loadtest.metrics: the server-side phase means are deltas of /metrics scraped before and after a step."""

from __future__ import annotations

import pytest

from loadtest.metrics import COUNTERS, PHASES, parse_metrics, server_phases

BEFORE = """\
din_request_latency_seconds_count{route="/rank"} 10
din_request_latency_seconds_sum{route="/rank"} 0.5
din_request_latency_seconds_count{route="/healthz"} 99
din_request_latency_seconds_sum{route="/healthz"} 9
din_redis_latency_seconds_count{op="history"} 4
din_redis_latency_seconds_sum{op="history"} 0.004
din_batch_requests_count 2
din_batch_requests_sum 10
din_queue_rejections_total{reason="full"} 1
"""
AFTER = """\
din_request_latency_seconds_count{route="/rank"} 20
din_request_latency_seconds_sum{route="/rank"} 0.7
din_request_latency_seconds_count{route="/healthz"} 150
din_request_latency_seconds_sum{route="/healthz"} 20
din_redis_latency_seconds_count{op="history"} 8
din_redis_latency_seconds_sum{op="history"} 0.008
din_redis_latency_seconds_count{op="append"} 2
din_redis_latency_seconds_sum{op="append"} 0.002
din_batch_requests_count 4
din_batch_requests_sum 16
din_queue_rejections_total{reason="full"} 4
din_queue_rejections_total{reason="draining"} 2
"""


def test_server_phases_are_deltas() -> None:
    out = server_phases(parse_metrics(BEFORE), parse_metrics(AFTER))
    phases = {p["metric"]: p for p in out["phases"]}
    assert list(phases) == [m for _, m, _, _ in PHASES]
    # Only route="/rank" counts for the end-to-end phase; seconds become ms.
    rank = phases["din_request_latency_seconds"]
    assert rank["count"] == 10 and rank["mean"] == pytest.approx(20.0) and rank["unit"] == "ms"
    # Every label set of a metric without a filter counts (all Redis ops together).
    assert phases["din_redis_latency_seconds"]["count"] == 6
    assert phases["din_redis_latency_seconds"]["mean"] == pytest.approx(1.0)
    batch = phases["din_batch_requests"]
    assert batch["count"] == 2 and batch["mean"] == pytest.approx(3.0) and batch["unit"] == "x"
    # A phase with no samples in the step has no mean (not 0).
    assert phases["din_inference_latency_seconds"] == {
        "phase": "inference (per batch)",
        "metric": "din_inference_latency_seconds",
        "count": 0,
        "mean": None,
        "unit": "ms",
    }
    assert out["counters"] == {name: 0.0 for name in COUNTERS} | {"din_queue_rejections": 5.0}
