"""The wire format: request and response models, and the JSON response class.

Each request model is declared once, here. Its per-deployment limits (DIN_MAX_CANDIDATES and the
others) are those of the app serving the request: `RequestLimits` puts the app's `Limits` in force for
each request, and every bound marked `AtMost` reads them when a body is validated (failing with
pydantic's own error for that bound) and when the OpenAPI schema is written (so the docs show the
limits actually enforced)."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticKnownError, core_schema
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.records import IMPRESSION_ID_PATTERN
from service.config import Settings


class JSONResponse(Response):
    """JSON rendered by orjson (numpy-free floats, compact)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ------------------------------------------------------------------ request limits


@dataclass(frozen=True)
class Limits:
    """One app's request limits, from its Settings."""

    id_length: int  # a user or item id, in characters
    candidates: int  # per /rank (and its top_k)
    request_history: int  # an explicit /rank `history`
    explain_top: int  # `explain_top`
    events: int  # per /events
    items: int  # per /ui/items: what one ranking shows (its candidates and its history)

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            id_length=settings.max_id_length,
            candidates=settings.max_candidates,
            request_history=settings.max_request_history,
            explain_top=settings.max_explain_top,
            events=settings.max_events,
            items=settings.max_candidates + settings.max_request_history,
        )


_in_force: ContextVar[Limits] = ContextVar("request_limits")


def limits_in_force() -> Limits:
    try:
        return _in_force.get()
    except LookupError:
        raise RuntimeError(
            "request models are validated by an app (RequestLimits puts its limits in force)"
        ) from None


