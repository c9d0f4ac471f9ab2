"""The shadow scorer's process: ONNX Runtime sessions of the shadow versions, at the idle scheduling class.

`service.shadow` starts it (`python -m service.shadow_worker`) and talks to it over its stdin and stdout:
frames of a 4-byte big-endian length, then a pickle (the two ends are the same code, one service). Requests:

- ("load", key, graph bytes, providers, vocabulary ids, T) -> ("ok", None): an ONNX Runtime
  session of that graph (the very bytes the service verified and serves the version with), one thread,
  and the version's vocabulary and history length, under `key`
- ("score", key, rows, served orders, budgets) -> ("ok", (scores, overlaps)): rows of (candidates,
  history newest first) as the requests had them, encoded here (`score_rows`) and scored; each row's
  scores and top-k overlap with its served order. With a served-work signal (below) each row is scored
  CHUNK_CANDIDATES at a time, each slice only while no served graph call is running; a row that is
  still waiting when its budget (seconds: what is left of its job's age) runs out is given up (None),
  and the server sheds it
- ("unload", key) -> ("ok", None)

and ("error", "what went wrong") for any that failed. EOF on stdin: it exits.

The served-work signal (`--served-fd N`, `ServedWork`): eight bytes of memory shared with the server, the
number of served graph calls running (`service.inference.Inference.on_scoring`; the server's event loop
writes it as each call starts and ends: one store, no lock, one writer); the worker reads it before
every slice and sleeps while it is not 0. Why: the kernel does give a served thread the core at once
(SCHED_IDLE), but a shadow that computes *beside* a served graph call, on the other core or the other
hyper-thread of the same one, still slows it through what the two share (caches, memory bandwidth, the
vector units' clock): +39% on the served p99 at half capacity on an Intel Xeon of 2 vCPUs with a graph
merely looping at the idle class (README). Waiting for the served graph calls makes the shadow take only
the gaps between them: a slice of at most CHUNK_CANDIDATES candidates at a time, started once no served
call has run for MIN_GAP_S (the worker blocks on an eventfd the server writes at each return to 0), and
a served call that starts in the middle of a slice stops it (`Preemption`: ONNX Runtime's terminate
flag, set by a thread at the normal class that watches the signal while the slice runs); the slice is
done again in the next gap, each job until its budget. Measured (README, AMD EPYC Zen 4, half
capacity): the served graph calls' time per candidate +0.1% with the shadow on, against +10.8% without
the yield. Steps that did not hold, each measured: waiting for every served request (queued or reading
Redis too) left no gap at all; one budget per batch, from its oldest job, made the server send a batch
every few ms (+4.5%); a watcher at the idle class could not run while the served call and the slice
held both cores (+21%).

Why a process: a thread at the idle class in the server's own process shares its GIL; when every core is
busy, an idle-class thread that holds the GIL (taking it back after a graph call, handing a result over)
waits for a core while the event loop waits for the GIL: a priority inversion that showed as served p99.
A process of its own shares no lock with the server: SCHED_IDLE (Linux; elsewhere the lowest nice) makes
the kernel run it only on a core nothing else wants, and the server's side only waits on a pipe. The
server's side hands over the job's strings as the request had them: the encoding (a vocabulary lookup per
id) and the comparison with the served order are the worker's too, so that a shadow job costs the
server's interpreter one pickle of its strings and nothing else per candidate.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import mmap
import os
import pickle
import select
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from contracts.vocab import Vocab
from service.ranker import OUTPUT_NAME, encode_rows, graph_inputs, ranked, session_options

HEADER = struct.Struct(">I")
Row = tuple[Sequence[str], Sequence[str]]  # (candidates, history newest first)

# Candidates per graph call when the shadow gives way to served work: short enough to fit the gaps
# between served calls (32 x 100 behaviours: ~1.7 ms on one AMD EPYC Zen 4 core; 64: 2.6, 200: 7.1), long
# enough that repeating its user's per-history part of the graph per slice costs little.
CHUNK_CANDIDATES = 32
MIN_GAP_S = 0.001  # how long the served work must have stopped before a slice starts
POLL_S = 0.0002  # how often a running slice's watcher (or, without an eventfd, a waiting worker) looks again


class Interrupted(Exception):
    """A slice's graph call ended early because served work started (`Preemption`): to be done again."""


