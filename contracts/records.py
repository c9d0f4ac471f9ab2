"""The records the loop logs: what was answered, with the features as they were served.

An `Impression` is one /rank answer as the model saw it: the history snapshot it was scored on (item
ids and their categories, newest first, cut to the model's T) and every candidate with its score and
its place in the answer. Training on these sees the features as they were served, not as the
history stands when the log is read. A `Feedback` is an event of /events that named the impression
it answers (a click on one of its items). Plain data: no torch, no Redis, no HTTP.

On the wire (the log's JSON) an impression's candidates are columns, `{"item_id": [...], "category":
[...], "score": [...], "position": [...]}`, not an object per candidate: half the bytes, and a fraction
of the writer's CPU (it runs in the server, beside the requests). `Impression.from_dict` also reads the
object-per-candidate form that logs written before the columns hold.

Impression ids are 32 lowercase hex digits: a 48-bit unix time in milliseconds, then 80 random bits
(`IMPRESSION_ID_PATTERN`), so they sort by time and never need a round trip to be unique.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMPRESSION_ID_PATTERN = r"^[0-9a-f]{32}$"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One candidate of an answer."""

    item_id: str
    category: str | None  # its category id (None: unknown to the model, or the bundle has no table)
    score: float  # predicted CTR in (0, 1)
    position: int | None  # its index in the answer, 0 = best; None: scored but not returned (top_k)


@dataclass(frozen=True, slots=True)
class Impression:
    """One answer of /rank, as the model saw it."""

    impression_id: str
    ts: float  # unix seconds when it was answered
    user_id: str
    model_version: str  # the version that scored it
    history: list[str]  # the item ids the model saw, newest first (cut to T)
    history_categories: list[str | None]  # their categories, in the same order
    candidates: list[Candidate]  # in the request's order
    degraded: str | None  # why the history could not be read (then `history` is empty), or None
    context: dict[str, Any] | None = None  # the request's context (none is sent yet)
    arm: str | None = None  # the routing arm that served it; None: no routing config was in force
    # The arm came from the QA header, not from the hash of the user: an A/B comparison leaves it out.
    arm_forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready): what a log writer stores, its candidates as columns."""
        data = asdict(self)
        cands = self.candidates
        data["candidates"] = {
            "item_id": [c.item_id for c in cands],
            "category": [c.category for c in cands],
            "score": [c.score for c in cands],
            "position": [c.position for c in cands],
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Impression:
        """The inverse of `to_dict`; candidates as a list of objects (records written before the columns)
        are read too. Columns of different lengths raise ValueError."""
        cands = data["candidates"]
        if isinstance(cands, dict):
            columns = (cands["item_id"], cands["category"], cands["score"], cands["position"])
            rows = [Candidate(*row) for row in zip(*columns, strict=True)]
        else:
            rows = [Candidate(**c) for c in cands]
        return cls(**{**data, "candidates": rows})


@dataclass(frozen=True, slots=True)
class Feedback:
    """One event of /events that named an impression: `user_id` acted on `item_id` of that answer."""

    impression_id: str  # the impression it answers (unknown or expired ones are kept: orphans)
    ts: float  # unix seconds when the service received it
    user_id: str
    item_id: str
    event_id: str | None  # the event's idempotency key, if it had one
    event_ts: float | None  # the event's own `ts`, as the client sent it (any monotonic unit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Feedback:
        return cls(**data)


SHADOW_RECORD = "shadow"  # the `type` a ShadowScores record carries in the log (an impression carries none)


@dataclass(frozen=True, slots=True)
class ShadowScores:
    """A shadow version's scores for the items impression `impression_id` logged (never shown).

    `items` are the impression's logged candidates in the impression's order (the request's); `positions`
    are where the shadow ranks each among ALL the request's candidates (0 = best), so a top-k overlap with
    the served answer and a would-be AUC on the logged clicks need nothing else."""

    impression_id: str  # the served impression it shadows
    ts: float  # the served impression's ts (so both land in the same hour)
    user_id: str
    model_version: str  # the shadow's version
    items: list[str]
    scores: list[float]  # the shadow's predicted CTR of each item
    positions: list[int]  # the shadow's rank of each item among all the request's candidates, 0 = best

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready) with `type` = SHADOW_RECORD: the log tells it from an impression."""
        return {"type": SHADOW_RECORD, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShadowScores:
        """The inverse of `to_dict` (a `type` other than SHADOW_RECORD, or lists of different lengths,
        raise ValueError: not a shadow record)."""
        fields = dict(data)
        kind = fields.pop("type", SHADOW_RECORD)
        if kind != SHADOW_RECORD:
            raise ValueError(f"not a shadow record (type {kind!r})")
        rec = cls(**fields)
        if not len(rec.items) == len(rec.scores) == len(rec.positions):
            raise ValueError("a shadow record's items, scores and positions differ in length")
        return rec
