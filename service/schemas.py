"""The wire format: request and response models, and the JSON response class.

Limits come from Settings, so request models are built per app (`request_models(settings)`) and the
OpenAPI docs show the limits actually enforced."""

from __future__ import annotations

from dataclasses import dataclass
from types import GenericAlias
from typing import Annotated, Any, TypeVar

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from pydantic.fields import FieldInfo

from service.config import Settings


class JSONResponse(Response):
    """JSON rendered by orjson (numpy-free floats, compact)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ------------------------------------------------------------------ requests (base shapes)

_RANK_EXAMPLE: dict[str, Any] = {
    "user_id": "A1B2C3D4",
    "candidates": ["B00ITEM001", "B00ITEM002", "B00ITEM003"],
    "top_k": 2,
}
_EVENTS_EXAMPLE: dict[str, Any] = {
    "events": [
        {"user_id": "A1B2C3D4", "item_id": "B00ITEM002", "ts": 1700000000},
        {"user_id": "A1B2C3D4", "item_id": "B00ITEM003", "ts": 1700000060, "event_id": "click-7f3a91"},
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


class RankRequest(BaseModel):
    """Rank `candidates` for `user_id`. Duplicate candidates are scored once (first occurrence kept)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_RANK_EXAMPLE]})

    user_id: str = Field(description="user whose behaviour history is read from Redis")
    candidates: list[str] = Field(description="item ids to rank; unknown ids are scored as out-of-vocabulary")
    top_k: int | None = Field(None, description="return only the best top_k items (after scoring all)")
    history: list[str] | None = Field(
        None,
        description="the user's history, newest first; replaces the Redis read (truncated to the model's T)",
    )
    explain: bool = Field(False, description=_EXPLAIN_DOC)
    explain_top: int = Field(DEFAULT_EXPLAIN_TOP, description=_EXPLAIN_TOP_DOC)


_EVENT_ID_DOC = (
    "idempotency key: an event whose event_id was already written (within the dedup window, "
    "DIN_EVENTS_DEDUP_TTL_S) or appears earlier in the same call is skipped and counted in `duplicates`, "
    "so a retry with the same event_ids never writes an event twice; events without one are always written"
)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str
    item_id: str
    ts: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        description="event time (any monotonic unit, e.g. unix seconds)",
    )
    event_id: str | None = Field(None, description=_EVENT_ID_DOC)


class EventsRequest(BaseModel):
    """Append behaviours, all or nothing. Sorted by `ts` (stable; events without `ts` count as newest)
    before writing; an event whose `event_id` was already written is skipped."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EVENTS_EXAMPLE]})

    events: list[Event]


class ItemsRequest(BaseModel):
    """Item ids to look up in the served model's catalogue (the ranking explorer labels its heatmap)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"item_ids": ["B00ITEM001"]}]})

    item_ids: list[str]


@dataclass(frozen=True)
class RequestModels:
    rank: type[RankRequest]
    events: type[EventsRequest]
    items: type[ItemsRequest]


M = TypeVar("M", bound=BaseModel)


def _limited(
    base: type[M], default: dict[str, Any] | None = None, **limits: tuple[Any, FieldInfo]
) -> type[M]:
    """`base` under its own name (so the OpenAPI components read RankRequest, Event, EventsRequest), each
    field named in `limits` retyped and constrained (`name=(annotation, Field(constraints))`); its
    description, and its default unless `default` names another, stay the base's."""
    fields: dict[str, Any] = {}
    for name, (annotation, constraints) in limits.items():
        shape = base.model_fields[name]
        if default and name in default:
            shape = Field(default[name], description=shape.description)
        fields[name] = (Annotated[annotation, constraints], shape)
    return create_model(base.__name__, __base__=base, __doc__=base.__doc__, **fields)


def request_models(settings: Settings) -> RequestModels:
    """Subclasses of the base shapes that enforce this app's limits (and document them)."""
    Id = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=settings.max_id_length)]
    ids = settings.max_candidates
    rank = _limited(
        RankRequest,
        default={"explain_top": min(DEFAULT_EXPLAIN_TOP, settings.max_explain_top)},
        user_id=(Id, Field()),
        candidates=(list[Id], Field(min_length=1, max_length=ids)),
        top_k=(int | None, Field(ge=1, le=ids, strict=True)),
        history=(list[Id] | None, Field(max_length=settings.max_request_history)),
        explain=(bool, Field(strict=True)),
        explain_top=(int, Field(ge=1, le=settings.max_explain_top, strict=True)),
    )
    event = _limited(Event, user_id=(Id, Field()), item_id=(Id, Field()), event_id=(Id | None, Field()))
    events = _limited(
        EventsRequest,
        events=(GenericAlias(list, (event,)), Field(min_length=1, max_length=settings.max_events)),
    )
    items = _limited(
        ItemsRequest,
        item_ids=(list[Id], Field(min_length=1, max_length=ids + settings.max_request_history)),
    )
    return RequestModels(rank=rank, events=events, items=items)


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
                }
            ]
        }
    )

    user_id: str
    model_version: str
    items: list[ScoredItem] = Field(description="sorted by score, descending")
    history_length: int = Field(description="behaviours the model saw (after truncation to T)")
    degraded: bool = Field(description="true when Redis could not be read and an empty history was used")
    explained: bool | None = Field(
        None,
        description="with `explain`: true when `because` and `against` say what each behaviour did to the "
        "scores; false when nothing is explained (a degraded answer: the history could not be read)",
    )
    explain_note: str | None = Field(None, description="with `explain`, when `explained` is false: why")


class EventsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"written": 2, "duplicates": 0}]})

    written: int = Field(description="events appended to histories")
    duplicates: int = Field(description="events skipped: their event_id was already written")


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
