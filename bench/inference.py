"""Serving-graph benchmark: three ONNX graphs of the same model, timed in one run on this machine.

- graph    : the exported serving graph (DIN.serve, what `din export` writes): per user, the first
             attention layer of every (candidate, behaviour) pair is one GEMM [q, 1] @ K
- previous : the serving graph before that (PREVIOUS_SERVE below, kept here for comparison only):
             history terms once per user, but q*k materialised as (N, T, E), per-candidate gathers
             of the history, broadcast adds over (N, T, H1), a batched (N,1,T)x(N,T,E) pooling
- tiled    : the training form (DIN.forward) exported as-is: every candidate re-reads its tiled
             history through the [q, k, q-k, q*k] (N, T, 4E) input

Each cell reports the median milliseconds per call, nominal GFLOP/s, the share of numpy's float32
matmul rate measured in the same cell (same process, interleaved with the graphs), and the largest
absolute difference of the graph's ctr from the PyTorch reference (DIN.forward, tiled, eager).

Nominal FLOPs count the attention MLP per (candidate, behaviour) pair at its nominal size,
2 * (E*H1 + H1*H2 + H2), whatever the graph actually computes. The sgemm reference is numpy's
(N*T, E) @ (E, H1), the shape of the pair term's GEMM in the plain formulation.

Sessions use the service's settings (service/ranker.py: ORT_ENABLE_ALL, default intra-op threads,
default spinning); a second table varies the ONNX Runtime settings for the new graph.

    python bench/inference.py [--seconds 0.6] [--out bench/results]      (make bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

import model.export as export_mod
from model.din import DIN, DINConfig, build_model
from model.vocab import FIRST_ID, OOV, PAD

# (users, candidates per user, history length T)
GRID = [(1, 50, 20), (1, 50, 100), (1, 200, 20), (1, 200, 100), (1, 1000, 20), (1, 1000, 100)]
GRID += [(2, 200, 100), (4, 200, 100), (8, 200, 100)]
GRAPHS = ("graph", "previous", "tiled")


# ------------------------------------------------------------------ benchmark-only graphs


def PREVIOUS_SERVE(
    self: DIN, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
) -> Tensor:
    """BENCHMARK ONLY: DIN.serve as it was before the per-user GEMM rewrite (commit b8f2108).

    Kept verbatim so the benchmark can export and time it next to the current graph; nothing
    else uses it.
    """
    T = hist_items.shape[1]
    q = self.embed(target_items)  # (N, E)
    k_user = self.embed(hist_items)  # (U, T, E): once per user
    mask = self._mask(hist_len, T)[target_user]  # (N, T)
    k = k_user[target_user]  # (N, T, E): a gather, the history is not recomputed
    if self.cfg.pooling == "sum":
        u = self._pool(mask.to(k.dtype), k, mask)
    else:
        Wq, Wk, Wp, b = self._first_layer_split()
        h_user = k_user @ Wk.T + b  # (U, T, H1): the history term, once per user
        h_cand = q @ Wq.T  # (N, H1): the target term, once per candidate
        h = h_user[target_user] + h_cand.unsqueeze(1) + (q.unsqueeze(1) * k) @ Wp.T  # (N, T, H1)
        u = self._pool(self._att_tail(h), k, mask)  # (N, E)
    return torch.sigmoid(self._head(u, q))


def TILED_SERVE(
    self: DIN, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
) -> Tensor:
    """BENCHMARK ONLY: the training form behind the serving inputs (tiles the history per candidate)."""
    return torch.sigmoid(DIN.forward(self, target_items, hist_items[target_user], hist_len[target_user]))


def export_with(model: DIN, serve: Callable[..., Tensor] | None, path: Path) -> None:
    """Export `serve` (None: the real DIN.serve) through the normal exporter."""
    original = DIN.serve
    if serve is not None:
        DIN.serve = serve  # type: ignore[method-assign]
    try:
        export_mod._export_onnx(model, path)
    finally:
        DIN.serve = original  # type: ignore[method-assign]


# ------------------------------------------------------------------ measurement


def cpu_line() -> tuple[str, str]:
    """CPU model name and flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    except OSError:
        pass
    return name, flags


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot; (0, 1) where there is no /proc/stat."""
    if not os.path.exists("/proc/stat"):
        return 0, 1
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(max_wait: float = 2.0, window: float = 0.1, threshold: float = 0.15) -> bool:
    """Other processes share the cores: wait (bounded) until the machine is nearly idle."""
    if not os.path.exists("/proc/stat"):
        return True
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        b0, a0 = _cpu_busy()
        time.sleep(window)
        b1, a1 = _cpu_busy()
        if (b1 - b0) / max(a1 - a0, 1) < threshold:
            return True
    return False


def time_interleaved(
    fns: dict[str, Callable[[], Any]], seconds: float, settle: dict[str, float] | None = None
) -> tuple[dict[str, float], float]:
    """Median ms per call of each fn, and the share of rounds that ran on an otherwise idle machine.
    A round during which other processes used more than 0.15 of a core is done again (at most
    twice as many rounds in all).

    Rounds of short blocks, one block per fn per round, so drift and other processes' load hit
    every fn alike. The first two calls of a block are dropped, and after a block the machine is
    left alone for settle[name] seconds (default 10 ms): both ORT's and OpenBLAS's worker threads
    spin after a call (OpenBLAS for ~0.1 s), which would otherwise slow whatever runs next.
    """
    settle = settle or {}
    for fn in fns.values():  # warm-up: allocations, ORT's first-run work
        fn()
        fn()
    per_call = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-5)
    rounds, kept, attempts = 6, 0, 0
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clean = 0
    while kept < rounds:
        attempts += 1
        wait_quiet()
        busy0, wall0, self0 = _cpu_busy()[0], time.perf_counter(), _self_cpu()
        block_samples = {}
        for name, fn in fns.items():
            n = 2 + max(1, min(60, int(seconds / rounds / per_call[name])))
            block = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                block.append(time.perf_counter() - t)
            block_samples[name] = block[2:]
            time.sleep(settle.get(name, 0.01))
        # CPU time other processes took during the round, in cores; a loaded round is redone
        others = ((_cpu_busy()[0] - busy0) / _TICKS - (_self_cpu() - self0)) / (time.perf_counter() - wall0)
        clean += others < 0.15
        if others < 0.15 or attempts >= 2 * rounds:
            kept += 1
            for name, block in block_samples.items():
                samples[name] += block
    return {name: statistics.median(v) * 1000 for name, v in samples.items()}, clean / attempts


def session(path: Path, **kw: Any) -> ort.InferenceSession:
    """An ORT session with the service's settings unless overridden."""
    so = ort.SessionOptions()
    so.graph_optimization_level = kw.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if kw.get("threads"):
        so.intra_op_num_threads = kw["threads"]
    if "spinning" in kw:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if kw["spinning"] else "0")
    if "arena" in kw:
        so.enable_cpu_mem_arena = kw["arena"]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def make_feeds(rng: np.random.Generator, U: int, C: int, T: int, n_items: int) -> dict[str, np.ndarray]:
    return {
        "target_items": rng.integers(FIRST_ID, n_items, U * C).astype(np.int64),
        "target_user": np.repeat(np.arange(U, dtype=np.int64), C),
        "hist_items": rng.integers(FIRST_ID, n_items, (U, T)).astype(np.int64),
        "hist_len": np.full(U, T, dtype=np.int64),
    }


