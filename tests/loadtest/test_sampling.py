"""The request mix (loadtest.sampling): body shapes, and every id source — a SNAP reviews file, plain
id files, a bundle's items.txt (never its <pad> / <oov> rows) — as the generator and Locust read them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from contracts.vocab import OOV_TOKEN, PAD_TOKEN
from loadtest.sampling import Mix, ids_from_reviews, items_from_bundle, load_ids, mix_from_env, read_ids


def test_mix_shapes_requests() -> None:
    mix = Mix(
        users=["a"], items=[f"i{k}" for k in range(50)], candidates=8, max_candidates=12, unknown_users=0.5
    )
    bodies = [json.loads(b) for b in mix.payloads(400, seed=3)]
    sizes = [len(b["candidates"]) for b in bodies]
    assert min(sizes) >= 1 and max(sizes) <= 12 and 6 <= sorted(sizes)[200] <= 10
    unknown = sum(b["user_id"] != "a" for b in bodies)
    assert 150 < unknown < 250
    assert all(len(set(b["candidates"])) == len(b["candidates"]) for b in bodies)
    assert mix.payloads(5, seed=3) == mix.payloads(5, seed=3)  # reproducible


def test_mix_without_items_or_users_and_with_top_k() -> None:
    mix = Mix(users=[], items=[], candidates=4, candidates_sigma=0, unknown_items=0.0, top_k=2)
    bodies = [json.loads(b) for b in mix.payloads(3, seed=0)]
    assert [b["user_id"] for b in bodies] == [f"loadtest-unknown-user-0-{i}" for i in range(3)]
    assert all(b["candidates"] == [f"loadtest-unknown-item-{j}" for j in range(4)] for b in bodies)
    assert all(b["top_k"] == 2 for b in bodies)
    # Fewer items than candidates: drawn with replacement, still the asked-for count.
    few = Mix(users=["a"], items=["x", "y"], candidates=5, candidates_sigma=0, unknown_items=0.0)
    assert all(len(json.loads(b)["candidates"]) == 5 for b in few.payloads(10, seed=1))


def test_items_from_bundle_skip_the_reserved_rows(items_bundle: Path) -> None:
    bundle = items_bundle
    items = items_from_bundle(bundle)
    assert items == [f"i{k}" for k in range(2, 40)]
    assert PAD_TOKEN not in items and OOV_TOKEN not in items


def test_id_sources(tmp_path: Path, items_bundle: Path) -> None:
    reviews = tmp_path / "reviews.json.gz"
    rows = [{"reviewerID": f"u{i % 3}", "asin": f"a{i % 4}"} for i in range(10)] + [{"asin": 5}, ["x"]]
    with gzip.open(reviews, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert ids_from_reviews(reviews) == (["u0", "u1", "u2"], ["a0", "a1", "a2", "a3"])
    plain = tmp_path / "users.txt"
    plain.write_text("x\n\n  y  \n")
    assert read_ids(plain) == ["x", "y"]

    # Later sources replace earlier ones; the notes say where the ids came from.
    bundle = items_bundle
    users, items, notes = load_ids(reviews=reviews, users_file=plain, bundle=bundle)
    assert users == ["x", "y"] and items == [f"i{k}" for k in range(2, 40)]
    assert notes == [
        f"3 users and 4 items from {reviews}",
        f"2 users from {plain}",
        f"38 items from {bundle}/items.txt",
    ]
    users, items, notes = load_ids(user_range=3)
    assert users == ["user-0", "user-1", "user-2"] and items == []
    assert notes[0] == "no users source: ids user-0..2 (probably unknown to the server)"
    assert notes[1].startswith("no items source")


def test_mix_from_env(items_bundle: Path) -> None:
    """The Locust file's configuration: the same id sources, the same Mix defaults as `din loadtest`."""
    env = {"DIN_LT_BUNDLE": str(items_bundle), "DIN_LT_CANDIDATES": "7", "DIN_LT_TOP_K": "3"}
    mix, notes = mix_from_env(env)
    users = [f"user-{i}" for i in range(1000)]
    assert mix == Mix(users=users, items=items_from_bundle(items_bundle), candidates=7, top_k=3)
    assert notes[0] == f"38 items from {items_bundle}/items.txt"
    assert mix_from_env({})[0] == Mix(users=users, items=[])
    with pytest.raises(ValueError, match="DIN_LT_CANDIDATES='many' is not a number"):
        mix_from_env({"DIN_LT_CANDIDATES": "many"})