class RequestLimits:
    """Pure ASGI middleware: `limits` are in force while this app answers a request (its body is
    validated, its /openapi.json written)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _in_force.set(self.limits)
        try:
            await self.app(scope, receive, send)
        finally:
            _in_force.reset(token)


# core schema type -> the JSON schema keyword and the error pydantic's own bound of that name answers
_BOUNDS = {
    "str": ("maxLength", "string_too_long"),
    "list": ("maxItems", "too_long"),
    "int": ("maximum", "less_than_equal"),
}


@dataclass(frozen=True)
class AtMost:
    """Annotated metadata: at most the limit named `limit` (a field of `Limits`) of the limits in force.
    A value over it fails as pydantic's own `max_length` / `le` would (the same error type and
    message), and the JSON schema documents it as they would (maxLength, maxItems, maximum)."""

    limit: str

    def bound(self) -> int:
        return int(getattr(limits_in_force(), self.limit))

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        kind = schema["type"]
        if kind == "str":
            return core_schema.no_info_after_validator_function(self._string, schema)
        if kind == "list":  # like pydantic's max_length: counted before the items are validated, and after
            return core_schema.no_info_wrap_validator_function(self._list, schema)
        if kind == "int":
            return core_schema.no_info_after_validator_function(self._int, schema)
        raise TypeError(f"AtMost bounds a str, a list or an int, not {kind}")

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        inner = schema.get("schema", schema)  # the validator function's: str, list or int
        out[_BOUNDS[inner["type"]][0]] = self.bound()
        return out

    def _string(self, value: str) -> str:
        if len(value) > (most := self.bound()):
            raise PydanticKnownError("string_too_long", {"max_length": most})
        return value

    def _list(self, value: Any, handler: Callable[[Any], list[Any]]) -> list[Any]:
        most = self.bound()
        if isinstance(value, list | tuple) and len(value) > most:
            self._too_long(most, len(value))
        out = handler(value)
        if len(out) > most:
            self._too_long(most, len(out))
        return out

    @staticmethod
    def _too_long(most: int, length: int) -> None:
        raise PydanticKnownError(
            "too_long", {"field_type": "List", "max_length": most, "actual_length": length}
        )

    def _int(self, value: int) -> int:
        if value > (most := self.bound()):
            raise PydanticKnownError("less_than_equal", {"le": most})
        return value


Id = Annotated[str, StringConstraints(strict=True, min_length=1), AtMost("id_length")]
# What /rank answers in `impression_id` (contracts.records: 48-bit ms time + 80 random bits, hex)
ImpressionId = Annotated[str, StringConstraints(strict=True, pattern=IMPRESSION_ID_PATTERN)]
IMPRESSION_HEADER = "X-Impression-Id"
ARM_HEADER = "X-Din-Arm"  # in a /rank request: the arm to serve it (QA); in its answer: the arm that did


# ------------------------------------------------------------------ requests

_RANK_EXAMPLE: dict[str, Any] = {
    "user_id": "A1B2C3D4",
    "candidates": ["B00ITEM001", "B00ITEM002", "B00ITEM003"],
    "top_k": 2,
}
_EVENTS_EXAMPLE: dict[str, Any] = {
    "events": [
        {"user_id": "A1B2C3D4", "item_id": "B00ITEM002", "ts": 1700000000},
        {
            "user_id": "A1B2C3D4",
            "item_id": "B00ITEM003",
            "ts": 1700000060,
            "event_id": "click-7f3a91",
            "impression_id": "018c2f6a9b1e4f0c2d7a8b9c0d1e2f3a",
        },
    ]
}


DEFAULT_EXPLAIN_TOP = 5
_EXPLAIN_DOC = (
    "add to each returned item `because` and `against`: the behaviours of the user's history that raised "
    "its score most and that lowered it most, by `contribution` = score with the history minus score "
    "with the same history less that one behaviour (exact). At most DIN_MAX_EXPLAIN_ITEMS returned items "
    "(set `top_k`); explained requests are shed first under load"
)
_EXPLAIN_TOP_DOC = "with `explain`: how many behaviours each item's `because` and `against` list at most"


def _default_explain_top() -> int:
    return min(DEFAULT_EXPLAIN_TOP, limits_in_force().explain_top)


def _document_explain_top_default(schema: dict[str, Any]) -> None:
    schema["default"] = _default_explain_top()


class RankRequest(BaseModel):
    """Rank `candidates` for `user_id`. Duplicate candidates are scored once (first occurrence kept)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_RANK_EXAMPLE]})

    user_id: Id = Field(description="user whose behaviour history is read from Redis")
    candidates: Annotated[list[Id], Field(min_length=1), AtMost("candidates")] = Field(
        description="item ids to rank; unknown ids are scored as out-of-vocabulary"
    )
    top_k: Annotated[int, Field(ge=1, strict=True), AtMost("candidates")] | None = Field(
        None, description="return only the best top_k items (after scoring all)"
    )
    history: Annotated[list[Id], AtMost("request_history")] | None = Field(
        None,
        description="the user's history, newest first; replaces the Redis read (truncated to the model's T)",
    )
    explain: bool = Field(False, strict=True, description=_EXPLAIN_DOC)
    explain_top: Annotated[int, Field(ge=1, strict=True), AtMost("explain_top")] = Field(
        default_factory=_default_explain_top,
        description=_EXPLAIN_TOP_DOC,
        json_schema_extra=_document_explain_top_default,
    )


_EVENT_ID_DOC = (
    "idempotency key: an event whose event_id was already written (within the dedup window, "
    "DIN_EVENTS_DEDUP_TTL_S) or appears earlier in the same call is skipped and counted in `duplicates`, "
    "so a retry with the same event_ids never writes an event twice; events without one are always written"
)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_id: Id
    ts: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        description="event time (any monotonic unit, e.g. unix seconds)",
    )
    event_id: Id | None = Field(None, description=_EVENT_ID_DOC)
    impression_id: ImpressionId | None = Field(
        None,
        description="the `impression_id` of the /rank answer this event acts on (e.g. a click on one of "
        "its items): with the impression log on (DIN_LOG_IMPRESSIONS), the event is also recorded as "
        "feedback for that impression, written with the event (a duplicate event records none). An "
        "unknown or expired impression is accepted (its feedback is kept, an orphan to the export)",
    )


