"""`din export`: write the ONNX serving bundle, and refuse to unless it matches PyTorch.

The graph is `DIN.serve` (per user, the first attention layer of all (candidate, behaviour) pairs is
one GEMM; no (N, T, E) or (N, T, 4E) tensor). Before anything is written, ONNX Runtime is compared
with the PyTorch reference (`DIN.forward`, the tiled training form) on batches covering empty and
full histories, unknown items, one and 1,000 candidates, several users at once, users whose
candidates are interleaved (with junk past hist_len) and a user without candidates; the largest
absolute difference must be within 1e-5 and is kept in the manifest.

Beside it, explain.onnx: `DIN.serve_contributions` (ctr, attention, and every behaviour's exact
leave-one-out contribution), which the service runs on the items an explained request returns. Its
contributions are compared with `DIN.leave_one_out` (the definition: `forward` on each history with one
behaviour removed) on the same cases, the first EXPLAIN_PARITY_CANDIDATES candidates of each (the
reference costs T forward passes a candidate), to the same tolerance.

The bundle is written into a staging directory beside OUT and swapped into place only once complete:
OUT holds a whole bundle, the old one or the new one, at every instant where the two directories
can be exchanged in one step (Linux renameat2), and is otherwise missing only between two renames.
A refused or failed export leaves the old bundle as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import errno
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from contracts.bundle import (
    EXPLAIN_GRAPH,
    EXPLAIN_OUTPUTS,
    FORMAT_VERSION,
    INPUTS,
    INT8_GRAPH,
    ITEM_CATEGORIES,
    OPTIONAL_OUTPUTS,
    OUTPUTS,
    check_model,
    fsync_path,
    sha256_file,
)
from contracts.errors import BundleError, ExportError
from contracts.vocab import FIRST_ID, OOV, PAD, write_vocab
from model.din import DIN, DINConfig
from model.quantize import HeldOut, Quantizer, build_int8, held_out_from_data, quantize_int8

TOLERANCE = 1e-5
EXPLAIN_PARITY_CANDIDATES = 24  # per parity case, for explain.onnx: the reference is T forwards each
PRECISIONS = ("fp32", "int8", "both")  # `din export --precision`: model.onnx always; int8 beside it


# DIN.serve_explained's signature and outputs: (target_items, target_user, hist_items, hist_len) ->
# (ctr, attention); the serving graph is a trace of one.
ServeFn = Callable[[DIN, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class _Serving(nn.Module):
    """Exposes DIN.serve_explained (or `serve`, a formulation of the same) as forward, which is what
    the exporter traces."""

    def __init__(self, din: DIN, serve: ServeFn | None = None) -> None:
        super().__init__()
        self.din = din
        self.serve: ServeFn = serve or DIN.serve_explained

    def forward(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.serve(self.din, target_items, target_user, hist_items, hist_len)


class _Explaining(nn.Module):
    """Exposes DIN.serve_contributions as forward: the explaining graph (explain.onnx)."""

    def __init__(self, din: DIN) -> None:
        super().__init__()
        self.din = din

    def forward(
        self, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.din.serve_contributions(target_items, target_user, hist_items, hist_len)


def export_graph(model: DIN, path: Path, serve: ServeFn | None = None) -> None:
    """Write `model`'s serving graph to `path` as `din export` does (no parity check, no bundle).
    `serve`: a formulation with DIN.serve_explained's signature and outputs, traced in its place
    (benchmarks time earlier formulations through the same exporter)."""
    _export_onnx(model, path, serve=serve)


def _export_onnx(model: DIN, path: Path, *, explaining: bool = False, serve: ServeFn | None = None) -> None:
    """Write DIN.serve_explained (or `serve`; `explaining`: DIN.serve_contributions) with dynamic N, U
    and T as a single self-contained ONNX file: the trace of this model's configuration (`_trace`,
    cached), this model's weights bound into it, then the exporter's own optimizer."""
    import onnx
    import onnx_ir as ir

    module = _Explaining(model) if explaining else _Serving(model, serve)
    key = _trace_key(model, explaining, serve)
    template = _traced_graph(module, model.cfg.n_items, key)
    try:
        graph = ir.serde.deserialize_model(onnx.ModelProto.FromString(template))
    except Exception:  # a damaged cache file (the cache is a convenience): trace again
        fresh = _traced_graph(module, model.cfg.n_items, key, cached=False)
        graph = ir.serde.deserialize_model(onnx.ModelProto.FromString(fresh))
    weights = {name: t.detach().contiguous().cpu().numpy() for name, t in module.state_dict().items()}
    for name, value in graph.graph.initializers.items():
        if name not in weights:  # a constant of the trace itself, not a weight
            continue
        array = weights[name]
        old = value.const_value
        if old is None or len(old.shape) != array.ndim or old.dtype != ir.DataType.from_numpy(array.dtype):
            raise ExportError(f"the traced graph's {name} does not fit this model's (trace key {key})")
        value.const_value = ir.tensor(np.array(array, copy=True), name=name)
        value.shape = ir.Shape(array.shape)  # the vocabularies' sizes: the one thing a trace leaves open
    program = torch.onnx.ONNXProgram(graph, None)
    with _quiet():
        program.optimize()  # what torch.onnx.export(optimize=True) runs: constant folding, rewrites
        program.save(str(path), external_data=False)
    _strip_debug_metadata(path)


# A trace depends on the model's configuration, the serving code and the exporter, never on the weights:
# so the exporter traces a configuration once (torch.export and its decompositions: ~45 s for the
# serving graph and ~20 s for the explaining one on a 2-core AMD EPYC; the optimizer, which folds the
# weights into the graph's constants, runs on every export: ~2 s a graph),
# keeps the trace as it came before the optimizer, and binds each model's weights into a copy of it (the
# tables' shapes with them: one trace serves every vocabulary size, NOT_TRACED).
# A trace kept in this process, and on disk under DIN_GRAPH_CACHE (default: ~/.cache/din-rank/graphs;
# "off": none), keyed by everything it depends on (the configuration, the sources of model/din.py and
# this file, the code of the model's classes as it runs, the versions of torch, onnxscript and onnx_ir):
# any change traces again. Cached or not,
# every export takes the same path, so the same weights give the same bytes (and model_version).
_TRACES: dict[str, bytes] = {}
# Left out of a trace's key: the vocabularies' sizes, which a trace holds only as its tables' shapes, and
# max_history, which the graph never reads (the service cuts histories to the manifest's; a graph that
# read it from a trace of another value would fail the export's parity checks, never pass silently).
NOT_TRACED = ("n_items", "n_categories", "max_history")
GRAPH_CACHE_ENV = "DIN_GRAPH_CACHE"


def _trace_key(model: DIN, explaining: bool, serve: ServeFn | None) -> str:
    import hashlib

    import onnx_ir
    import onnxscript

    digest = hashlib.sha256()
    parts: list[object] = [
        "explaining" if explaining else "serving",
        json.dumps(
            {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in NOT_TRACED},
            sort_keys=True,
            default=str,
        ),
        torch.__version__,
        onnxscript.__version__,
        onnx_ir.__version__,
        *(Path(m.__file__ or "").read_bytes() for m in (sys.modules[DIN.__module__], sys.modules[__name__])),
    ]
    # The code the trace runs, as it is now (a method replaced at run time changes the trace too): every
    # function of the model's module classes, and `serve`'s (another formulation: the benchmarks').
    classes = sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}")
    functions = [getattr(v, "__func__", v) for c in classes for v in vars(c).values()]
    for fn in [*functions, *([serve] if serve is not None else [])]:
        code = getattr(fn, "__code__", None)
        if code is not None:
            parts.append(_code_digest(code))
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _code_digest(code: types.CodeType) -> str:
    """What a function's code does, the same in every process (marshal's bytes depend on reference
    counts; a frozenset's order on the string hash seed)."""

    def const(c: object) -> str:
        if isinstance(c, types.CodeType):
            return _code_digest(c)
        if isinstance(c, frozenset):
            return "frozenset(" + ",".join(sorted(map(const, c))) + ")"
        if isinstance(c, tuple):
            return "(" + ",".join(map(const, c)) + ")"
        return repr(c)

    return f"{code.co_code.hex()}|{code.co_names}|{code.co_varnames}|{','.join(map(const, code.co_consts))}"


