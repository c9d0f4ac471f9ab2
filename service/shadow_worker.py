"""The shadow scorer's process: ONNX Runtime sessions of the shadow versions, at the idle scheduling class.

`service.shadow` starts it (`python -m service.shadow_worker`) and talks to it over its stdin and stdout:
frames of a 4-byte big-endian length, then a pickle (the two ends are the same code, one service). Requests:

- ("load", key, graph bytes, providers, output) -> ("ok", None): an ONNX Runtime session of that graph
  (the very bytes the service verified and serves the version with), one thread, under `key`
- ("run", key, feeds) -> ("ok", array): the graph's `output` for the four inputs
- ("unload", key) -> ("ok", None)

and ("error", "what went wrong") for any that failed. EOF on stdin: it exits.

Why a process: a thread at the idle class in the server's own process shares its GIL; when every core is
busy, an idle-class thread that holds the GIL (taking it back after a graph call, handing a result over)
waits for a core while the event loop waits for the GIL: a priority inversion that showed as served p99.
A process of its own shares no lock with the server: SCHED_IDLE (Linux; elsewhere the lowest nice) makes
the kernel run it only on a core nothing else wants, and the server's side only waits on a pipe.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import threading
from typing import IO, Any

HEADER = struct.Struct(">I")


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


def main() -> int:
    # The frames go to a private copy of stdout; fd 1 itself goes to stderr, so that nothing a library
    # prints can land in the middle of a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    idle_priority()

    import onnxruntime as ort

    from service.ranker import session_options

    sessions: dict[str, tuple[Any, str]] = {}  # key -> (session, output name)
    while True:
        msg = read_frame(inp)
        if msg is None:
            return 0
        try:
            op, key = msg[0], msg[1]
            if op == "load":
                opts = session_options(intra_op_threads=1)
                opts.inter_op_num_threads = 1
                sessions[key] = (ort.InferenceSession(msg[2], sess_options=opts, providers=msg[3]), msg[4])
                reply: tuple[str, Any] = ("ok", None)
            elif op == "run":
                session, output = sessions[key]
                (value,) = session.run([output], msg[2])
                reply = ("ok", value)
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


if __name__ == "__main__":
    sys.exit(main())
