"""`din score --explain`: the attention rows are `DIN.attention` (the reference), aligned with the
history as the model sees it (newest first, cut to T), for attention and sum pooling, with softmax;
the contribution rows are the score with that history minus the score without each behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli import main as din
from contracts.vocab import known_ids
from model.checkpoint import load_run
from model.score import contribution_rows, explain_rows, score_rows


@pytest.fixture(scope="module")
def run_dir(run_1epoch: Path) -> Path:
    """One epoch of `din train` on the prepared data: the session's, shared with the other scoring tests."""
    return run_1epoch


def _rows(items: list[str], T: int) -> list[dict]:
    return [
        {"history": items[3:9], "candidates": items[20:25]},
        {"history": [], "candidates": [items[0]]},  # nothing to explain
        {"history": ["no-such-item", items[5]], "candidates": [items[1], "unknown"]},
        {"history": items[: T + 15], "candidates": items[40:43]},  # longer than T: cut to the newest T
        {"history": items[:4], "candidates": []},
    ]


def _flat(rows: list[list[list[float]]]) -> list[float]:
    return [w for att in rows for ws in att for w in ws]


def _reference(model, ckpt, row: dict) -> list[list[float]]:
    """One candidate at a time, unpadded: DIN.attention in the paper's form."""
    hist = ckpt.vocab.lookup(row["history"][: ckpt.max_history]).tolist()
    out = []
    with torch.no_grad():
        for c in row["candidates"]:
            h = torch.tensor([hist or [0]], dtype=torch.int64)
            att = model.attention(torch.tensor([ckpt.vocab.index(c)]), h, torch.tensor([len(hist)]))
            out.append(att[0, : len(hist)].tolist())
    return out


def test_explain_rows_equal_the_reference_and_align_with_the_history(run_dir: Path) -> None:
    model, ckpt = load_run(run_dir)
    T = ckpt.max_history
    rows = _rows(known_ids(ckpt.items), T)
    got = explain_rows(model, ckpt, rows, batch_size=3)  # small batches: rows span several
    for row, att in zip(rows, got, strict=True):
        assert len(att) == len(row["candidates"])
        for weights in att:
            assert len(weights) == min(len(row["history"]), T)
        want = _reference(model, ckpt, row)
        assert [w for ws in att for w in ws] == pytest.approx([w for ws in want for w in ws], abs=1e-6)
    # the weights are not all equal: they depend on the candidate and on the behaviour
    first = got[0]
    assert len({round(w, 6) for ws in first for w in ws}) > len(first[0])
    assert _flat(explain_rows(model, ckpt, rows, batch_size=4096)) == pytest.approx(_flat(got), abs=1e-6)


def test_explain_with_softmax_and_with_sum_pooling(run_dir: Path) -> None:
    model, ckpt = load_run(run_dir)
    rows = _rows(known_ids(ckpt.items), ckpt.max_history)
    model.cfg.att_softmax = True  # the same weights, pooled through a softmax
    try:
        for row, att in zip(rows, explain_rows(model, ckpt, rows), strict=True):
            want = _reference(model, ckpt, row)
            assert [w for ws in att for w in ws] == pytest.approx([w for ws in want for w in ws], abs=1e-6)
            for weights in att:
                if weights:
                    assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    finally:
        model.cfg.att_softmax = False
    model.cfg.pooling = "sum"  # the paper's BaseModel: every real behaviour weighs 1
    try:
        for row, att in zip(rows, explain_rows(model, ckpt, rows), strict=True):
            n = min(len(row["history"]), ckpt.max_history)
            assert att == [[1.0] * n for _ in row["candidates"]]
    finally:
        model.cfg.pooling = "attention"


def test_cli_explain_writes_attention_beside_the_scores(run_dir: Path, tmp_path: Path) -> None:
    model, ckpt = load_run(run_dir)
    rows = _rows(known_ids(ckpt.items), ckpt.max_history)
    inp = tmp_path / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, explained = tmp_path / "plain.jsonl", tmp_path / "explained.jsonl"
    assert din(["score", str(run_dir), "--input", str(inp), "--output", str(plain)]) == 0
    assert din(["score", str(run_dir), "--input", str(inp), "--output", str(explained), "--explain"]) == 0
    a = [json.loads(line) for line in plain.read_text().splitlines()]
    b = [json.loads(line) for line in explained.read_text().splitlines()]
    assert all(set(r) == {"scores"} for r in a)
    assert all(set(r) == {"scores", "attention", "contribution"} for r in b)
    assert [r["scores"] for r in a] == [r["scores"] for r in b]  # explaining changes no score
    assert [s for r in b for s in r["scores"]] == pytest.approx(
        [s for r in score_rows(model, ckpt, rows) for s in r], abs=1e-6
    )
    assert [[len(ws) for ws in r["attention"]] for r in b] == [
        [min(len(row["history"]), ckpt.max_history)] * len(row["candidates"]) for row in rows
    ]
    assert _flat([r["attention"] for r in b]) == pytest.approx(
        _flat(explain_rows(model, ckpt, rows)), abs=1e-6
    )
    assert _flat([r["contribution"] for r in b]) == pytest.approx(
        _flat(contribution_rows(model, ckpt, rows)), abs=1e-6
    )


def test_contributions_are_the_scores_without_each_behaviour(run_dir: Path) -> None:
    """By definition, through `score_rows` itself: the history as the model saw it (cut to T), scored
    whole and with each behaviour deleted in turn; contribution = whole - without."""
    model, ckpt = load_run(run_dir)
    T = ckpt.max_history
    rows = _rows(known_ids(ckpt.items), T)
    got = contribution_rows(model, ckpt, rows, batch_size=64)
    for row, per_candidate in zip(rows, got, strict=True):
        seen = row["history"][:T]
        whole = score_rows(model, ckpt, [{"history": seen, "candidates": row["candidates"]}])[0]
        shorter = [
            {"history": seen[:t] + seen[t + 1 :], "candidates": row["candidates"]} for t in range(len(seen))
        ]
        without = score_rows(model, ckpt, shorter)  # per t, per candidate
        assert len(per_candidate) == len(row["candidates"])
        for j, contributions in enumerate(per_candidate):
            want = [whole[j] - without[t][j] for t in range(len(seen))]
            assert contributions == pytest.approx(want, abs=1e-6)
    assert max(abs(c) for c in _flat(got)) > 1e-4  # the behaviours do move the scores
