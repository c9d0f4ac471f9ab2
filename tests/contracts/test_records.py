"""The loop's records: plain data that survives a trip through JSON."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from contracts.records import Candidate, Feedback, Impression


def test_an_impression_round_trips_through_json() -> None:
    imp = Impression(
        impression_id="imp-1",
        ts=1700000000.5,
        user_id="u1",
        model_version="din-attention-abc",
        history=["i3", "i2"],
        history_categories=["c1", None],
        candidates=[Candidate("i9", "c2", 0.25, 0), Candidate("i8", None, 0.125, None)],
        degraded=None,
    )
    assert Impression.from_dict(orjson.loads(orjson.dumps(imp.to_dict()))) == imp


def test_feedback_round_trips_through_json() -> None:
    fb = Feedback("0190f3c2a1b2" + "0" * 20, 1700000001.25, "u1", "i9", "click-1", 17.0)
    assert Feedback.from_dict(orjson.loads(orjson.dumps(fb.to_dict()))) == fb


def test_an_impression_is_logged_with_its_candidates_as_columns_and_the_old_rows_still_read() -> None:
    cands = [Candidate("i9", "c2", 0.25, 0), Candidate("i8", None, 0.125, None)]
    imp = Impression("x", 1.5, "u", "v", ["h"], [None], cands, "redis_unavailable")
    wire = orjson.loads(orjson.dumps(imp.to_dict()))
    assert wire["candidates"] == {
        "item_id": ["i9", "i8"],
        "category": ["c2", None],
        "score": [0.25, 0.125],
        "position": [0, None],
    }
    # logged before the columns: one object per candidate
    rows = {**wire, "candidates": [dataclasses.asdict(c) for c in cands]}
    assert Impression.from_dict(rows) == imp
    with pytest.raises(ValueError):  # columns of different lengths: not an impression
        Impression.from_dict({**wire, "candidates": {**wire["candidates"], "score": [0.25]}})
