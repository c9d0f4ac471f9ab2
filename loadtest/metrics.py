"""The server's own view of a load-test step, from its Prometheus `/metrics` scraped before and after.

The deltas of each phase histogram's `_sum` and `_count` give the server-side mean per phase (Redis,
queue wait, inference, batch sizes) over exactly the step's requests, next to the client's latencies.
The metric names are the service's (`service/metrics.py`); they are spelled out here rather than
imported so the load generator needs nothing from the server package, and the test against the real
app checks that they still match.
"""

from __future__ import annotations

from typing import Any

# {(sample name, sorted labels): value}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Server histograms whose (sum, count) deltas give a mean per phase: (label, metric, label filter, unit).
PHASES: tuple[tuple[str, str, dict[str, str], str], ...] = (
    ("server /rank (end to end)", "din_request_latency_seconds", {"route": "/rank"}, "ms"),
    ("redis history read", "din_redis_latency_seconds", {}, "ms"),
    ("queue wait (per request)", "din_queue_wait_seconds", {}, "ms"),
    ("inference (per batch)", "din_inference_latency_seconds", {}, "ms"),
    ("batch size (requests)", "din_batch_requests", {}, "x"),
    ("batch size (candidates)", "din_batch_candidates", {}, "x"),
)
COUNTERS = ("din_degraded_responses", "din_queue_rejections", "din_batch_failures")


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    # Imported here: prometheus_client is in the `serve` extra, and only a scrape needs it.
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _total(samples: Samples, name: str, match: dict[str, str]) -> float:
    """Sum of `name` over every label set that includes `match` (e.g. all Redis ops together)."""
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all((k, x) in labels for k, x in match.items())
    )


def server_phases(before: Samples, after: Samples) -> dict[str, Any]:
    """Means of the server's phase histograms over the run (delta of _sum / delta of _count)."""
    phases = []
    for label, metric, match, unit in PHASES:
        count = _total(after, metric + "_count", match) - _total(before, metric + "_count", match)
        total = _total(after, metric + "_sum", match) - _total(before, metric + "_sum", match)
        mean = total / count if count > 0 else None
        if mean is not None and unit == "ms":
            mean *= 1000.0
        phases.append({"phase": label, "metric": metric, "count": int(count), "mean": mean, "unit": unit})
    counters = {}
    for name in COUNTERS:
        counters[name] = _total(after, name + "_total", {}) - _total(before, name + "_total", {})
    return {"phases": phases, "counters": counters}