class ServedWork:
    """How many served graph calls are running, in eight bytes of shared memory: the server writes it
    (`set`, from one thread), the shadow worker reads it (`busy`) in its own process, and waits for it
    to reach 0 (`wait_idle`) on an eventfd the server writes at each return to 0 (Linux; elsewhere it
    polls). `create` makes both (a memfd, else an unlinked temporary file); `fds` are what the worker is
    handed (`--served-fd`, `--served-idle-fd`); `attach` maps them there."""

    _COUNT = struct.Struct("=q")

    def __init__(self, fd: int, idle_fd: int, *, owner: bool) -> None:
        self._fd = fd
        self._idle_fd = idle_fd  # -1: none (no eventfd here)
        self._owner = owner
        self._map: mmap.mmap | None = mmap.mmap(fd, self._COUNT.size)
        self._last = 0

    @classmethod
    def create(cls) -> ServedWork:
        try:
            fd = os.memfd_create("din-served-work", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            fd, path = tempfile.mkstemp(prefix="din-served-work-")
            os.unlink(path)
        os.ftruncate(fd, cls._COUNT.size)
        try:
            idle_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except (AttributeError, OSError):
            idle_fd = -1
        return cls(fd, idle_fd, owner=True)

    @classmethod
    def attach(cls, fd: int, idle_fd: int = -1) -> ServedWork:
        return cls(fd, idle_fd, owner=False)

    @property
    def fds(self) -> tuple[int, int]:
        return self._fd, self._idle_fd

    def set(self, count: int) -> None:
        if count != self._last and self._map is not None:
            self._last = count
            self._COUNT.pack_into(self._map, 0, count)
            if count == 0 and self._idle_fd >= 0:
                with contextlib.suppress(OSError):  # never blocks: a full counter already says "look"
                    os.eventfd_write(self._idle_fd, 1)

    def busy(self) -> bool:
        try:
            return self._map is not None and self._COUNT.unpack_from(self._map, 0)[0] > 0
        except ValueError:  # closed meanwhile (the server stopping): nothing to wait for
            return False

    def wait_idle(self, until: float) -> bool:
        """Block until no served work has run for MIN_GAP_S; False once time.monotonic() passes `until`
        first. (A gap shorter than that is most often the space between two batches: a slice started
        there would be stopped at once.)"""
        while True:
            if not self._wait_count_zero(until):
                return False
            time.sleep(MIN_GAP_S)
            if not self.busy():
                return True

    def _wait_count_zero(self, until: float) -> bool:
        while self.busy():
            left = until - time.monotonic()
            if left <= 0:
                return False
            if self._idle_fd < 0:
                time.sleep(POLL_S)
                continue
            try:
                readable, _, _ = select.select([self._idle_fd], [], [], left)
                if readable:
                    os.eventfd_read(self._idle_fd)  # consumed; the count says whether it still holds
            except (BlockingIOError, InterruptedError):
                pass  # another reader took it first, or a signal: look at the count again
            except (OSError, ValueError):  # closed meanwhile (the server stopping)
                return not self.busy()
        return True

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            if self._owner:
                for fd in self.fds:
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)


def read_frame(stream: IO[bytes]) -> Any | None:
    """One frame's object, or None at EOF."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def write_frame(stream: IO[bytes], obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(body)))
    stream.write(body)
    stream.flush()


def idle_priority() -> None:
    """The calling thread runs only when a core is idle (Linux SCHED_IDLE; elsewhere the lowest nice):
    the worker's only thread here, the fallback's thread in `service.shadow`."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def topk_overlap(scores: np.ndarray, served_order: np.ndarray) -> float | None:
    """The share of the served answer's items (its top k) that `scores` would have put in its own top k;
    None for an answer that showed nothing."""
    k = len(served_order)
    if not k:
        return None
    return len(set(ranked(scores, k).tolist()).intersection(served_order.tolist())) / k


def score_rows(
    run: Callable[..., np.ndarray],
    vocab: Vocab,
    max_history: int,
    rows: Sequence[Row],
    served: Sequence[np.ndarray],
    *,
    ready: Callable[[int], bool] | None = None,
) -> tuple[list[np.ndarray | None], list[float | None]]:
    """A batch of shadow jobs (`run`: the four inputs -> ctr): each row's ctr of its candidates and its
    `topk_overlap` with its served order. Without `ready`, in one graph call. With it, row by row in
    slices of at most CHUNK_CANDIDATES candidates, `ready(i)` called before each slice of row i: False
    gives row i up (None: no scores, no overlap) and the batch goes on with the next row; a slice whose
    call raises Interrupted is done again once `ready(i)` says so."""
    if len(served) != len(rows):
        raise ValueError(f"{len(rows)} rows and {len(served)} served orders")
    scores: list[np.ndarray | None]
    if ready is None:
        items, users, hist, lens, counts = encode_rows(vocab, max_history, rows)
        ctr = np.asarray(run(items, users, hist, lens))
        scores = list(np.split(ctr, np.cumsum(counts)[:-1])) if len(counts) else []
    else:
        scores = [
            _score_row(run, vocab, max_history, row, functools.partial(ready, i))
            for i, row in enumerate(rows)
        ]
    return scores, [
        None if s is None else topk_overlap(s, order) for s, order in zip(scores, served, strict=True)
    ]


