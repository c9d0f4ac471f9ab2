"""The loop's records: plain data that survives a trip through JSON."""

from __future__ import annotations

import orjson

from contracts.records import Candidate, Impression


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