class EventsRequest(BaseModel):
    """Append behaviours, all or nothing. Sorted by `ts` (stable; events without `ts` count as newest)
    before writing; an event whose `event_id` was already written is skipped."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EVENTS_EXAMPLE]})

    events: Annotated[list[Event], Field(min_length=1), AtMost("events")]


class ItemsRequest(BaseModel):
    """Item ids to look up in the served model's catalogue (the ranking explorer labels its heatmap)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"item_ids": ["B00ITEM001"]}]})

    item_ids: Annotated[list[Id], Field(min_length=1), AtMost("items")]


# ------------------------------------------------------------------ responses


class Because(BaseModel):
    item_id: str = Field(description="a behaviour of the user's history")
    position: int = Field(description="its index in the history the model saw (cut to T): 0 = newest")
    weight: float = Field(
        description="its attention weight for this item (the factor it enters the user's interest vector "
        "with); its size says nothing of the direction or size of its effect on the score"
    )
    contribution: float = Field(
        description="what it did to this item's score: score with the history the model saw minus score "
        "with that history less this one behaviour (the others kept, in order), in CTR units, exactly; "
        "> 0 raised it, < 0 lowered it"
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="predicted click-through rate in (0, 1)")
    because: list[Because] | None = Field(
        None,
        description="with `explain`: the behaviours that raised this item's score most (contribution > 0), "
        "largest first, at most `explain_top` (empty when none did, or nothing is explained)",
    )
    against: list[Because] | None = Field(
        None,
        description="with `explain`: the behaviours that lowered this item's score most (contribution < 0), "
        "most negative first, at most `explain_top`",
    )


class RankResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "A1B2C3D4",
                    "model_version": "din-attention-3f2a9c1b7e0d",
                    "items": [
                        {"item_id": "B00ITEM002", "score": 0.0831},
                        {"item_id": "B00ITEM001", "score": 0.0412},
                    ],
                    "history_length": 17,
                    "degraded": False,
                    "impression_id": "018c2f6a9b1e4f0c2d7a8b9c0d1e2f3a",
                }
            ]
        }
    )

    user_id: str
    model_version: str
    items: list[ScoredItem] = Field(description="sorted by score, descending")
    history_length: int = Field(description="behaviours the model saw (after truncation to T)")
    degraded: bool = Field(description="true when Redis could not be read and an empty history was used")
    impression_id: str = Field(
        description="this answer's id (also in the X-Impression-Id header): 32 hex digits, time-ordered "
        "and unique; send it with /events to record feedback on this answer",
        pattern=IMPRESSION_ID_PATTERN,
    )
    explained: bool | None = Field(
        None,
        description="with `explain`: true when `because` and `against` say what each behaviour did to the "
        "scores; false when nothing is explained (a degraded answer: the history could not be read)",
    )
    explain_note: str | None = Field(None, description="with `explain`, when `explained` is false: why")
    arm: str | None = Field(
        None,
        description="the routing arm that served it (also in the X-Din-Arm header); null when no routing "
        "of several model versions is in force",
    )
    routing_revision: int | None = Field(None, description="the revision of the routing that chose the arm")


class EventsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"written": 2, "duplicates": 0}]})

    written: int = Field(description="events appended to histories")
    duplicates: int = Field(description="events skipped: their event_id was already written")
    feedback: int | None = Field(
        None,
        description="with the impression log on (DIN_LOG_IMPRESSIONS): feedback records written for events "
        "naming an impression (events skipped as duplicates, or naming an impression outside the log's "
        "sample, record none)",
    )
    feedback_not_recorded: list[str] | None = Field(
        None,
        description="Redis Cluster only, where the feedback log lives on other nodes than the histories: the "
        "impression ids whose feedback could not be written though the event was (the event is in the "
        "history; a retry would be skipped as a duplicate and record nothing)",
    )


class CatalogueItem(BaseModel):
    item_id: str
    known: bool = Field(
        description="in the served model's vocabulary (unknown ids are scored as one OOV item)"
    )
    category: str | None = Field(
        description="its category id; null when unknown, or when the bundle has no item_categories.txt"
    )


