"""`din score`: offline scoring with the PyTorch model in its reference form (`DIN.forward`).

Input rows `{"history": [item ids, newest first], "candidates": [item ids]}`, one JSON object a
line; output rows `{"scores": [ctr per candidate, in candidate order]}`. With `--explain`, each row
also has, per candidate and for every behaviour of the history as the model saw it (newest first,
cut to T), `"contribution"`: ctr(that history) - ctr(that history without the behaviour), by
`DIN.leave_one_out` (the model run again on each shortened history: T + 1 forward passes a candidate),
and `"attention"`: its weight in the pooling (`DIN.attention`). Both are the reference for `/rank`'s
`explain`; the service's ONNX path is checked against `score_rows`, `explain_rows` and
`contribution_rows` (one pass: `score_and_explain`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from contracts.errors import RowError
from contracts.vocab import OOV
from model.checkpoint import Checkpoint, load_run
from model.din import DIN

DEFAULT_BATCH_SIZE = 4096  # (candidate, history) pairs per forward call


def parse_row(line: str, lineno: int) -> dict[str, list[str]]:
    """One JSONL line -> {"history": [...], "candidates": [...]} of item id strings."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise RowError(f"line {lineno}: expected a JSON object, got {type(row).__name__}")
    out: dict[str, list[str]] = {}
    for key in ("history", "candidates"):
        if key not in row:
            raise RowError(f"line {lineno}: missing {key!r}")
        value = row[key]
        if not isinstance(value, list):
            raise RowError(f"line {lineno}: {key!r} must be a list of item ids")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise RowError(f"line {lineno}: {key!r} holds {v!r}; item ids are strings")
        out[key] = [str(v) for v in value]
    return out


def _pairs(
    rows: list[dict[str, list[str]]], ckpt: Checkpoint
) -> tuple[list[int], list[list[int]], list[int]]:
    """Flatten rows into (candidate index, history indices) pairs: the tiled training form."""
    vocab, T = ckpt.vocab, ckpt.max_history
    targets: list[int] = []
    hists: list[list[int]] = []
    rows_of: list[int] = []
    for r, row in enumerate(rows):
        hist = vocab.lookup(row["history"][:T]).tolist()  # most recent T
        for c in row["candidates"]:
            targets.append(vocab.index(c))
            hists.append(hist)
            rows_of.append(r)
    return targets, hists, rows_of