def _score_row(
    run: Callable[..., np.ndarray], vocab: Vocab, max_history: int, row: Row, ready: Callable[[], bool]
) -> np.ndarray | None:
    """One row in slices, each once `ready()` (None: it said no first)."""
    candidates, history = row
    parts = []
    for start in range(0, len(candidates), CHUNK_CANDIDATES):
        items, users, hist, lens, _ = encode_rows(
            vocab, max_history, [(candidates[start : start + CHUNK_CANDIDATES], history)]
        )
        scored = None
        while scored is None:
            if not ready():
                return None
            with contextlib.suppress(Interrupted):
                scored = np.asarray(run(items, users, hist, lens))
        parts.append(scored)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.shadow_worker")
    ap.add_argument("--served-fd", type=int, help="the server's served-work count (ServedWork)")
    ap.add_argument("--served-idle-fd", type=int, default=-1, help="its eventfd: the count is back to 0")
    args = ap.parse_args(argv)
    served_work = (
        ServedWork.attach(args.served_fd, args.served_idle_fd) if args.served_fd is not None else None
    )
    # The frames go to a private copy of stdout; fd 1 itself goes to stderr, so that nothing a library
    # prints can land in the middle of a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    idle_priority()
    import onnxruntime as ort

    preemption = Preemption(served_work) if served_work is not None else None

    sessions: dict[str, tuple[Callable[..., np.ndarray], Vocab, int]] = {}  # key -> (run, vocabulary, T)
    while True:
        msg = read_frame(inp)
        if msg is None:
            return 0
        try:
            op, key = msg[0], msg[1]
            if op == "load":
                _, _, graph, providers, ids, max_history = msg
                opts = session_options(intra_op_threads=1)
                opts.inter_op_num_threads = 1
                session = ort.InferenceSession(graph, sess_options=opts, providers=providers)
                sessions[key] = (_runner(session, preemption), Vocab(ids), max_history)
                reply: tuple[str, Any] = ("ok", None)
            elif op == "score":
                run, vocab, max_history = sessions[key]
                _, _, rows, served, budgets = msg
                ready = ready_within(served_work, budgets)
                reply = ("ok", score_rows(run, vocab, max_history, rows, served, ready=ready))
            elif op == "unload":
                sessions.pop(key, None)
                reply = ("ok", None)
            else:
                reply = ("error", f"unknown request {op!r}")
        except Exception as e:  # the service logs it and sheds the batch; this process goes on
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            write_frame(out, reply)
        except (BrokenPipeError, OSError):
            return 0


def ready_within(served_work: ServedWork | None, budgets: Sequence[float]) -> Callable[[int], bool] | None:
    """`score_rows`' `ready` for rows that may wait `budgets` seconds (from now) each for the served work
    to stop (None: no signal, nothing to wait for)."""
    if served_work is None:
        return None
    now = time.monotonic()
    untils = [now + b for b in budgets]
    return lambda i: served_work.wait_idle(untils[i])


def _runner(session: Any, preemption: Preemption | None = None) -> Callable[..., np.ndarray]:
    """The four inputs -> the serving graph's ctr, in `session`; with `preemption`, a call that served
    work interrupts raises Interrupted."""
    import onnxruntime as ort

    def run(*inputs: np.ndarray) -> np.ndarray:
        if preemption is None:
            (ctr,) = session.run([OUTPUT_NAME], graph_inputs(*inputs))
            return np.asarray(ctr)
        opts = ort.RunOptions()
        opts.log_severity_level = 4  # a terminated call is expected here, not an error to log
        with preemption.watching(opts):
            try:
                (ctr,) = session.run([OUTPUT_NAME], graph_inputs(*inputs), opts)
            except Exception:
                if opts.terminate:
                    raise Interrupted() from None
                raise
        return np.asarray(ctr)

    return run


class Preemption:
    """Ends the running slice's graph call as soon as served work starts: a thread of the worker watches
    the signal while a call runs and sets its RunOptions.terminate (ONNX Runtime stops at the next node,
    well under a millisecond at CHUNK_CANDIDATES), so a served call that starts in the middle of a slice
    shares the CPU with it for that long only, instead of the rest of the slice; the slice is done again
    in the next gap (`score_rows`)."""

    def __init__(self, served_work: ServedWork) -> None:
        self._served = served_work
        self._opts: Any = None  # the running call's RunOptions (None between calls)
        self._ended = threading.Event()  # the running call's: set when it has returned
        self._running = threading.Event()
        self.interrupted = 0
        threading.Thread(target=self._watch, name="din-shadow-preempt", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, opts: Any) -> Iterator[None]:
        ended = self._ended = threading.Event()
        self._opts = opts
        self._running.set()
        try:
            yield
        finally:
            self._running.clear()
            self._opts = None
            ended.set()

    def _watch(self) -> None:
        # At the normal class, unlike the rest of this process: when a served call starts beside a slice
        # both cores are taken (the served call's and the slice's), and an idle-class watcher would wait
        # for the slice to end before it could stop it.
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        while True:
            self._running.wait()
            opts, ended = self._opts, self._ended
            while opts is not None and not ended.is_set():
                if self._served.busy():
                    opts.terminate = True
                    self.interrupted += 1
                    # blocked, not polling, until that call has returned: with the served calls on both
                    # cores the idle-class slice may get no CPU to return for a while, and a watcher
                    # polling at the normal class meanwhile would take it from them
                    ended.wait()
                    break
                time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