def _graph_cache_dir() -> Path | None:
    where = os.environ.get(GRAPH_CACHE_ENV, "")
    if where.lower() in ("off", "0", "none"):
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "din-rank" / "graphs"


def _traced_graph(module: nn.Module, n_items: int, key: str, *, cached: bool = True) -> bytes:
    """The serialized ONNX model of `module`'s trace before the optimizer: from this process, from the
    disk cache, or traced now (and kept in both; `cached=False`: traced now). A cache that cannot be read
    or written is skipped."""
    if cached and key in _TRACES:
        return _TRACES[key]
    cache = _graph_cache_dir()
    file = cache / f"{key}.onnx" if cache is not None else None
    data: bytes | None = None
    if file is not None and cached:
        with contextlib.suppress(OSError):
            data = file.read_bytes()
    if data is None:
        data = _trace(module, n_items)
        if file is not None:
            try:  # written whole under a temporary name, then renamed: a reader never sees half a file
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, file)
            except OSError as e:
                logging.getLogger(__name__).debug("graph cache %s not written: %s", file, e)
    _TRACES[key] = data
    return data


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter is chatty on stdout/stderr and warns about its own internals; keep the CLI clean."""
    quiet = io.StringIO()
    level = logging.getLogger("torch").level
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield quiet
        finally:
            logging.getLogger("torch").setLevel(level)


def _trace(module: nn.Module, n_items: int) -> bytes:
    """torch.onnx.export of `module` (a _Serving or _Explaining) with dynamic N, U and T, before the
    optimizer: the serialized ONNX model."""
    import onnx_ir as ir

    g = torch.Generator().manual_seed(0)
    # Example sizes all different and > 1, so the exporter keeps every dimension symbolic.
    U, T, N = 3, 7, 11
    args = (
        torch.randint(1, n_items, (N,), generator=g),
        torch.randint(0, U, (N,), generator=g),
        torch.randint(0, n_items, (U, T), generator=g),
        torch.tensor([0, 4, T]),
    )
    dims = {
        "N": torch.export.Dim("N"),
        "U": torch.export.Dim("U"),
        "T": torch.export.Dim("T"),
    }
    dynamic_shapes = tuple({i: dims[d] for i, d in enumerate(shape)} for shape in INPUTS.values())
    explaining = isinstance(module, _Explaining)
    with _quiet() as quiet:
        try:
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                input_names=list(INPUTS),
                output_names=list(EXPLAIN_OUTPUTS) if explaining else [*OUTPUTS, *OPTIONAL_OUTPUTS],
                dynamic_shapes=dynamic_shapes,
                optimize=False,  # run by _export_onnx, once this model's weights are in
                verbose=False,
            )
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            return ir.serde.serialize_model(program.model).SerializeToString()
        except ExportError:
            raise
        except Exception as e:  # the exporter's own errors are long; keep the cause
            raise ExportError(f"ONNX export failed: {e}\n{quiet.getvalue()[-2000:]}") from e


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug notes (stack traces with source paths, FX node text), so
    the same weights always give the same bytes, and so the same model_version, wherever exported."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


_AT_FDCWD = -100  # renameat2: paths relative to the working directory
_RENAME_EXCHANGE = 2  # renameat2: swap the two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE).

    False where the platform, the C library or the file system cannot, so the caller falls back.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no renameat2 in this C library (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    """Delete what an old bundle path held: a directory tree, or a file or link in its place."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_dir(new: Path, dest: Path) -> None:
    """Move the complete directory `new` to `dest`, replacing whatever is there.

    Where renameat2 can, the two are exchanged in one step, so `dest` is at every instant the old or
    the new bundle. Elsewhere the old one is renamed aside (`.<name>.old-<pid>`), `new` renamed into
    place, and the old one put back if that fails; `dest` is then missing only between two renames.
    The old bundle is deleted last, once the new one is in place. Both must be in the same directory.
    """
    for f in new.iterdir():
        fsync_path(f)
    fsync_path(new)
    if not dest.exists() and not dest.is_symlink():
        new.rename(dest)
    elif _exchange(new, dest):
        _remove(new)  # `new` now names the old bundle
    else:
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        try:
            new.rename(dest)
        except BaseException:
            old.rename(dest)  # the old bundle goes back: never leave `dest` without one
            raise
        _remove(old)
    fsync_path(dest.parent)