def _batches(
    targets: list[int], hists: list[list[int]], batch_size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(target (B,), hist (B, L) padded with 0, hist_len (B,)) per batch of pairs, in order."""
    for start in range(0, len(targets), batch_size):
        chunk = hists[start : start + batch_size]
        L = max(1, max(len(h) for h in chunk))
        hist = torch.zeros(len(chunk), L, dtype=torch.int64)  # (B, L), padded with 0
        for i, h in enumerate(chunk):
            hist[i, : len(h)] = torch.tensor(h, dtype=torch.int64)
        hist_len = torch.tensor([len(h) for h in chunk], dtype=torch.int64)  # (B,)
        target = torch.tensor(targets[start : start + batch_size], dtype=torch.int64)  # (B,)
        yield target, hist, hist_len


def _normalise(rows: list[dict[str, Any]]) -> list[dict[str, list[str]]]:
    return [
        {"history": [str(i) for i in r["history"]], "candidates": [str(i) for i in r["candidates"]]}
        for r in rows
    ]


Explained = tuple[list[list[list[float]]], list[list[list[float]]]]  # per row, per candidate, per behaviour


@torch.no_grad()
def score_and_explain(
    model: DIN,
    ckpt: Checkpoint,
    rows: list[dict[str, Any]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    explain: bool = True,
) -> tuple[list[list[float]], Explained | None]:
    """One pass of `model.forward_explained` (the reference) over every (row, candidate) pair: per row
    the CTR of each candidate, in input order, and with `explain` (attention, contribution): per
    candidate the weight and the leave-one-out contribution (`model.leave_one_out`) of each behaviour
    of the history as the model sees it (newest first, the most recent T); else None."""
    model.eval()
    rows = _normalise(rows)
    targets, hists, rows_of = _pairs(rows, ckpt)
    # with explain every pair is also scored once per behaviour: keep ~batch_size forward rows a call
    T = max(1, ckpt.max_history)
    step = max(1, batch_size // T) if explain else batch_size
    scores: list[float] = []
    weights: list[list[float]] = []
    contributions: list[list[float]] = []
    for target, hist, hist_len in _batches(targets, hists, step):
        logits, att = model.forward_explained(target, hist, hist_len)  # att (B, L), 0 past hist_len
        scores += torch.sigmoid(logits).tolist()
        if explain:
            lens = hist_len.tolist()
            weights += [w[:n] for w, n in zip(att.tolist(), lens, strict=True)]
            loo = model.leave_one_out(target, hist, hist_len).tolist()  # (B, L)
            contributions += [c[:n] for c, n in zip(loo, lens, strict=True)]
    out: list[list[float]] = [[] for _ in rows]
    for r, s in zip(rows_of, scores, strict=True):
        out[r].append(s)
    if not explain:
        return out, None
    per_row: list[list[list[float]]] = [[] for _ in rows]
    per_row_c: list[list[list[float]]] = [[] for _ in rows]
    for r, w, c in zip(rows_of, weights, contributions, strict=True):
        per_row[r].append(w)
        per_row_c[r].append(c)
    return out, (per_row, per_row_c)


def score_rows(
    model: DIN, ckpt: Checkpoint, rows: list[dict[str, Any]], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[list[float]]:
    """CTR of every candidate of every row, by `model.forward` (the reference), in input order."""
    return score_and_explain(model, ckpt, rows, batch_size, explain=False)[0]


def explain_rows(
    model: DIN, ckpt: Checkpoint, rows: list[dict[str, Any]], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[list[list[float]]]:
    """Per row, per candidate: the weight of each behaviour (`model.attention`, the reference), one
    per behaviour of the history as the model sees it (newest first, the most recent T)."""
    explained = score_and_explain(model, ckpt, rows, batch_size, explain=True)[1]
    assert explained is not None
    return explained[0]


def contribution_rows(
    model: DIN, ckpt: Checkpoint, rows: list[dict[str, Any]], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[list[list[float]]]:
    """Per row, per candidate: each behaviour's leave-one-out contribution to its ctr
    (`model.leave_one_out`), aligned as `explain_rows`."""
    explained = score_and_explain(model, ckpt, rows, batch_size, explain=True)[1]
    assert explained is not None
    return explained[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by din train")
    parser.add_argument("--input", required=True, help="JSONL rows {history, candidates}")
    parser.add_argument("--output", required=True, help="JSONL rows {scores}, in input order")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="add to each row, per candidate and for every behaviour of the history the model saw (newest "
        "first, the most recent T), 'contribution': ctr with the history minus ctr without that behaviour, "
        "and 'attention': its weight (T + 1 forward passes a candidate)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="(history, candidate) pairs per forward call",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        model, ckpt = load_run(args.run_dir)
        rows = []
        with open(args.input, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(parse_row(line, lineno))
    except (OSError, ValueError, RowError) as e:  # ValueError: a checkpoint of another format
        print(f"din score: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("din score: --batch-size must be positive", file=sys.stderr)
        return 2

    # Score in groups of rows so the progress bar moves; each group is batched by candidate pairs.
    group = max(1, args.batch_size // 8)
    results: list[list[float]] = []
    attention: list[list[list[float]]] = []
    contribution: list[list[list[float]]] = []
    for start in tqdm(range(0, len(rows), group), desc="scoring", unit="group", file=sys.stderr):
        chunk = rows[start : start + group]
        scores, explained = score_and_explain(model, ckpt, chunk, args.batch_size, explain=args.explain)
        results += scores
        if explained is not None:
            attention += explained[0]
            contribution += explained[1]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, s in enumerate(results):
            row: dict[str, Any] = {"scores": s}
            if args.explain:
                row["contribution"] = contribution[i]
                row["attention"] = attention[i]
            f.write(json.dumps(row) + "\n")
    n_cand = sum(len(s) for s in results)
    n_oov = sum(ckpt.vocab.index(c) == OOV for r in rows for c in r["candidates"])
    print(
        f"scored {len(rows):,} rows, {n_cand:,} candidates ({n_oov:,} unknown) in "
        f"{time.perf_counter() - t0:.1f}s -> {out}"
    )
    return 0
