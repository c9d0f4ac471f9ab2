"""The shadow worker process (`service.shadow_worker`): it encodes, scores and compares a batch of jobs from
the requests' own strings, exactly as the served version's Ranker would, and as the in-process fallback does.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from contracts.bundle import load_bundle
from contracts.vocab import known_ids
from service.ranker import Ranker, ranked
from service.shadow import ShadowWorker
from service.shadow_worker import score_rows, topk_overlap
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
        ctr, overlaps = worker.score(ranker, rows, served)
        pid = worker.pid
        assert pid is not None and pid != os.getpid() and os.sched_getscheduler(pid) == os.SCHED_IDLE
        again, _ = worker.score(ranker, rows, served)  # loaded once, scored again the same
        assert worker.starts == 1
    finally:
        worker.close()
    assert np.array_equal(ctr, again)
    assert ctr == pytest.approx(np.concatenate(expected), abs=1e-6)
    assert overlaps == [1.0, topk_overlap(expected[1], served[1]), None]
    assert overlaps[1] == 0.0
    # the in-process fallback: the same function on this process's session, the same figures
    fallback, fallback_overlaps = score_rows(ranker.run, ranker.vocab, T, rows, served)
    assert fallback == pytest.approx(ctr, abs=1e-6) and fallback_overlaps == overlaps


def test_a_closed_worker_refuses_and_a_broken_request_is_an_error_not_a_dead_worker(ranker: Ranker) -> None:
    worker = ShadowWorker()
    try:
        with pytest.raises(RuntimeError, match="the shadow worker: "):
            worker.score(ranker, [(["a"], ())], [])  # one row, no served order: refused in the worker
        ctr, overlaps = worker.score(ranker, [(["a"], ())], [np.array([0])])  # the same worker goes on
        assert worker.starts == 1 and ctr.shape == (1,) and overlaps == [1.0]
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.score(ranker, [(["a"], ())], [np.array([0])])
