"""What recent work cost a model, for admission's expected wait: the median of the last few calls.

Measured by the inference half of the batcher, read by the queue half; one `Costs` per member of the
model set (`service.live.LiveModel.costs`), since versions differ in what a candidate costs."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field


class RecentMedian:
    """The median of the last `size` samples of the last `max_age` seconds; 0 (unknown) before the
    first and once the newest is older than `max_age`. An estimate nobody has confirmed for a while is
    not trusted: when everything is being shed no batch runs to measure anything, and a stale high
    estimate (a Redis stall that has since ended) would otherwise shed every request for ever."""

    def __init__(self, size: int = 15, max_age: float = 1.0) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self.max_age = max_age
        self._value = 0.0

    def add(self, sample: float, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._samples.append((now, sample))
        while self._samples[0][0] < now - self.max_age:
            self._samples.popleft()
        self._value = statistics.median(v for _, v in self._samples)

    def value(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        fresh = self._samples and self._samples[-1][0] >= now - self.max_age
        return self._value if fresh else 0.0


@dataclass
class Costs:
    """What recent work cost, for the expected wait of a new request: medians of the last few calls,
    so one slow call (a VM stall, a page fault storm) does not shed a burst of requests that fit.
    Measured by the inference half, read by admission."""

    candidate_s: RecentMedian = field(default_factory=RecentMedian)  # inference s per candidate
    explain_row_s: RecentMedian = field(default_factory=RecentMedian)  # explaining s per (item, behaviour)
    redis_s: RecentMedian = field(default_factory=RecentMedian)  # one pipelined history read