def parity_cases(n_items: int, max_history: int, seed: int = 0) -> list[dict[str, Any]]:
    """Serving-graph inputs covering the shapes the service will send."""
    rng = np.random.default_rng(seed)
    T = max_history
    known = (FIRST_ID, max(n_items, FIRST_ID + 1))  # real item indices, excluding pad and OOV

    def batch(
        name: str,
        hist_lens: list[int],
        n_cand: list[int],
        oov_share: float = 0.0,
        interleave: bool = False,
        junk_padding: bool = False,
    ) -> dict[str, Any]:
        U = len(hist_lens)
        width = max(hist_lens) if hist_lens else 0
        hist = np.zeros((U, width), dtype=np.int64)
        for u, L in enumerate(hist_lens):
            hist[u, :L] = rng.integers(*known, size=L)
            if oov_share:
                hist[u, :L][rng.random(L) < oov_share] = OOV
            if junk_padding:  # positions past hist_len must not matter, whatever they hold
                hist[u, L:] = rng.integers(*known, size=width - L)
        target_user = np.repeat(np.arange(U, dtype=np.int64), n_cand)
        if interleave:  # the contract does not promise a user's candidates are contiguous
            target_user = rng.permutation(target_user)
        target_items = rng.integers(*known, size=len(target_user)).astype(np.int64)
        if oov_share:
            target_items[rng.random(len(target_items)) < oov_share] = OOV
        return {
            "name": name,
            "target_items": target_items,
            "target_user": target_user,
            "hist_items": hist,
            "hist_len": np.asarray(hist_lens, dtype=np.int64),
        }

    return [
        batch("one candidate, full history", [T], [1]),
        batch("one candidate, empty history", [0], [1]),
        batch("1000 candidates, full history", [T], [1000]),
        batch("unknown items in history and candidates", [T // 2 + 1], [50], oov_share=0.3),
        batch("several users: empty, short, full", [0, 1, 5, T], [3, 1, 20, 40]),
        batch("several users, all empty", [0, 0], [2, 3]),
        batch("random lengths", list(rng.integers(0, T + 1, size=8)), list(rng.integers(1, 30, size=8))),
        batch(
            "interleaved users, different lengths",
            [T, 3, 0, T // 2],
            [7, 12, 2, 30],
            interleave=True,
            junk_padding=True,
        ),
        batch("a user without candidates", [T, 4, T], [5, 0, 9], oov_share=0.1),
    ]


def _reference(model: DIN, case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch training form: each candidate against its user's history, tiled -> (ctr, attention)."""
    tu = torch.from_numpy(case["target_user"])
    hist = torch.from_numpy(case["hist_items"])[tu]
    hist_len = torch.from_numpy(case["hist_len"])[tu]
    target = torch.from_numpy(case["target_items"])
    with torch.no_grad():
        logits, attention = model.forward_explained(target, hist, hist_len)
        return torch.sigmoid(logits).numpy(), attention.numpy()


def check_parity(model: DIN, onnx_path: Path, max_history: int) -> dict[str, Any]:
    """Run every parity case through ONNX Runtime and the PyTorch reference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    results = []
    for case in parity_cases(model.cfg.n_items, max_history):
        feeds = {name: case[name] for name in INPUTS}
        got, got_att = session.run([*OUTPUTS, *OPTIONAL_OUTPUTS], feeds)
        want, want_att = _reference(model, case)
        results.append(
            {
                "name": case["name"],
                "users": len(case["hist_len"]),
                "candidates": len(case["target_items"]),
                "max_abs_diff": float(np.max(np.abs(got - want), initial=0.0)),
                "attention_max_abs_diff": float(np.max(np.abs(got_att - want_att), initial=0.0)),
            }
        )
    return {
        "max_abs_diff": max(max(r["max_abs_diff"], r["attention_max_abs_diff"]) for r in results),
        "tolerance": TOLERANCE,
        "reference": "PyTorch DIN.forward (tiled training form), float32, CPU",
        "cases": results,
    }


def _first_candidates(case: dict[str, Any], n: int) -> dict[str, Any]:
    """A parity case cut to its first n candidates (every user kept, some then without any)."""
    return {**case, "target_items": case["target_items"][:n], "target_user": case["target_user"][:n]}


def check_explain_parity(model: DIN, onnx_path: Path, max_history: int) -> dict[str, Any]:
    """explain.onnx through ONNX Runtime against the PyTorch reference: ctr and attention as
    `check_parity`, contribution against `DIN.leave_one_out` (forward on every shortened history)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    results = []
    for full in parity_cases(model.cfg.n_items, max_history):
        case = _first_candidates(full, EXPLAIN_PARITY_CANDIDATES)
        got = session.run(list(EXPLAIN_OUTPUTS), {name: case[name] for name in INPUTS})
        want_ctr, want_att = _reference(model, case)
        tu = torch.from_numpy(case["target_user"])
        with torch.no_grad():
            want_loo = model.leave_one_out(
                torch.from_numpy(case["target_items"]),
                torch.from_numpy(case["hist_items"])[tu],
                torch.from_numpy(case["hist_len"])[tu],
            ).numpy()
        diffs = [
            float(np.max(np.abs(g - w), initial=0.0))
            for g, w in zip(got, (want_ctr, want_att, want_loo), strict=True)
        ]
        results.append(
            {
                "name": case["name"],
                "users": len(case["hist_len"]),
                "candidates": len(case["target_items"]),
                "max_abs_diff": max(diffs),
                "contribution_max_abs_diff": diffs[2],
            }
        )
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "tolerance": TOLERANCE,
        "reference": "PyTorch DIN.forward and DIN.leave_one_out (tiled training form), float32, CPU",
        "cases": results,
    }


def export_model(
    model: DIN,
    items: list[str],
    out_dir: str | Path,
    *,
    model_version: str | None = None,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    categories: list[str] | None = None,
    lineage: dict[str, Any] | None = None,
    precision: str = "both",
    held_out: HeldOut | None = None,
    quantize: Quantizer = quantize_int8,
) -> dict[str, Any]:
    """Export, check parity, and write the bundle, replacing any at out_dir atomically. Returns the manifest.

    items: item id for every item index (index 0 "<pad>", 1 "<oov>"), len == n_items.
    categories: category id for every category index (len == n_categories); when given, the bundle
    also holds item_categories.txt (line i: the category id of item index i), for people to read.
    model_version defaults to `{name}-{sha256(model.onnx)[:12]}`.
    lineage: where a retrained model came from (`din train --from-log`: parent, data, held-out
    metrics), kept in the manifest as is; `din promote` reads it.
    precision: "fp32" writes model.onnx alone; "both" also model.int8.onnx (model.quantize) when it
    passes the quality gate on `held_out`, and records why not otherwise; "int8" refuses the whole
    export (ExportError) unless the int8 graph passes. model.onnx, the fp32 reference, is always
    written. `quantize`: the quantizer (tests pass deliberately broken ones); the manifest's
    "precision" holds its method and the gate's figures.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = model.eval()
    _check_vocabularies(model, items, categories)
    out_dir = Path(out_dir)
    staging = _staging_dir(out_dir)
    try:
        t0 = time.perf_counter()
        onnx_path = _export_serving_graph(model, staging)
        explain_path = _export_explaining_graph(model, staging)
        export_s = time.perf_counter() - t0
        parity = _serving_parity(model, onnx_path)
        explain_parity = _explaining_parity(model, explain_path)
        int8 = _int8_graph(model, onnx_path, staging, precision, held_out, quantize)
        written = _write_vocabularies(staging, model, items, categories)
        graphs = ["model.onnx", EXPLAIN_GRAPH, *([INT8_GRAPH] if int8 and int8["written"] else [])]
        files = {f: sha256_file(staging / f) for f in [*graphs, *written]}
        if model_version is None:  # the content decides the version: a retrained model is a new one
            model_version = f"{name or 'din-' + model.cfg.pooling}-{files['model.onnx'][:12]}"
        manifest = _manifest(
            model.cfg,
            files,
            model_version=model_version,
            metrics=metrics or {},
            parity=parity,
            explain_parity=explain_parity,
            export_s=export_s,
            source=source or {},
        )
        if lineage is not None:
            manifest["lineage"] = lineage
        if int8 is not None:
            manifest["precision"] = {"int8": int8}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out_dir)
        return manifest
    finally:
        if staging.exists():  # a refused or failed export, or the swapped-out old bundle left over
            shutil.rmtree(staging, ignore_errors=True)


def _int8_graph(
    model: DIN, onnx_path: Path, staging: Path, precision: str, held: HeldOut | None, quantize: Quantizer
) -> dict[str, Any] | None:
    """model.int8.onnx beside model.onnx when `precision` asks for it and the gate passes (None: not
    asked). With precision "int8" a refused graph refuses the export."""
    if precision == "fp32":
        return None
    result = build_int8(onnx_path, staging / INT8_GRAPH, held, model.cfg.n_items, quantize)
    if result["written"]:
        _check_graph(staging / INT8_GRAPH, "the int8 graph", name=INT8_GRAPH)
    elif precision == "int8":
        raise ExportError(f"the int8 graph was refused: {result['reason']}; no bundle written")
    return result


def _check_vocabularies(model: DIN, items: list[str], categories: list[str] | None) -> None:
    """One item id per item index and, when given, one category id per category index."""
    cfg = model.cfg
    if len(items) != cfg.n_items:
        raise ExportError(f"{len(items)} item ids for a model with n_items={cfg.n_items}")
    if categories is not None and len(categories) != cfg.n_categories:
        raise ExportError(f"{len(categories)} category ids for a model with n_categories={cfg.n_categories}")


def _staging_dir(out_dir: Path) -> Path:
    """A new empty directory beside out_dir (same file system, so it can be renamed into place)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
    return staging


def _export_serving_graph(model: DIN, staging: Path) -> Path:
    """model.onnx (DIN.serve_explained), checked as the service will check it."""
    path = staging / "model.onnx"
    _export_onnx(model, path)
    _check_graph(path, "the exported graph")
    return path


def _export_explaining_graph(model: DIN, staging: Path) -> Path:
    """explain.onnx (DIN.serve_contributions), checked against its own contract."""
    path = staging / EXPLAIN_GRAPH
    _export_onnx(model, path, explaining=True)
    _check_graph(
        path, "the exported explaining graph", name=EXPLAIN_GRAPH, outputs=EXPLAIN_OUTPUTS, optional={}
    )
    return path


def _check_graph(path: Path, what: str, **contract: Any) -> None:
    """ONNX's full check, then what the service checks on load (check_model with `contract`): refuse
    here rather than write a bundle it would refuse."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    try:
        check_model(path.read_bytes(), **contract)
    except BundleError as e:
        raise ExportError(f"{what} breaks the bundle contract: {e}; no bundle written") from None


def _serving_parity(model: DIN, onnx_path: Path) -> dict[str, Any]:
    """check_parity's report; refuses (ExportError) unless every case is within TOLERANCE."""
    parity = check_parity(model, onnx_path, model.cfg.max_history)
    if not parity["max_abs_diff"] <= TOLERANCE:  # also refuses NaN
        worst = max(parity["cases"], key=lambda c: max(c["max_abs_diff"], c["attention_max_abs_diff"]))
        raise ExportError(
            f"parity check failed: ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} "
            f"(> {TOLERANCE:g}) on case {worst['name']!r}; no bundle written"
        )
    return parity


def _explaining_parity(model: DIN, explain_path: Path) -> dict[str, Any]:
    """check_explain_parity's report; refuses (ExportError) unless every case is within TOLERANCE."""
    parity = check_explain_parity(model, explain_path, model.cfg.max_history)
    if not parity["max_abs_diff"] <= TOLERANCE:  # also refuses NaN
        worst = max(parity["cases"], key=lambda c: c["max_abs_diff"])
        raise ExportError(
            f"parity check failed: {EXPLAIN_GRAPH} differs from PyTorch by "
            f"{parity['max_abs_diff']:.3g} (> {TOLERANCE:g}) on case {worst['name']!r}; "
            "no bundle written"
        )
    return parity


def _write_vocabularies(
    staging: Path, model: DIN, items: list[str], categories: list[str] | None
) -> list[str]:
    """items.txt and, with categories, item_categories.txt (line i: item i's category id); their names."""
    write_vocab(staging / "items.txt", items)
    if categories is None:
        return ["items.txt"]
    write_vocab(staging / ITEM_CATEGORIES, [categories[c] for c in model.item_cate.tolist()])
    return ["items.txt", ITEM_CATEGORIES]


def _manifest(
    cfg: DINConfig,
    files: dict[str, str],
    *,
    model_version: str,
    metrics: dict[str, Any],
    parity: dict[str, Any],
    explain_parity: dict[str, Any],
    export_s: float,
    source: dict[str, Any],
) -> dict[str, Any]:
    """manifest.json: what the bundle holds and how it was checked (the bundle contract's keys)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "max_history": cfg.max_history,
        "pad_index": PAD,
        "oov_index": OOV,
        "inputs": INPUTS,
        "outputs": OUTPUTS | OPTIONAL_OUTPUTS,
        "input_dtype": "int64",
        "output_dtype": "float32",
        "vocab": {"items": cfg.n_items, "categories": cfg.n_categories},
        "metrics": metrics,
        "parity": parity,
        "explain": {"graph": EXPLAIN_GRAPH, "outputs": EXPLAIN_OUTPUTS, "parity": explain_parity},
        "export_seconds": round(export_s, 2),
        "source": source,
        "files": files,
    }


def export(run_dir: str | Path, out_dir: str | Path, precision: str = "both") -> dict[str, Any]:
    """Rebuild the model from RUN_DIR's checkpoint alone and export it. The int8 graph's gate runs on
    the test split of the data the run was trained on (train_args.data_dir), when it is still there."""
    from model.checkpoint import load_run

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise ExportError(f"{run_dir / 'checkpoint.pt'}: no checkpoint (run `din train` first)")
    model, ckpt = load_run(run_dir)
    test = (ckpt.metrics or {}).get("test", {})
    held = None
    data_dir = ckpt.train_args.get("data_dir")
    if precision != "fp32" and data_dir and (Path(data_dir) / "meta.json").is_file():
        held = held_out_from_data(data_dir, model.cfg.max_history)
    return export_model(
        model,
        list(ckpt.items),
        out_dir,
        name=run_dir.resolve().name,
        metrics=test,
        source={"run_dir": str(run_dir.resolve()), "best_epoch": ckpt.best_epoch},
        categories=list(ckpt.categories),
        precision=precision,
        held_out=held,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a directory written by `din train`")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (replaced)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="both",
        help="fp32: model.onnx only; both (default): also model.int8.onnx if it passes the quality gate "
        "on the run's held-out samples; int8: as both, but fail unless the int8 graph is written",
    )


def run(args: argparse.Namespace) -> int:
    try:
        manifest = export(args.run_dir, args.out, args.precision)
    except ExportError as e:
        print(f"din export: {e}", file=sys.stderr)
        return 2
    print(f"{'case':<42} {'users':>5} {'cands':>6} {'max |onnx - torch|':>19}")
    for c in manifest["parity"]["cases"]:
        print(f"{c['name']:<42} {c['users']:>5} {c['candidates']:>6} {c['max_abs_diff']:>19.2e}")
    explain = manifest["explain"]["parity"]
    print(f"{EXPLAIN_GRAPH + ' (contributions)':<42} {'':>5} {'':>6} {explain['max_abs_diff']:>19.2e}")
    int8 = manifest.get("precision", {}).get("int8")
    if int8 is not None:
        _print_int8(int8)
    print(
        f"\nwrote {args.out}  model_version={manifest['model_version']}  "
        f"max_abs_diff={manifest['parity']['max_abs_diff']:.2e} (tolerance {TOLERANCE:g})  "
        f"export {manifest['export_seconds']}s"
    )
    return 0


def _print_int8(int8: dict[str, Any]) -> None:
    """The int8 graph's gate, as `din export` prints it."""
    gate = int8.get("gate")
    if gate:
        tau = "n/a" if gate["kendall_tau_mean"] is None else f"{gate['kendall_tau_mean']:.4f}"
        print(
            f"\nint8 gate on {gate['samples']} held-out samples: "
            f"AUC {gate['auc_fp32']:.4f} -> {gate['auc_int8']:.4f} (drop {gate['auc_drop']:.2e}), "
            f"GAUC {gate['gauc_fp32']:.4f} -> {gate['gauc_int8']:.4f} (drop {gate['gauc_drop']:.2e}); "
            f"{gate['requests']} requests x {gate['candidates_per_request']} candidates: "
            f"top-10 overlap {gate['top10_overlap']:.4f}, Kendall tau {tau}; "
            f"max |int8 - fp32| {gate['max_abs_diff']:.2e}"
        )
    if int8["written"]:
        print(f"wrote {INT8_GRAPH}")
    else:
        print(f"{INT8_GRAPH} not written: {int8['reason']}")
