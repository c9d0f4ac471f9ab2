"""The project's one exception tree. Every error din-rank raises on purpose is a `DinError`.

    DinError                      code internal_error
    ├── DataError                 input data cannot be read: names the file, line and reason (prepare, seed)
    │   └── RowError              a `din score` input row is malformed
    ├── ExportError               `din export` refused (export failed, parity above tolerance, no checkpoint)
    ├── BundleError               a bundle is missing, corrupt or inconsistent: the service must not serve it
    ├── StoreUnavailable          Redis did not answer, or answered with an error (reads degrade, writes fail)
    ├── RedisServerError          the private redis-server cannot be found, started or stopped
    │   └── RedisDataDirInUse     another process runs a redis-server on that data directory
    ├── StageFailed               a `din demo` stage (a `din` subcommand) failed
    ├── ConfigError               a setting names something unusable (an unreadable API keys file): exit 2
    ├── InvalidArgument           invalid_argument: an option or parameter out of its range (synth, prepare,
    │                             train): names it and what it may be; exit 2
    ├── ExportBusy                export_busy: another `din log export` of the group holds the directory
    ├── RequestRefused            bad_request: the request itself is refused, before any work is done for it
    │   ├── Unauthorized          unauthorized: API keys are set and the request carries none of them
    │   ├── RequestTimeout        request_timeout: the request's head or body did not arrive in time
    │   ├── PayloadTooLarge       payload_too_large: the body is larger than the limit (named)
    │   ├── HeadersTooLarge       headers_too_large: the request line and headers are too large
    │   ├── CorsRefused           cors_refused: a CORS preflight for an origin or method not allowed
    │   ├── NotFound              not_found: a file the service does not have (the explorer's, the docs')
    │   └── CannotExplain         cannot_explain: `explain` asked of a bundle without attention output
    ├── ReloadInProgress          reload_in_progress: one hot reload at a time
    ├── ReloadRejected            bundle_rejected: the new bundle failed verification; the old one serves
    ├── ReloadFailed              reload_failed: the new bundle loaded but could not be warmed up
    ├── ServiceUnavailable        unavailable: the request may be retried
    │   ├── Overloaded            overloaded, retry after `retry_after_s`: shed (queue full, or the request
    │   │                         cannot be answered within its deadline, or its deadline passed)
    │   ├── StoreDown             store_unavailable (operations that cannot degrade, e.g. writes)
    │   ├── StoreTimeout          store_timeout: a write was sent, no answer came; outcome unknown
    │   ├── StorePartial          store_partial: Redis Cluster wrote some users' events, not all
    │   │                         (the body names who was written, who was not, whose outcome is unknown)
    │   ├── NotReady              not_ready
    │   └── ShuttingDown          shutting_down
    └── InferenceFailed           inference_failed: every request of the failed batch gets it

`code` (and `body()`) say what went wrong in any transport; which HTTP status and headers an error
answers with is the service's business (`service.errors` maps the tree in one place). Command-line
tools print the message and exit 2 (bad input) or 1 (a failure). This module is torch-free and
imports nothing of the project, so every package can raise from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DinError(Exception):
    """Base of every error raised on purpose. `body()` is the JSON the service answers with; `extra`
    (keyword arguments) goes into it as it is."""

    code: str = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class DataError(DinError):
    """Input data that cannot be read or prepared; the message names the file, line and reason."""

    code = "data_error"


class RowError(DataError):
    """A `din score` input row is malformed; the message names the line."""


class ExportError(DinError):
    """`din export` refused to write a bundle."""

    code = "export_error"


class BundleError(DinError):
    """The model bundle is missing, corrupt or inconsistent: the service must not serve it."""

    code = "bundle_error"


class StoreUnavailable(DinError):
    """Redis did not answer (connection refused, timeout) or answered with an error."""

    code = "store_unavailable"


class RedisServerError(DinError):
    """The private redis-server could not be found, started or stopped."""

    code = "redis_server_error"


class RedisDataDirInUse(RedisServerError):
    """Another process already runs a redis-server on this data directory."""

    def __init__(self, data_dir: Path, url: str | None) -> None:
        self.data_dir = data_dir
        self.url = url
        where = f" at {url}" if url else ""
        super().__init__(f"data directory {data_dir} is in use by another embedded redis-server{where}")


class StageFailed(DinError):
    """A `din demo` stage failed; its own output has already said why."""

    code = "stage_failed"


class ConfigError(DinError):
    """A setting names something that cannot be used (e.g. an API keys file that cannot be read); the
    message names the setting and the file. `din serve` prints it and exits 2."""

    code = "config_error"


class InvalidArgument(DinError):
    """An option or parameter is out of its range (`din synth --items 3`, `din train --batch-size 1`);
    the message names it and what it may be. Command-line tools print it and exit 2."""

    code = "invalid_argument"


class RoutingError(InvalidArgument):
    """A routing of model versions that cannot be in force (`contracts.routing`): a bad weight, a
    version this replica cannot load, more versions than DIN_MAX_MODELS. `detail` names the field."""

    code = "invalid_routing"

    def __init__(self, message: str, field: str = "routing") -> None:
        super().__init__(message, detail=[{"field": field, "message": message}])
        self.field = field


class RoutingConflict(DinError):
    """The routing changed meanwhile (a stale `expected_revision`), or a per-replica reload was asked
    while a routing is in force (the fleet's versions change through the routing, not one replica)."""

    code = "routing_conflict"


class ExportBusy(DinError):
    """Another `din log export` of the same consumer group holds the output directory's lock."""

    code = "export_busy"


class RequestRefused(DinError):
    """The request itself is refused before any work is done for it."""

    code = "bad_request"


class Unauthorized(RequestRefused):
    """API keys are configured and the request carries none of them. The message never echoes a key."""

    code = "unauthorized"


class RequestTimeout(RequestRefused):
    """The request's head or body did not arrive within the read timeout (a slow or stalled client)."""

    code = "request_timeout"


class PayloadTooLarge(RequestRefused):
    """The request body is larger than the limit; refused before (or as soon as) it passes it."""

    code = "payload_too_large"


class HeadersTooLarge(RequestRefused):
    """The request line and headers together are larger than the limit."""

    code = "headers_too_large"


class CorsRefused(RequestRefused):
    """A CORS preflight asked for an origin, method or headers that DIN_CORS_ORIGINS does not allow."""

    code = "cors_refused"


class NotFound(RequestRefused):
    code = "not_found"


class CannotExplain(RequestRefused):
    """`/rank` with `explain` while the model serving has no attention output (its bundle was exported
    before explanations existed): re-exporting it with this version's `din export` adds it."""

    code = "cannot_explain"


class ReloadInProgress(DinError):
    """Another hot reload is running; this one was not started."""

    code = "reload_in_progress"


class ReloadRejected(DinError):
    """A hot reload's bundle failed verification or could not be loaded; the live model keeps serving."""

    code = "bundle_rejected"


class ReloadFailed(DinError):
    """A hot reload's model loaded but failed its warm-up; the live model keeps serving."""

    code = "reload_failed"


class ServiceUnavailable(DinError):
    code = "unavailable"


class Overloaded(ServiceUnavailable):
    """Load shed at once, with Retry-After. `reason`: queue_full, deadline (it could not be answered
    within its budget, judged at the door) or timeout (its budget ran out while it waited)."""

    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: int = 1) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s  # when a retry may succeed


class StoreDown(ServiceUnavailable):
    """Redis did not answer (only for operations that cannot degrade, e.g. writes)."""

    code = "store_unavailable"


class StoreTimeout(ServiceUnavailable):
    """A write reached Redis but its answer did not come back (timeout, connection lost): it may or
    may not have been applied. Retrying with the same idempotency keys (event ids) is safe."""

    code = "store_timeout"


class StorePartial(ServiceUnavailable):
    """Redis Cluster: a write is atomic per user, and some users' events were written while others'
    were not (or were sent and not confirmed). The body says exactly which: `written_users`,
    `not_written_users`, `unknown_users`. Retrying the call with the same event ids is safe.
    `detail` is for the log (it names nodes and Redis errors), never for clients."""

    code = "store_partial"

    def __init__(self, message: str, *, detail: str = "", **extra: Any) -> None:
        super().__init__(message, **extra)
        self.detail = detail


class NotReady(ServiceUnavailable):
    code = "not_ready"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class InferenceFailed(DinError):
    """ONNX Runtime failed on a batch; every request of that batch gets this error."""

    code = "inference_failed"
