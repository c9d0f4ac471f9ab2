"""`din score`: the output format, order, OOV and empty histories, and equality with `model.forward`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main as din
from contracts.errors import DataError, RowError
from contracts.vocab import known_ids
from model.checkpoint import load_run
from model.score import parse_row, score_rows


def _flat(scores: list[list[float]]) -> list[float]:
    return [s for row in scores for s in row]


@pytest.fixture(scope="module")
def run_dir(run_1epoch: Path) -> Path:
    """One epoch of `din train` on the prepared data: the session's, shared with the other scoring tests."""
    return run_1epoch


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


def _rows(ckpt, n: int = 6) -> list[dict]:
    items = known_ids(ckpt.items)
    rows = [{"history": items[i : i + 3 + i], "candidates": items[10 + i : 14 + 2 * i]} for i in range(n)]
    rows.append({"history": [], "candidates": [items[0], "no-such-item"]})  # empty history, an OOV candidate
    rows.append({"history": ["no-such-item", items[5]], "candidates": []})  # no candidates
    rows.append({"history": items[:200], "candidates": [items[1]]})  # longer than max_history
    return rows


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_score_rows_equals_forward(loaded):
    model, ckpt = loaded
    rows = _rows(ckpt)
    got = score_rows(model, ckpt, rows, batch_size=5)  # small batches: rows span several
    assert [len(s) for s in got] == [len(r["candidates"]) for r in rows]
    vocab, T = ckpt.vocab, ckpt.max_history
    with torch.no_grad():
        for row, scores in zip(rows, got, strict=True):
            for c, s in zip(row["candidates"], scores, strict=True):
                hist = [vocab.index(i) for i in row["history"][:T]]
                h = torch.tensor([hist or [0]], dtype=torch.int64)  # (1, L)
                ref = torch.sigmoid(model(torch.tensor([vocab.index(c)]), h, torch.tensor([len(hist)])))
                assert s == pytest.approx(float(ref), abs=1e-6)
    # batching never changes a score
    assert _flat(score_rows(model, ckpt, rows, batch_size=4096)) == pytest.approx(_flat(got), abs=1e-6)


def test_oov_and_truncation(loaded):
    model, ckpt = loaded
    items, T = known_ids(ckpt.items), ckpt.max_history
    long_hist = items[: T + 20]
    a, b = score_rows(
        model,
        ckpt,
        [
            {"history": long_hist, "candidates": items[:3]},
            {"history": long_hist[:T], "candidates": items[:3]},
        ],
    )
    assert a == b  # only the most recent T behaviours count
    a, b = score_rows(
        model,
        ckpt,
        [
            {"history": ["?", items[1]], "candidates": ["x", "y"]},
            {"history": ["<oov>", items[1]], "candidates": ["<oov>", "<oov>"]},
        ],
    )
    assert a == b  # every unknown id is the OOV index
    assert a[0] == a[1]


def test_cli_writes_scores_in_order(loaded, run_dir, tmp_path, capsys):
    model, ckpt = loaded
    rows = _rows(ckpt)
    inp, out = _write(tmp_path / "rows.jsonl", rows), tmp_path / "out" / "scores.jsonl"
    assert din(["score", str(run_dir), "--input", str(inp), "--output", str(out), "--batch-size", "16"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"scores"} for r in lines)
    assert [len(r["scores"]) for r in lines] == [len(r["candidates"]) for r in rows]
    assert _flat([r["scores"] for r in lines]) == pytest.approx(
        _flat(score_rows(model, ckpt, rows)), abs=1e-6
    )
    assert all(0.0 < s < 1.0 for r in lines for s in r["scores"])
    assert f"scored {len(rows)} rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ('["a"]', "line 3: expected a JSON object"),
        ('{"candidates": ["a"]}', "line 3: missing 'history'"),
        ('{"history": [], "candidates": "a"}', "line 3: 'candidates' must be a list"),
        ('{"history": [null], "candidates": []}', "line 3: 'history' holds None"),
    ],
)
def test_cli_malformed_row(run_dir, tmp_path, capsys, line, message):
    ok = json.dumps({"history": [], "candidates": ["a"]})
    inp = _write(tmp_path / "rows.jsonl", [ok, ok, line, ok])
    assert din(["score", str(run_dir), "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_row_error_is_a_data_error() -> None:
    with pytest.raises(RowError, match="line 7: not valid JSON") as e:
        parse_row("{oops", 7)
    assert isinstance(e.value, DataError) and str(e.value).startswith("line 7: not valid JSON")


def test_malformed_row_exit_code_without_traceback(run_dir, tmp_path):
    inp = _write(tmp_path / "rows.jsonl", ['{"history": [], "candidates": []}', "{oops"])
    cmd = [sys.executable, "-m", "cli", "score", str(run_dir), "--input", str(inp), "--output", "o"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "line 2: not valid JSON" in p.stderr and "Traceback" not in p.stderr
