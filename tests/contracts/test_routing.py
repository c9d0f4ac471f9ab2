"""The routing contract: who is in which arm, how a weight change moves users, the document's history."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from contracts.errors import RoutingError
from contracts.routing import Arm, Document, Routing, Shadow, bucket, build, promoted

USERS = [f"user-{k}" for k in range(100_000)]


def _arms(**weights: float) -> list[Arm]:
    return [Arm(name, f"v-{name}", f"/models/{name}", w) for name, w in weights.items()]


def _assign(routing: Routing, users: list[str] = USERS) -> list[str]:
    compiled = routing.compiled()
    return [compiled.arm_of(u).name for u in users]


@pytest.mark.parametrize(
    "weights",
    [
        {"control": 0.9, "treatment": 0.1},
        {"a": 1, "b": 1, "c": 1},
        {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05},
    ],
)
def test_each_arm_gets_its_share_of_100k_users_within_one_percent(weights: dict[str, float]) -> None:
    routing = build(_arms(**weights), [], "exp-1", None)
    counts = Counter(_assign(routing))
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(counts[name] / len(USERS) - w / total) < 0.01, (name, counts)


def test_growing_an_arm_from_10_to_20_percent_moves_users_only_into_it() -> None:
    before = build(_arms(control=0.9, treatment=0.1), [], "exp-1", None)
    after = build(_arms(control=0.8, treatment=0.2), [], "exp-1", before)
    moves = Counter(zip(_assign(before), _assign(after), strict=True))
    assert set(moves) == {("control", "control"), ("treatment", "treatment"), ("control", "treatment")}
    assert abs(moves[("control", "treatment")] / len(USERS) - 0.1) < 0.01


def test_with_three_arms_users_move_only_from_the_arms_that_shrank_to_the_ones_that_grew() -> None:
    before = build(_arms(a=1, b=1, c=1), [], "exp-1", None)
    after = build(_arms(a=2, b=0.5, c=0.5), [], "exp-1", before)  # a grows, b and c shrink
    moved = {(x, y) for x, y in zip(_assign(before), _assign(after), strict=True) if x != y}
    assert moved == {("b", "a"), ("c", "a")}
    # a new arm takes users only from the others; a dropped arm's users go only to the arms left
    grown = build([*_arms(a=2, b=0.5, c=0.5), Arm("d", "v-d", "/models/d", 1.0)], [], "exp-1", after)
    assert {y for x, y in zip(_assign(after), _assign(grown), strict=True) if x != y} == {"d"}
    dropped = build(_arms(a=2, b=0.5), [], "exp-1", after)
    assert {x for x, y in zip(_assign(after), _assign(dropped), strict=True) if x != y} == {"c"}


def test_a_new_salt_is_a_new_experiment() -> None:
    one = build(_arms(control=0.5, treatment=0.5), [], "exp-1", None)
    two = build(_arms(control=0.5, treatment=0.5), [], "exp-2", one)
    same = sum(x == y for x, y in zip(_assign(one), _assign(two), strict=True)) / len(USERS)
    assert 0.45 < same < 0.55  # independent: half of them by chance


def test_two_processes_assign_every_user_alike() -> None:
    routing = build(_arms(control=0.7, treatment=0.2, other=0.1), [], "exp-9", None)
    doc = Document(0, None).then(routing).to_dict()
    code = (
        "import json, sys\n"
        "from contracts.routing import Document\n"
        "r = Document.from_dict(json.loads(sys.stdin.read())).current.compiled()\n"
        "print('\\n'.join(r.arm_of(f'user-{k}').name for k in range(20000)))\n"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(doc), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == _assign(routing, USERS[:20000])


def test_bucket_is_pinned_across_releases() -> None:
    # the hash is part of the contract: replicas of different builds must agree (blake2b of
    # "salt\0user", not Python's salted hash()); these values must never change
    assert [bucket("exp-1", u) for u in ("u1", "u2", "alice")] == [4498, 5836, 9021]
    assert bucket("exp-2", "u1") == 760


def test_history_promote_and_rollback() -> None:
    doc = Document(0, None)
    one = doc.then(build(_arms(control=0.5, treatment=0.5), [], "s", None))
    two = one.then(promoted(one.current, "treatment"))  # type: ignore[arg-type]
    assert two.revision == 2 and two.current is not None
    assert [(a.name, a.model_version) for a in two.current.arms] == [("treatment", "v-treatment")]
    assert _assign(two.current, USERS[:1000]) == ["treatment"] * 1000
    back = two.rolled_back()
    assert back.revision == 3 and back.current is not None and back.current.note == "rollback"
    assert _assign(back.current, USERS[:5000]) == _assign(one.current, USERS[:5000])  # type: ignore[arg-type]
    assert Document.from_dict(back.to_dict()) == back
    with pytest.raises(RoutingError, match="no arm 'nope'"):
        promoted(one.current, "nope")  # type: ignore[arg-type]
    with pytest.raises(RoutingError, match="nothing to roll back"):
        doc.then(None).rolled_back()


@pytest.mark.parametrize(
    ("arms", "shadows", "salt", "field"),
    [
        ([], [], "s", "arms"),
        (_arms(a=0, b=0), [], "s", "arms"),
        (_arms(a=-1), [], "s", "arms[0].weight"),
        (_arms(a=float("nan")), [], "s", "arms[0].weight"),
        ([Arm("a", "v", "/m", 1), Arm("a", "w", "/n", 1)], [], "s", "arms[1].name"),
        ([Arm("bad name!", "v", "/m", 1)], [], "s", "arms[0].name"),
        (_arms(a=1), [Shadow("v-a", "/models/a", 1.0)], "s", "shadows[0].model_version"),
        (_arms(a=1), [Shadow("v-x", "/x", 1.5)], "s", "shadows[0].sample_rate"),
        (_arms(a=1), [], "", "salt"),
    ],
)
def test_a_routing_that_cannot_be_in_force_names_its_field(
    arms: list[Arm], shadows: list[Shadow], salt: str, field: str
) -> None:
    with pytest.raises(RoutingError) as e:
        build(arms, shadows, salt, None)
    assert e.value.field == field
    assert e.value.body()["detail"] == [{"field": field, "message": e.value.message}]


def test_a_damaged_document_is_refused_not_half_read() -> None:
    good = Document(0, None).then(build(_arms(a=1, b=1), [], "s", None)).to_dict()
    good["current"]["arms"][0]["buckets"] = [[0, 10]]  # buckets no longer cover the table
    with pytest.raises(RoutingError, match="do not cover"):
        Document.from_dict(good)
    with pytest.raises(RoutingError, match="not a routing document"):
        Document.from_dict({"revision": "x"})
