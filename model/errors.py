"""The project's one exception tree. Every error din-rank raises on purpose is a `DinError`.

    DinError                      status 500, code internal_error
    ├── DataError                 input data cannot be read: names the file, line and reason (prepare, seed)
    │   └── RowError              a `din score` input row is malformed
    ├── ExportError               `din export` refused (export failed, parity above tolerance, no checkpoint)
    ├── BundleError               a bundle is missing, corrupt or inconsistent: the service must not serve it
    ├── StoreUnavailable          Redis did not answer, or answered with an error (reads degrade, writes 503)
    ├── RedisServerError          the private redis-server cannot be found, started or stopped
    │   └── RedisDataDirInUse     another process runs a redis-server on that data directory
    ├── StageFailed               a `din demo` stage (a `din` subcommand) failed
    ├── ConfigError               a setting names something unusable (an unreadable API keys file): exit 2
    ├── RequestRefused            4xx: the request itself is refused, before any work is done for it
    │   ├── Unauthorized          401 unauthorized, with WWW-Authenticate: Bearer (API keys are set)
    │   ├── RequestTimeout        408 request_timeout: the request's head or body did not arrive in time
    │   ├── PayloadTooLarge       413 payload_too_large: the body is larger than the limit (named)
    │   ├── HeadersTooLarge       431 headers_too_large: the request line and headers are too large
    │   ├── CorsRefused           400 cors_refused: a CORS preflight for an origin or method not allowed
    │   ├── NotFound              404 not_found: a file the service does not have (the explorer's, the docs')
    │   └── CannotExplain         422 cannot_explain: `explain` asked of a bundle without attention output
    ├── ReloadInProgress          409 reload_in_progress: one hot reload at a time
    ├── ReloadRejected            422 bundle_rejected: the new bundle failed verification; the old one serves
    ├── ReloadFailed              500 reload_failed: the new bundle loaded but could not be warmed up
    ├── ServiceUnavailable        503, the request may be retried
    │   ├── Overloaded            503 overloaded, with Retry-After: shed (queue full, or the request
    │   │                         cannot be answered within its deadline, or its deadline passed)
    │   ├── StoreDown             503 store_unavailable (operations that cannot degrade, e.g. writes)
    │   ├── StoreTimeout          503 store_timeout: a write was sent, no answer came; outcome unknown
    │   ├── StorePartial          503 store_partial: Redis Cluster wrote some users' events, not all
    │   │                         (the body names who was written, who was not, whose outcome is unknown)
    │   ├── NotReady              503 not_ready
    │   └── ShuttingDown          503 shutting_down
    └── InferenceFailed           500 inference_failed: every request of the failed batch gets it

`status` and `code` are what the service answers when one reaches HTTP (`service.errors` maps the tree
in one handler); command-line tools print the message and exit 2 (bad input) or 1 (a failure).
This module is torch-free and imports nothing of the project, so every package can raise from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DinError(Exception):
    """Base of every error raised on purpose. `body()` is the JSON the service answers with."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
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


class RequestRefused(DinError):
    """The request itself is refused (4xx) before any work is done for it."""

    status = 400
    code = "bad_request"


class Unauthorized(RequestRefused):
    """API keys are configured and the request carries none of them. The message never echoes a key."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class RequestTimeout(RequestRefused):
    """The request's head or body did not arrive within the read timeout (a slow or stalled client)."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(RequestRefused):
    """The request body is larger than the limit; refused before (or as soon as) it passes it."""

    status = 413
    code = "payload_too_large"


class HeadersTooLarge(RequestRefused):
    """The request line and headers together are larger than the limit."""

    status = 431
    code = "headers_too_large"


class CorsRefused(RequestRefused):
    """A CORS preflight asked for an origin, method or headers that DIN_CORS_ORIGINS does not allow."""

    code = "cors_refused"


class NotFound(RequestRefused):
    status = 404
    code = "not_found"


class CannotExplain(RequestRefused):
    """`/rank` with `explain` while the model serving has no attention output (its bundle was exported
    before explanations existed): re-exporting it with this version's `din export` adds it."""

    status = 422
    code = "cannot_explain"


class ReloadInProgress(DinError):
    """Another hot reload is running; this one was not started."""

    status = 409
    code = "reload_in_progress"


class ReloadRejected(DinError):
    """A hot reload's bundle failed verification or could not be loaded; the live model keeps serving."""

    status = 422
    code = "bundle_rejected"


class ReloadFailed(DinError):
    """A hot reload's model loaded but failed its warm-up; the live model keeps serving."""

    code = "reload_failed"


class ServiceUnavailable(DinError):
    status = 503
    code = "unavailable"


class Overloaded(ServiceUnavailable):
    """Load shed at once, with Retry-After. `reason`: queue_full, deadline (it could not be answered
    within its budget, judged at the door) or timeout (its budget ran out while it waited)."""

    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, reason=reason)


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
