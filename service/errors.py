"""The service's exception tree. `routes.install_error_handlers` maps it to HTTP in one place.

Every error answers the same JSON body: {"error": code, "message": text, "request_id": id, ...}.
"""

from __future__ import annotations

from typing import Any


class DinError(Exception):
    """Base of every error the service raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BundleError(DinError):
    """The model bundle is missing, corrupt or inconsistent: the service must not start."""

    code = "bundle_error"


class ServiceUnavailable(DinError):
    status = 503
    code = "unavailable"


class QueueFull(ServiceUnavailable):
    """The batching queue is full: shed load at once, with Retry-After."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class StoreDown(ServiceUnavailable):
    """Redis did not answer (only for operations that cannot degrade, e.g. writes)."""

    code = "store_unavailable"


class NotReady(ServiceUnavailable):
    code = "not_ready"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class InferenceFailed(DinError):
    """ONNX Runtime failed on a batch; every request of that batch gets this error."""

    code = "inference_failed"