def reference(model: DIN, f: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in f.items()}
    tu = t["target_user"]
    with torch.no_grad():
        return torch.sigmoid(model(t["target_items"], t["hist_items"][tu], t["hist_len"][tu])).numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=63_000, help="item vocabulary (Electronics: 63k)")
    ap.add_argument("--categories", type=int, default=800)
    ap.add_argument("--seconds", type=float, default=0.6, help="timing per graph per cell")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    t_start = time.perf_counter()

    g = torch.Generator().manual_seed(0)
    item_cate = torch.randint(FIRST_ID, args.categories, (args.items,), generator=g)
    item_cate[:FIRST_ID] = torch.tensor([PAD, OOV])
    cfg = DINConfig(n_items=args.items, n_categories=args.categories)
    model = build_model(cfg, item_cate, seed=0).eval()
    E, (H1, H2) = cfg.embed_dim, cfg.att_hidden
    pair_flops = 2 * (E * H1 + H1 * H2 + H2)

    cpu, flags = cpu_line()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")
    simd = [f for f in wanted if f in flags.split()]
    print(f"CPU: {cpu}  ({os.cpu_count()} logical CPUs)")
    print(f"flags: {flags}")
    print(f"SIMD: {' '.join(simd)}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, torch {torch.__version__}")

    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in GRAPHS}
        export_with(model, None, paths["graph"])
        export_with(model, PREVIOUS_SERVE, paths["previous"])
        export_with(model, TILED_SERVE, paths["tiled"])
        sessions = {name: session(p) for name, p in paths.items()}

        rng = np.random.default_rng(0)
        hdr = (
            f"{'U':>2} {'N/user':>6} {'T':>4} |"
            + "".join(f" {n + ' ms':>11}" for n in GRAPHS)
            + f" | {'sgemm GF/s':>10} |"
            + "".join(f" {n + ' GF/s':>13}" for n in GRAPHS)
            + " |"
            + "".join(f" {n + ' %sgemm':>15}" for n in GRAPHS)
            + f" | {'max|d| graph':>12} {'previous':>9} {'tiled':>9} | clean"
        )
        print("\n" + hdr + "\n" + "-" * len(hdr))
        for U, C, T in GRID:
            f = make_feeds(rng, U, C, T, args.items)
            want = reference(model, f)
            diffs = {name: float(np.max(np.abs(s.run(None, f)[0] - want))) for name, s in sessions.items()}
            a = np.asarray(rng.random((U * C * T, E)), dtype=np.float32)
            b = np.asarray(rng.random((E, H1)), dtype=np.float32)
            fns: dict[str, Callable[[], Any]] = {
                name: (lambda s=s, f=f: s.run(None, f)) for name, s in sessions.items()
            }
            fns["sgemm"] = lambda a=a, b=b: a @ b
            if U > 1:  # the same users, one call each
                singles = [
                    {
                        "target_items": f["target_items"][u * C : (u + 1) * C],
                        "target_user": np.zeros(C, dtype=np.int64),
                        "hist_items": f["hist_items"][u : u + 1],
                        "hist_len": f["hist_len"][u : u + 1],
                    }
                    for u in range(U)
                ]
                fns["graph_separate"] = lambda s=sessions["graph"], fs=singles: [s.run(None, x) for x in fs]
            ms, clean = time_interleaved(fns, args.seconds, {"sgemm": 0.25})
            flops = U * C * T * pair_flops
            sgemm = 2 * U * C * T * E * H1 / ms["sgemm"] / 1e6
            gflops = {n: flops / ms[n] / 1e6 for n in GRAPHS}
            row: dict[str, Any] = {
                "users": U,
                "candidates_per_user": C,
                "T": T,
                "nominal_gflop": flops / 1e9,
                "ms": {n: ms[n] for n in GRAPHS},
                "gflops": gflops,
                "sgemm_gflops": sgemm,
                "sgemm_shape": [U * C * T, E, H1],
                "share_of_sgemm": {n: gflops[n] / sgemm for n in GRAPHS},
                "max_abs_diff": diffs,
                "clean_rounds": clean,
            }
            if U > 1:
                row["graph_separate_calls_ms"] = ms["graph_separate"]
            rows.append(row)
            print(
                f"{U:>2} {C:>6} {T:>4} |"
                + "".join(f" {ms[n]:>11.2f}" for n in GRAPHS)
                + f" | {sgemm:>10.0f} |"
                + "".join(f" {gflops[n]:>13.0f}" for n in GRAPHS)
                + " |"
                + "".join(f" {gflops[n] / sgemm:>15.0%}" for n in GRAPHS)
                + f" | {diffs['graph']:>12.1e} {diffs['previous']:>9.1e} {diffs['tiled']:>9.1e} | {clean:.0%}"
            )
        for row in rows:
            if "graph_separate_calls_ms" in row:
                print(
                    f"U={row['users']} x {row['candidates_per_user']}: graph one call "
                    f"{row['ms']['graph']:.2f} ms, {row['users']} separate calls "
                    f"{row['graph_separate_calls_ms']:.2f} ms"
                )

        # ONNX Runtime settings for the new graph, 1 user x 200 x T=100
        U, C, T = 1, 200, 100
        f = make_feeds(rng, U, C, T, args.items)
        L = ort.GraphOptimizationLevel
        variants: dict[str, dict[str, Any]] = {
            "service (ENABLE_ALL, default threads, spinning)": {},
            "intra_op_num_threads=1": {"threads": 1},
            "spinning off": {"spinning": False},
            "threads=1, spinning off": {"threads": 1, "spinning": False},
            "ORT_ENABLE_EXTENDED": {"level": L.ORT_ENABLE_EXTENDED},
            "ORT_ENABLE_BASIC": {"level": L.ORT_ENABLE_BASIC},
            "cpu mem arena off": {"arena": False},
        }
        fns = {n: (lambda s=session(paths["graph"], **kw): s.run(None, f)) for n, kw in variants.items()}
        a = np.asarray(rng.random((U * C * T, E)), dtype=np.float32)
        b = np.asarray(rng.random((E, H1)), dtype=np.float32)
        fns["sgemm"] = lambda: a @ b
        ms, clean = time_interleaved(fns, args.seconds, {"sgemm": 0.25})
        sgemm = 2 * U * C * T * E * H1 / ms["sgemm"] / 1e6
        print(f"\nORT settings, graph at 1 x {C} x T={T} (sgemm {sgemm:.0f} GF/s, clean rounds {clean:.0%})")
        for name in variants:
            gf = U * C * T * pair_flops / ms[name] / 1e6
            settings.append({"setting": name, "ms": ms[name], "gflops": gf, "share_of_sgemm": gf / sgemm})
            print(f"  {name:<48} {ms[name]:7.2f} ms {gf:6.0f} GF/s {gf / sgemm:5.0%}")

    report = {
        "command": "python bench/inference.py (make bench)",
        "machine": {
            "cpu": cpu,
            "simd_flags": simd,
            "cpu_flags": flags,
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "config": {
            "items": args.items,
            "categories": args.categories,
            "E": E,
            "att_hidden": [H1, H2],
            "nominal_flops_per_pair": pair_flops,
            "session": "ORT_ENABLE_ALL, default intra-op threads and spinning (the service's)",
            "timing": "median per call over interleaved blocks; sgemm = numpy float32 (N*T, E) @ (E, H1)",
        },
        "graphs": {
            "graph": "DIN.serve: per-user GEMM [q,1] @ K (no (N,T,E) tensor, no per-candidate gather)",
            "previous": "PREVIOUS_SERVE in bench/inference.py: the serving graph before the rewrite",
            "tiled": "DIN.forward behind the serving inputs: (N, T, 4E) attention input",
        },
        "grid": rows,
        "ort_settings": settings,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'inference.json'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
