"""Service settings: the one place that reads the environment (prefix `DIN_`).

`din serve` generates its flags from these fields (`redis_url` <-> `--redis-url` <-> `DIN_REDIS_URL`),
so the CLI, the environment and the docs can never drift apart.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.errors import ConfigError
from service.store.config import RedisConfig, check_redis_mode, node_list
from service.store.keys import DEFAULT_PREFIX, log_streams


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIN_", extra="ignore", frozen=True)

    # ---------------------------------------------------------------- model
    bundle: Path = Field(Path("runs/bundle"), description="bundle directory written by `din export`")
    providers: str = Field(
        "auto",
        description="ONNX Runtime execution providers: 'auto' (CUDA when available, then CPU) "
        "or a comma-separated list, e.g. 'CPUExecutionProvider'",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads inside one call (0 = auto: the usable cores divided among the "
        "inference workers, so 1 when there is a worker per core)",
    )
    warmup_rounds: int = Field(
        3, ge=0, description="warm-up passes over several shapes before /readyz is ready"
    )
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="which serving graph runs: fp32 (model.onnx), int8 (model.int8.onnx: the bundle must "
        "have it, written only when it passed the export's quality gate) or auto (time both on this "
        "machine at load and keep the faster; fp32 when the bundle has no int8 graph)",
    )

    # ---------------------------------------------------------------- redis
    redis_url: str | None = Field(
        None, description="Redis URL; unset = start a private redis-server (data on disk, append-only)"
    )
    redis_data: Path | None = Field(
        None, description="data directory of the private redis-server (unset = the default data dir)"
    )
    redis_prefix: str = Field(
        DEFAULT_PREFIX, description="key prefix; histories live at {prefix}hist:{user_id}"
    )
    redis_connect_timeout_ms: int = Field(200, gt=0, description="Redis connect timeout (ms)")
    redis_timeout_ms: int = Field(100, gt=0, description="Redis command timeout (ms); slower = degraded")
    redis_max_connections: int = Field(
        64, gt=0, description="Redis connection pool size (per node in a cluster)"
    )
    redis_cluster: bool = Field(
        False,
        description="DIN_REDIS_URL names one node of a Redis Cluster: reads are grouped by node, /events is "
        "atomic per user, failovers are followed without a restart",
    )
    redis_read_from_replicas: bool = Field(
        False,
        description="Redis Cluster: history reads go to the replicas (round robin; their master when one "
        "refuses); a replica may lag its master by a few milliseconds",
    )
    redis_cluster_nodes: str = Field(
        "",
        description="Redis Cluster: more nodes to discover it through (host:port, comma-separated) besides "
        "DIN_REDIS_URL's, so a replica started while that node is down still finds the cluster",
    )

    # ---------------------------------------------------------------- http
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 = any free port)")

    # ---------------------------------------------------------------- request limits
    max_candidates: int = Field(1000, ge=1, description="most candidates per /rank request")
    max_id_length: int = Field(256, ge=1, description="longest user or item id (characters)")
    max_request_history: int = Field(
        1000, ge=1, description="longest explicit `history` in /rank (longer than the model's T is truncated)"
    )
    max_explain_top: int = Field(
        100,
        ge=1,
        description="largest `explain_top` in /rank: behaviours listed in each of `because` and `against` "
        "per item with `explain`",
    )
    max_explain_items: int = Field(
        100,
        ge=1,
        description="with `explain`, most items a /rank may return (`top_k`, or every candidate without "
        "it): each is scored again without each behaviour of the history (T head passes an item)",
    )
    max_events: int = Field(1000, ge=1, description="most events per /events request")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="largest request body; larger answers 413 before it is read"
    )
    request_read_timeout_s: float = Field(
        10.0, gt=0, description="a request whose headers and body take longer to arrive answers 408"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")

    # ---------------------------------------------------------------- overload and deadlines
    request_timeout_ms: float = Field(
        250.0,
        gt=0,
        description="the whole budget of a /rank, from arrival to answer: a request that cannot be answered "
        "in it is shed at once (503 overloaded), one whose deadline passed is never computed",
    )

    # ---------------------------------------------------------------- events
    events_dedup_ttl_s: int = Field(
        86400, ge=1, description="how long an event_id is remembered: a retry within it is not written twice"
    )

    # ---------------------------------------------------------------- impression log
    log_impressions: bool = Field(
        False,
        description="log every /rank answer (the history scored, the candidates returned with scores and "
        "positions, the version) to Redis Streams, and /events' feedback naming an impression; off the "
        "request path: a bounded buffer, records dropped and counted when it is full or Redis is down",
    )
    log_sample_rate: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of impressions logged, decided by the impression id itself (the same id is "
        "always in or out of the sample, on every replica; feedback is recorded for sampled ones only)",
    )
    log_maxlen: int = Field(
        100_000,
        ge=1,
        description="retention: about this many impressions kept (split over the log's streams; feedback "
        "likewise), trimmed approximately (XADD MAXLEN ~) as records are added",
    )
    log_candidates: int = Field(
        0, ge=0, description="candidates logged per impression, best first (0 = every returned one)"
    )
    log_buffer: int = Field(
        10_000, ge=1, description="impressions waiting to be written; beyond it they are dropped and counted"
    )
    log_streams: int = Field(
        0,
        ge=0,
        le=1024,
        description="streams the log is spread over (0 = 1 on a single Redis, 8 on a Redis Cluster, spread "
        "evenly over the slots so every master holds some)",
    )

    # ---------------------------------------------------------------- security
    api_keys: str | None = Field(
        None,
        description="comma-separated API keys; when set (or api_keys_file), every route but /healthz, "
        "/readyz (and /metrics unless metrics_auth) needs `Authorization: Bearer <key>`",
    )
    api_keys_file: Path | None = Field(
        None, description="a file with one API key per line (added to api_keys)"
    )
    metrics_auth: bool = Field(False, description="/metrics needs an API key too (when keys are set)")
    cors_origins: str | None = Field(
        None, description="comma-separated origins allowed by CORS (unset: no CORS headers at all)"
    )

    # ---------------------------------------------------------------- lifecycle
    shutdown_drain_s: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM, /readyz answers 503 shutting_down at once and the service keeps answering "
        "this long (for load balancers to notice) before it stops taking requests",
    )

    # ---------------------------------------------------------------- batching
    batch_max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="a batch closes when its first request has waited this long (ms) and an inference slot "
        "is free; 0 = as soon as a slot is free (requests arriving during a computation join the next batch)",
    )
    batch_max_candidates: int = Field(
        400,
        ge=1,
        description="a batch closes when it holds this many candidates (a larger request runs alone); "
        "small batches keep the graph's working set in cache: at T=100 two users of 200 candidates ran "
        "35% faster end to end than eight (make bench)",
    )
    queue_max: int = Field(
        1024, ge=1, description="requests waiting for a batch; beyond this /rank answers 503"
    )
    inference_workers: int = Field(
        0,
        ge=0,
        description="ONNX Runtime calls run at once, from one session (0 = auto: one per usable core, "
        "at most 8; usable = the CPU affinity, capped by a cgroup CPU limit). Batches side by side, one "
        "core each, beat one batch split across the cores: 16-25% more /rank throughput on 2 cores (README)",
    )
    max_inflight_batches: int = Field(
        0,
        ge=0,
        description="batches in flight (0 = auto: the inference workers + 2): while the workers compute, "
        "the next batches read their histories from Redis, so the model never waits for a round trip",
    )

    # ---------------------------------------------------------------- several model versions
    routing_poll_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often the routing of model versions (A/B arms, shadows) is read from Redis: every "
        "replica follows a change within this (plus the new versions' load and warm-up)",
    )
    max_models: int = Field(
        4,
        ge=1,
        le=32,
        description="model versions live at once in this process (the configured bundle, every arm's and "
        "every shadow's): a routing that needs more is refused (each version is an ONNX Runtime session "
        "and its memory; /admin/models reports it)",
    )
    shadow_queue_max: int = Field(
        256,
        ge=1,
        description="shadow scorings waiting (they run on idle CPU only, after the answer is sent): beyond "
        "this, or older than shadow_max_age_ms, one is shed and counted (din_shadow_shed_total)",
    )
    shadow_max_age_ms: float = Field(
        2000.0, gt=0, description="a shadow scoring not started this long after its answer is shed"
    )
    shadow_yield: bool = Field(
        True,
        description="shadows take only the gaps between served graph calls: 32 candidates at a time, "
        "started once none has run for 1 ms, and a slice a served call starts beside is stopped at once "
        "and done again later (false: whenever a core is idle; far more of them scored near capacity, "
        "the served graph calls slowed by the sharing: README)",
    )

    # ---------------------------------------------------------------- logging
    log_json: bool = Field(False, description="log one JSON object per line")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _cluster_nodes(cls, value: str, info: ValidationInfo) -> str:
        """host:port entries, and only with Redis Cluster (ConfigError's reason, with the flag's name)."""
        try:
            check_redis_mode(
                info.data.get("redis_url"),
                info.data.get("redis_prefix", DEFAULT_PREFIX),
                cluster=bool(info.data.get("redis_cluster", False)),
                read_from_replicas=bool(info.data.get("redis_read_from_replicas", False)),
                cluster_nodes=node_list(value),
            )
        except ConfigError as e:
            raise ValueError(e.message) from e
        return value

    @field_validator("redis_cluster", "redis_read_from_replicas")
    @classmethod
    def _redis_mode(cls, value: bool, info: ValidationInfo) -> bool:
        """Refuse what cannot work (no URL, a unix socket, braces in the prefix) here, with the
        flag's name, rather than at the first request: `check_redis_mode` says why."""
        data = info.data
        cluster = value if info.field_name == "redis_cluster" else data.get("redis_cluster", False)
        replicas = value if info.field_name == "redis_read_from_replicas" else False
        try:
            check_redis_mode(
                data.get("redis_url"),
                data.get("redis_prefix", DEFAULT_PREFIX),
                cluster=bool(cluster),
                read_from_replicas=bool(replicas),
            )
        except ConfigError as e:
            raise ValueError(e.message) from e
        return value

    @property
    def workers(self) -> int:
        """ONNX Runtime calls at once (DIN_INFERENCE_WORKERS, resolved)."""
        return self.inference_workers or min(8, usable_cores())

    @property
    def threads_per_call(self) -> int:
        """ONNX Runtime intra-op threads (DIN_INTRA_OP_THREADS, resolved)."""
        return self.intra_op_threads or max(1, usable_cores() // self.workers)

    @property
    def inflight_batches(self) -> int:
        """Batches in flight (DIN_MAX_INFLIGHT_BATCHES, resolved): never fewer than the workers."""
        return max(self.max_inflight_batches or self.workers + 2, self.workers)

    @property
    def request_budget_s(self) -> float:
        """A /rank's whole budget, from arrival to answer (DIN_REQUEST_TIMEOUT_MS, in seconds)."""
        return self.request_timeout_ms / 1000

    @property
    def log_shards(self) -> int:
        """Streams of the impression log (DIN_LOG_STREAMS, resolved)."""
        return log_streams(self.log_streams, self.redis_cluster)

    @property
    def provider_list(self) -> list[str] | None:
        """Explicit providers, or None for 'auto'."""
        if self.providers.strip().lower() == "auto":
            return None
        return [p.strip() for p in self.providers.split(",") if p.strip()]

    @property
    def redis(self) -> RedisConfig:
        """Where and how to reach Redis (service.store.client): the one place that builds it from the
        settings. Each access builds it afresh (a `model_copy` with another URL must not see a stale
        one), so a caller reads it once."""
        return RedisConfig(
            url=self.redis_url,
            data_dir=self.redis_data,
            prefix=self.redis_prefix,
            connect_timeout_s=self.redis_connect_timeout_ms / 1000,
            timeout_s=self.redis_timeout_ms / 1000,
            max_connections=self.redis_max_connections,
            cluster=self.redis_cluster,
            read_from_replicas=self.redis_read_from_replicas,
            cluster_nodes=node_list(self.redis_cluster_nodes),
        )


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    or a Kubernetes pod's CPU limit: cpu.max "200000 100000" is 2 cores), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)
