"""`din synth`: deterministic, SNAP format, and an oracle that is a probability and beats chance."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cli import main as din_main
from contracts.errors import InvalidArgument
from contracts.vocab import FIRST_ID, known_ids
from model.data import load_prepared
from model.synth import SynthParams, Truth, generate, load_truth, oracle_auc, oracle_scores

FILES = ("reviews.json.gz", "meta.json.gz", "truth.npz", "truth.json")


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    params = SynthParams(users=60, items=80, categories=4, events_per_user=8.0, seed=3)
    generate(tmp_path / "a", params)
    generate(tmp_path / "b", params)
    generate(tmp_path / "c", SynthParams(users=60, items=80, categories=4, events_per_user=8.0, seed=4))
    for name in FILES[:3]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "reviews.json.gz").read_bytes() != (
        tmp_path / "c" / "reviews.json.gz"
    ).read_bytes()


def test_snap_format(synth_raw: Path) -> None:
    with gzip.open(synth_raw / "reviews.json.gz", "rt") as f:
        reviews = [json.loads(line) for line in f]
    with gzip.open(synth_raw / "meta.json.gz", "rt") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("{'asin': '")  # Python literal, as in the SNAP release
    meta = [ast.literal_eval(line) for line in lines]
    assert {"reviewerID", "asin", "unixReviewTime", "overall", "reviewText"} <= set(reviews[0])
    cats = {m["asin"]: m["categories"][0][-1] for m in meta}
    assert {r["asin"] for r in reviews} <= set(cats)

    by_user: dict[str, list[tuple[int, str]]] = {}
    for r in reviews:
        by_user.setdefault(r["reviewerID"], []).append((r["unixReviewTime"], r["asin"]))
    info = json.loads((synth_raw / "truth.json").read_text())
    assert len(by_user) == info["params"]["users"] and len(reviews) == info["reviews"]
    for events in by_user.values():
        assert len(events) >= 5
        assert len({a for _, a in events}) == len(events)  # nobody reviews an item twice
        assert len({t for t, _ in events}) == len(events)  # distinct days: the order is unambiguous


def test_prepare_reads_it(prepared_data: Path, synth_raw: Path) -> None:
    p = load_prepared(prepared_data)
    info = json.loads((synth_raw / "truth.json").read_text())
    assert p.meta["users_skipped"] == 0 and p.meta["items_without_meta"] == 0
    assert p.meta["n_events"] == info["reviews"]
    assert len(p.categories) == info["params"]["categories"] + FIRST_ID
    # the prepared categories are the generator's
    truth = load_truth(synth_raw)
    idx = truth.item_index(known_ids(p.items))
    names = np.array(p.categories)[p.item_cate[FIRST_ID:]]
    assert (names == truth.category_names[truth.item_cat[idx]]).all()


def test_oracle_auc(synth_raw: Path, prepared_data: Path) -> None:
    item = oracle_auc(synth_raw, prepared_data, "test")
    category = oracle_auc(synth_raw, prepared_data, "test", level="category")
    assert 0.8 < item < 0.99
    assert category < item - 0.03  # the trigger behaviour matters beyond its category


def test_oracle_is_a_distribution(synth_raw: Path) -> None:
    truth = load_truth(synth_raw)
    ids = [str(a) for a in truth.item_ids]
    rng = np.random.default_rng(0)
    for L in (0, 1, 2, 5, 40):
        hist = [ids[i] for i in rng.choice(len(ids), size=L, replace=False)]
        for level in ("item", "category"):
            p = oracle_scores(truth, [hist] * len(ids), ids, level=level)
            assert p.sum() == pytest.approx(1.0, abs=1e-9)
            assert (p[truth.item_index(hist)] == 0).all()  # no repeats
    p = oracle_scores(synth_raw, [[ids[0]], []], ["not-an-item", ids[1]])
    assert p[0] == 0 and p[1] == pytest.approx(truth.pop[1], rel=1e-12)  # seed step: popularity


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = din_main(
        ["synth", "--out", str(tmp_path / "raw"), "--users", "20", "--items", "30", "--no-progress"]
    )
    assert code == 0 and "reviews" in capsys.readouterr().out
    assert all((tmp_path / "raw" / f).is_file() for f in FILES)


def test_bad_arguments_are_a_project_error_and_one_clean_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InvalidArgument, match="20 categories for 10 items"):
        generate(tmp_path / "lib", SynthParams(items=10, categories=20))
    assert din_main(["synth", "--out", str(tmp_path / "bad"), "--items", "10", "--categories", "20"]) == 2
    err = capsys.readouterr().err
    assert err == "din synth: error: need 1 <= categories <= items, got 20 categories for 10 items\n"
    assert din_main(["synth", "--out", str(tmp_path / "bad"), "--explore", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "din synth: error: explore must be in [0, 1], recency and ring_decay in (0, 1)"
    ]


def test_oracle_matches_the_generator(synth_raw: Path, prepared_data: Path) -> None:
    """The true parameters give the observed next items a higher likelihood than nearby wrong ones."""
    from dataclasses import replace

    from model.data import gather_histories
    from model.synth import _oracle_core

    truth = load_truth(synth_raw)
    p = load_prepared(prepared_data)
    s = p.train
    keep = s.label == 1
    hist, hist_len = gather_histories(p.seq_items, p.seq_offsets, s.user[keep], s.pos[keep], p.max_history)
    to_truth = truth.item_index(p.items)
    to_truth[:FIRST_ID] = -1

    def loglik(t: Truth) -> float:
        scores = _oracle_core(t, to_truth[hist], hist_len, to_truth[s.target[keep]], "item")
        assert (scores > 0).all()  # every generated item is possible under the oracle
        return float(np.log(scores).mean())

    best = loglik(truth)
    for change in (
        {"ring_decay": 0.3},
        {"ring_decay": 0.7},
        {"recency": 0.6},
        {"recency": 0.95},
        {"explore": 0.3},
    ):
        assert loglik(replace(truth, **change)) < best - 0.01, change
