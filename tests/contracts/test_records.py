"""The loop's records: plain data that survives a trip through JSON."""

from __future__ import annotations

import orjson

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


def test_orjson_writes_a_record_as_its_dict() -> None:
    """The log writer serialises records with orjson directly (no `to_dict` copy): the same JSON."""
    imp = Impression("x", 1.5, "u", "v", [], [], [Candidate("i", None, 0.5, 0)], "redis_unavailable")
    assert orjson.loads(orjson.dumps(imp)) == imp.to_dict()
