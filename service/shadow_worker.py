"""The shadow scorer's process: ONNX Runtime sessions of the shadow versions, at the idle scheduling class.

`service.shadow` starts it (`python -m service.shadow_worker`) and talks to it over its stdin and stdout:
frames of a 4-byte big-endian length, then a pickle (the two ends are the same code, one service). Requests:

- ("load", key, graph bytes, providers, vocabulary ids, T) -> ("ok", None): an ONNX Runtime
  session of that graph (the very bytes the service verified and serves the version with), one thread,
  and the version's vocabulary and history length, under `key`
- ("score", key, rows, served orders) -> ("ok", (ctr, overlaps)): rows of (candidates, history newest
  first) as the requests had them, encoded here (`score_rows`), scored in one graph call; each row's
  top-k overlap with its served order
- ("unload", key) -> ("ok", None)

and ("error", "what went wrong") for any that failed. EOF on stdin: it exits.

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

import contextlib
import os
import pickle
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any

import numpy as np

from contracts.vocab import Vocab
from service.ranker import OUTPUT_NAME, encode_rows, graph_inputs, ranked, session_options

HEADER = struct.Struct(">I")
Row = tuple[Sequence[str], Sequence[str]]  # (candidates, history newest first)


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
) -> tuple[np.ndarray, list[float | None]]:
    """A batch of shadow jobs in one graph call (`run`: the four inputs -> ctr): every candidate's ctr, in
    the rows' order, and each row's `topk_overlap` with its served order."""
    items, users, hist, lens, counts = encode_rows(vocab, max_history, rows)
    ctr = np.asarray(run(items, users, hist, lens))
    parts = np.split(ctr, np.cumsum(counts)[:-1])
    return ctr, [topk_overlap(scores, order) for scores, order in zip(parts, served, strict=True)]


def main() -> int:
    # The frames go to a private copy of stdout; fd 1 itself goes to stderr, so that nothing a library
    # prints can land in the middle of a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    idle_priority()
    import onnxruntime as ort

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
                sessions[key] = (_runner(session), Vocab(ids), max_history)
                reply: tuple[str, Any] = ("ok", None)
            elif op == "score":
                run, vocab, max_history = sessions[key]
                reply = ("ok", score_rows(run, vocab, max_history, msg[2], msg[3]))
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


def _runner(session: Any) -> Callable[..., np.ndarray]:
    """The four inputs -> the serving graph's ctr, in `session`."""

    def run(*inputs: np.ndarray) -> np.ndarray:
        (ctr,) = session.run([OUTPUT_NAME], graph_inputs(*inputs))
        return np.asarray(ctr)

    return run


if __name__ == "__main__":
    sys.exit(main())
