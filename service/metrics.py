"""Prometheus metrics, one CollectorRegistry per app (tests build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets from 0.1 ms to 2.5 s: local Redis and small batches live well under 1 ms.
_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_REQUESTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_CANDIDATES = (1, 10, 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "din_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "din_request_latency_seconds",
            "HTTP request latency, end to end",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.redis_latency = Histogram(
            "din_redis_latency_seconds", "Redis round trip by operation", ["op"], buckets=_LATENCY, registry=r
        )
        self.queue_latency = Histogram(
            "din_queue_wait_seconds",
            "time a /rank request waited for its batch to start",
            buckets=_LATENCY,
            registry=r,
        )
        self.inference_latency = Histogram(
            "din_inference_latency_seconds", "ONNX Runtime call per batch", buckets=_LATENCY, registry=r
        )
        self.batch_requests = Histogram(
            "din_batch_requests", "requests per ONNX Runtime call", buckets=_BATCH_REQUESTS, registry=r
        )
        self.batch_candidates = Histogram(
            "din_batch_candidates", "candidates per ONNX Runtime call", buckets=_BATCH_CANDIDATES, registry=r
        )
        self.candidates_scored = Counter("din_candidates_scored", "candidates scored", registry=r)
        self.degraded = Counter(
            "din_degraded_responses",
            "/rank answers served without Redis history, by reason",
            ["reason"],
            registry=r,
        )
        self.queue_admitted = Counter("din_queue_admitted", "/rank requests taken into the queue", registry=r)
        self.queue_depth = Gauge("din_queue_depth", "requests waiting for a batch", registry=r)
        self.inflight_batches = Gauge("din_inflight_batches", "batches being computed", registry=r)
        self.batch_failures = Counter(
            "din_batch_failures", "batches that failed, by reason", ["reason"], registry=r
        )
        self.queue_rejections = Counter(
            "din_queue_rejections",
            "/rank requests refused before queueing, by reason",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "din_cancelled_requests", "requests dropped because the caller went away", registry=r
        )
        self.events_written = Counter("din_events_written", "behaviours appended through /events", registry=r)
        self.events_duplicates = Counter(
            "din_events_duplicates", "events /events skipped: their event_id was already written", registry=r
        )
        self.events_failures = Counter(
            "din_events_failures",
            "/events calls that failed, by reason (store_unavailable: nothing written, store_timeout: "
            "outcome unknown)",
            ["reason"],
            registry=r,
        )
        self.impressions_logged = Counter(
            "din_impressions_logged", "impressions written to the log (confirmed by Redis)", registry=r
        )
        self.impressions_dropped = Counter(
            "din_impressions_dropped",
            "impressions not logged, by reason (buffer_full, redis_down, redis_error, unconfirmed: sent but "
            "not confirmed, it may be in the log; shutdown: still buffered when the service stopped)",
            ["reason"],
            registry=r,
        )
        self.impressions_buffered = Gauge(
            "din_impressions_buffered", "impressions waiting to be written to the log", registry=r
        )
        self.feedback_logged = Counter(
            "din_feedback_logged", "feedback records (/events naming an impression) written", registry=r
        )
        self.feedback_lost = Counter(
            "din_feedback_lost",
            "feedback of events that were written to histories but not to the log (Redis Cluster only)",
            registry=r,
        )
        self.model_info = Info(
            "din_model", "the live bundle (the default member of the model set)", registry=r
        )
        self.models_info = Info(
            "din_models", "each member of the model set: its bundle", ["model"], registry=r
        )
        self.model_batches = Counter(
            "din_model_batches",
            "ONNX Runtime calls by member and version",
            ["model", "model_version"],
            registry=r,
        )
        # several versions (service.routing, service.shadow): per arm, per shadow, the routing itself
        self.arm_requests = Counter(
            "din_arm_requests",
            "/rank answers by arm and model version (arm `(none)`: no routing in force)",
            ["arm", "model_version"],
            registry=r,
        )
        self.arm_latency = Histogram(
            "din_arm_latency_seconds",
            "/rank answers' time in the service by arm and model version",
            ["arm", "model_version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.arm_degraded = Counter(
            "din_arm_degraded",
            "/rank answers served without Redis history, by arm and model version",
            ["arm", "model_version"],
            registry=r,
        )
        self.arm_shed = Counter(
            "din_arm_shed",
            "/rank requests refused (503 overloaded) after their arm was known, by arm, version and reason",
            ["arm", "model_version", "reason"],
            registry=r,
        )
        self.shadow_scored = Counter(
            "din_shadow_scored", "requests a shadow version scored", ["model_version"], registry=r
        )
        self.shadow_shed = Counter(
            "din_shadow_shed",
            "shadow scorings dropped, by reason (queue_full, too_old: the CPU had no idle time for it; "
            "failed; shutdown)",
            ["model_version", "reason"],
            registry=r,
        )
        self.shadow_overlap = Histogram(
            "din_shadow_topk_overlap",
            "share of the served answer's items a shadow would have shown too (its top k, k = returned)",
            ["model_version"],
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.routing_revision = Gauge(
            "din_routing_revision", "revision of the routing in force here (0: none)", registry=r
        )
        self.routing_refused = Counter(
            "din_routing_refused",
            "routings read from Redis that this replica could not put in force (reason in /admin/models)",
            registry=r,
        )
        self.model_memory = Gauge(
            "din_model_memory_bytes",
            "resident memory a live model version took when it was loaded",
            ["model_version"],
            registry=r,
        )
        self.reloads = Counter(
            "din_reloads", "hot reloads, by outcome (ok, rejected, failed, busy)", ["outcome"], registry=r
        )
        self.ready = Gauge(
            "din_ready", "1 when the replica can answer: model loaded and warm, not draining", registry=r
        )
        self.redis_up = Gauge(
            "din_redis_up",
            "1 when Redis answered /readyz's last ping; 0 while /rank answers degraded",
            registry=r,
        )
        self.warmup_seconds = Gauge("din_warmup_seconds", "time the warm-up took", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
