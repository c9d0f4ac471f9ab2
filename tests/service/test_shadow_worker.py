"""The shadow worker process (`service.shadow_worker`): it encodes, scores and compares a batch of jobs from
the requests' own strings, exactly as the served version's Ranker would, and as the in-process fallback does;
handed the server's served-work signal, it scores only while that says no served work is pending, a slice
at a time, and stops a batch whose budget runs out while it waits.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.vocab import known_ids
from service.ranker import Ranker, encode_rows, ranked
from service.shadow import ShadowWorker
from service.shadow_worker import (
    CHUNK_CANDIDATES,
    Interrupted,
    Preemption,
    ServedWork,
    _runner,
    score_rows,
    topk_overlap,
)
from tests.service.conftest import BundleInfo


@pytest.fixture(scope="module")
def ranker(bundle: BundleInfo) -> Ranker:
    return Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"], intra_op_threads=1)


def test_the_worker_scores_and_compares_as_the_served_ranker(ranker: Ranker) -> None:
    items = known_ids(ranker.vocab.ids)
    T = ranker.max_history
    rows = [
        (items[:30], tuple(items[40 : 40 + T + 7])),  # a history longer than T: cut to T, newest first
        ([*items[5:12], "never-seen", items[5]], (items[60], "also-unknown")),  # unknown ids: OOV
        (items[100:103], ()),  # no history at all
    ]
    expected = [s.scores for s in ranker.score_batch([(list(c), list(h)) for c, h in rows])]
    served = [
        ranked(expected[0], 10),  # the worker's top 10 is this one: overlap 1
        ranked(-expected[1], 4),  # the 4 it ranks last: overlap 0 unless ties
        np.array([], dtype=np.int64),  # an answer that showed nothing: no overlap
    ]
    worker = ShadowWorker()
    try:
        scores, overlaps = worker.score(ranker, rows, served)
        pid = worker.pid
        assert pid is not None and pid != os.getpid() and os.sched_getscheduler(pid) == os.SCHED_IDLE
        again, _ = worker.score(ranker, rows, served)  # loaded once, scored again the same
        assert worker.starts == 1
    finally:
        worker.close()
    ctr = np.concatenate(scores)
    assert np.array_equal(ctr, np.concatenate(again))
    assert [len(x) for x in scores] == [len(c) for c, _ in rows]
    assert ctr == pytest.approx(np.concatenate(expected), abs=1e-6)
    assert overlaps == [1.0, topk_overlap(expected[1], served[1]), None]
    assert overlaps[1] == 0.0
    # the in-process fallback: the same function on this process's session, the same figures
    fallback, fallback_overlaps = score_rows(ranker.run, ranker.vocab, T, rows, served)
    assert np.concatenate(fallback) == pytest.approx(ctr, abs=1e-6) and fallback_overlaps == overlaps


def test_a_closed_worker_refuses_and_a_broken_request_is_an_error_not_a_dead_worker(ranker: Ranker) -> None:
    worker = ShadowWorker()
    try:
        with pytest.raises(RuntimeError, match="the shadow worker: "):
            worker.score(ranker, [(["a"], ())], [])  # one row, no served order: refused in the worker
        scores, overlaps = worker.score(ranker, [(["a"], ())], [np.array([0])])  # the same worker goes on
        assert worker.starts == 1 and [x.shape for x in scores] == [(1,)] and overlaps == [1.0]
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.score(ranker, [(["a"], ())], [np.array([0])])


def _rows(ranker: Ranker) -> tuple[list[tuple[list[str], tuple[str, ...]]], list[np.ndarray]]:
    """Rows of several sizes (one longer than a slice, one without candidates) and their served orders."""
    items = known_ids(ranker.vocab.ids)
    sizes = [CHUNK_CANDIDATES * 2 + 5, 3, 0, CHUNK_CANDIDATES - 1, 40]
    rows = [(items[k : k + n], tuple(items[200 + k : 250 + k])) for k, n in enumerate(sizes)]
    served = [np.arange(min(n, 5)) for n in sizes]
    return rows, served


def test_scoring_row_by_row_in_slices_is_scoring_at_once_and_a_row_told_no_is_given_up(
    ranker: Ranker,
) -> None:
    rows, served = _rows(ranker)
    T = ranker.max_history
    whole, overlaps = score_rows(ranker.run, ranker.vocab, T, rows, served)
    asked: list[int] = []

    def ready(i: int) -> bool:
        asked.append(i)
        return True

    sliced, sliced_overlaps = score_rows(ranker.run, ranker.vocab, T, rows, served, ready=ready)
    # asked before every slice of every row (a row without candidates has none)
    assert asked == [i for i, (c, _) in enumerate(rows) for _ in range(0, len(c), CHUNK_CANDIDATES)]
    for got, want in zip(sliced, whole, strict=True):
        assert got is not None and want is not None and got == pytest.approx(want, abs=1e-6)
    assert sliced_overlaps == overlaps
    # row 0 told no before its second slice, row 3 before its first: both given up, the others scored
    answers = {0: iter([True, False]), 3: iter([False])}
    part, part_overlaps = score_rows(
        ranker.run, ranker.vocab, T, rows, served, ready=lambda i: next(answers[i]) if i in answers else True
    )
    assert part[0] is None and part[3] is None and part_overlaps[0] is None and part_overlaps[3] is None
    for i in (1, 2, 4):
        assert part[i] == pytest.approx(whole[i], abs=1e-6) and part_overlaps[i] == overlaps[i]


def test_the_worker_waits_while_served_work_runs_and_gives_a_row_up_at_its_budget(ranker: Ranker) -> None:
    rows, served = _rows(ranker)
    want, want_overlaps = score_rows(ranker.run, ranker.vocab, ranker.max_history, rows, served)
    signal = ServedWork.create()
    worker = ShadowWorker(signal)
    pool = ThreadPoolExecutor(1)
    try:
        worker.score(ranker, rows[:1], served[:1])  # started and loaded while nothing runs
        signal.set(3)  # three served graph calls running
        assert signal.busy()
        t0 = time.monotonic()
        scores, overlaps = worker.score(ranker, rows, served, [0.2] * len(rows))  # every budget runs out
        assert time.monotonic() - t0 >= 0.2
        # given up, but for the row without candidates, which needs no CPU
        assert [x is None for x in scores] == [bool(c) for c, _ in rows]
        assert overlaps == [None if c else want_overlaps[i] for i, (c, _) in enumerate(rows)]
        waiting = pool.submit(worker.score, ranker, rows, served, [30.0] * len(rows))
        time.sleep(0.3)
        assert not waiting.done()  # still giving way
        signal.set(0)  # the served work is done: the batch goes on, whole
        scores, overlaps = waiting.result(timeout=30)
        for got, expected in zip(scores, want, strict=True):
            assert got is not None and expected is not None and got == pytest.approx(expected, abs=1e-6)
        assert overlaps == want_overlaps
    finally:
        pool.shutdown()
        worker.close()
        signal.close()
    assert not signal.busy()  # closed: nothing to wait for


@pytest.mark.parametrize("wake", ["eventfd", "polling"])
def test_the_served_work_signal_is_shared_memory_the_worker_reads_in_its_process(wake: str) -> None:
    """The count in shared memory, and the wake-up at each return to 0: an eventfd where Linux has one (the
    worker blocks on it), polling where there is none (a reader attached without it)."""
    signal = ServedWork.create()
    assert signal.fds[1] >= 0  # this test runs on Linux
    reader = ServedWork.attach(*signal.fds) if wake == "eventfd" else ServedWork.attach(signal.fds[0])
    try:
        assert not reader.busy()
        signal.set(2)
        assert reader.busy() and not reader.wait_idle(time.monotonic() + 0.01)
        signal.set(1)  # down, not to 0: no wake-up
        threading.Timer(0.05, signal.set, args=(0,)).start()
        t0 = time.monotonic()
        assert reader.wait_idle(t0 + 10)  # woke up once the count went back to 0
        assert not reader.busy()
        signal.set(3)
        assert not reader.wait_idle(time.monotonic() + 0.05)  # the last wake-up was consumed or stale
    finally:
        reader.close()
        signal.close()


def test_a_slice_running_when_served_work_starts_is_interrupted_and_done_again(ranker: Ranker) -> None:
    """Preemption: the running call ends early (RunOptions.terminate) once the signal says served work
    started; score_rows does that slice again in the next gap, and the scores are the same."""
    items = known_ids(ranker.vocab.ids)
    rows = [(items[:1000], tuple(items[1000:1100])), (items[5:9], ())]
    served = [np.arange(10), np.arange(2)]
    want, want_overlaps = score_rows(ranker.run, ranker.vocab, ranker.max_history, rows, served)
    signal = ServedWork.create()
    preemption = Preemption(signal)
    run = _runner(ranker.session, preemption)
    try:
        # a call of 20,000 candidates starts while served work runs: the watcher ends it at once
        many = [(items * (20_000 // len(items) + 1))[:20_000], rows[0][1]]
        signal.set(1)
        t0 = time.perf_counter()
        with pytest.raises(Interrupted):
            run(*encode_rows(ranker.vocab, ranker.max_history, [tuple(many)])[:4])
        interrupted_after = time.perf_counter() - t0
        signal.set(0)
        t0 = time.perf_counter()
        run(*encode_rows(ranker.vocab, ranker.max_history, [tuple(many)])[:4])  # the same call, whole
        assert interrupted_after < (time.perf_counter() - t0) / 2  # it did stop early
        assert preemption.interrupted == 1

        # in slices: served work comes and goes twice while the batch runs; every slice is done in the end
        def served_batches() -> None:
            for _ in range(2):
                time.sleep(0.01)
                signal.set(1)
                time.sleep(0.01)
                signal.set(0)

        threading.Thread(target=served_batches).start()
        until = time.monotonic() + 30
        got, overlaps = score_rows(
            run, ranker.vocab, ranker.max_history, rows, served, ready=lambda i: signal.wait_idle(until)
        )
    finally:
        signal.close()
    for row, expected in zip(got, want, strict=True):
        assert row is not None and expected is not None and row == pytest.approx(expected, abs=1e-6)
    assert overlaps == want_overlaps