class ItemsResponse(BaseModel):
    items: list[CatalogueItem] = Field(description="in the order asked")


class Suggestions(BaseModel):
    """What the ranking explorer (/ui) starts from: some users with a history, a sample of the catalogue,
    and the limits of this service."""

    model_version: str
    can_explain: bool = Field(description="the served model has the explaining graph `explain` runs")
    max_history: int = Field(description="T: behaviours the model sees, newest first")
    max_candidates: int
    max_explain_top: int
    max_explain_items: int = Field(description="with `explain`, most items a /rank may return")
    users: list[str] = Field(description="a few users with a history in Redis (empty when it cannot be read)")
    items: list[CatalogueItem] = Field(description="a random sample of the served model's catalogue")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. validation_error, overloaded")
    message: str
    request_id: str | None = None
    detail: list[FieldError] | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body cannot be parsed at all (e.g. it is not UTF-8)"},
    408: {"model": ErrorBody, "description": "request_timeout: the body did not arrive in time"},
    413: {"model": ErrorBody, "description": "payload_too_large: the body is larger than DIN_MAX_BODY_BYTES"},
    422: {"model": ErrorBody, "description": "invalid request; `detail` names each bad field"},
    503: {"model": ErrorBody, "description": "overloaded (with Retry-After) or a dependency is down"},
    500: {"model": ErrorBody, "description": "internal error (logged with the request id)"},
}


# ------------------------------------------------------------------ admin


class ReloadRequest(BaseModel):
    """Reload a bundle: load and verify it beside the live model, warm it up, then switch."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"bundle": "/models/bundle-v2"}]}
    )

    bundle: str | None = Field(
        None, min_length=1, max_length=4096, description="bundle directory (default: DIN_BUNDLE)"
    )


class ReloadResponse(BaseModel):
    model_version: str = Field(description="the model serving now")
    previous_version: str | None = Field(description="the model it replaced")
    bundle: str
    seconds: float = Field(description="load, verify and warm-up time")


# ------------------------------------------------------------------ routing of model versions

_VERSION_OR_BUNDLE = (
    "the version by its bundle directory (as every replica sees it), or by `model_version` when it is live "
    "on the replica that takes the change (either or both; both must agree)"
)


class ArmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    weight: float = Field(ge=0, le=1e6, description="share of the users, relative to the other arms'")
    bundle: str | None = Field(None, min_length=1, max_length=4096, description=_VERSION_OR_BUNDLE)
    model_version: str | None = Field(None, min_length=1, max_length=256)


class ShadowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_rate: float = Field(1.0, ge=0, le=1, description="share of the requests it scores")
    bundle: str | None = Field(None, min_length=1, max_length=4096, description=_VERSION_OR_BUNDLE)
    model_version: str | None = Field(None, min_length=1, max_length=256)


class RoutingRequest(BaseModel):
    """A new routing: it replaces the one in force, for every replica."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "arms": [
                        {"name": "control", "bundle": "/models/v1", "weight": 0.9},
                        {"name": "treatment", "bundle": "/models/v2", "weight": 0.1},
                    ],
                    "shadows": [{"bundle": "/models/v3", "sample_rate": 1.0}],
                    "salt": "exp-2026-12",
                }
            ]
        },
    )

    arms: list[ArmIn] = Field(min_length=1, max_length=16)
    shadows: list[ShadowIn] = Field(default_factory=list, max_length=8)
    salt: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="users are assigned by hash(salt, user_id): the same salt keeps every user whose arm "
        "still has room where they were; a new salt starts a new experiment (default: the one in force, "
        "else a new one)",
    )
    expected_revision: int | None = Field(
        None, ge=0, description="refuse (409) unless the routing is still at this revision"
    )
    note: str = Field("", max_length=256, description="why (shown in /admin/models)")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"arm": "treatment"}]})

    arm: str = Field(min_length=1, max_length=64, description="the arm whose version everyone gets")
    expected_revision: int | None = Field(None, ge=0)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expected_revision: int | None = Field(None, ge=0)
