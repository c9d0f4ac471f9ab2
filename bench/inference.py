"""Serving-graph benchmark: three ONNX graphs of the same model, timed in one run on this machine.

- graph    : the exported serving graph (DIN.serve_explained, what `din export` writes): per user,
             the item half of the first attention layer for every (candidate, behaviour) pair is one
             GEMM [q_item, 1] @ K; the category half is computed once per distinct category of the
             history (a GEMM against C << T columns) and gathered onto the behaviours; from that GEMM
             to the scores it runs in slices of the history (~3k pairs each), so the activations
             stay in cache
- previous : the serving graph before the slicing (PREVIOUS_SERVE below, the previous stop's graph,
             kept for comparison only): the same algebra over the whole (U, n, T, H1) tensor at once
- tiled    : the training form (DIN.forward) exported as-is: every candidate re-reads its tiled
             history through the [q, k, q-k, q*k] (N, T, 4E) input

Histories are drawn from a few categories, as real ones are (HISTORY_CATEGORIES: the median
distinct categories of a 100-item `din synth` history); one row has every behaviour in its own
category, the worst case for the deduplication.

Each cell reports the median milliseconds per call, nominal GFLOP/s, the share of numpy's float32
matmul rate measured in the same cell (same process, interleaved with the graphs), and the largest
absolute difference of the graph's ctr from the PyTorch reference (DIN.forward, tiled, eager).

Nominal FLOPs count the attention MLP per (candidate, behaviour) pair at its nominal size,
2 * (E*H1 + H1*H2 + H2), whatever the graph actually computes (deduplicated work counts in full).
The sgemm reference is numpy's (N*T, E) @ (E, H1), the shape of the pair term's GEMM in the plain formulation;
the same product in ONNX Runtime's own kernel (MLAS, a one-node graph) is timed beside it, because the two
libraries' kernels differ by machine (on an AVX-512 core numpy's OpenBLAS can trail MLAS, which lifts a
graph's share of numpy's rate past 100%).

Latencies are one call on all cores (ORT_ENABLE_ALL, default intra-op threads and spinning); a
second table varies the ONNX Runtime settings for the new graph; a third compares throughput on all
cores, for this graph and the previous one: one such call at a time, or one call per core side by
side with one thread each (what the service runs: DIN_INFERENCE_WORKERS, DIN_INTRA_OP_THREADS auto).
The slicing pays most there: two calls side by side share the memory bus and the L3.

    python bench/inference.py [--seconds 0.6] [--out bench/results]      (make bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor
from torch.nn import functional as F

from contracts.vocab import FIRST_ID, OOV, PAD
from model.din import DIN, DINConfig, build_model
from model.export import export_graph
from service.config import usable_cores

# Distinct categories in a user's last 100 behaviours: median 22 (p90 27) in `din synth` data
# (--users 2000 --items 20000 --events-per-user 150); Amazon histories are as concentrated.
HISTORY_CATEGORIES = 22
# (users, candidates per user, history length T, distinct categories per history)
GRID = [(1, 50, 20, 10), (1, 50, 100, 22), (1, 200, 20, 10), (1, 200, 100, 22), (1, 1000, 20, 10)]
GRID += [(1, 1000, 100, 22), (2, 200, 100, 22), (4, 200, 100, 22), (8, 200, 100, 22)]
GRID += [(1, 200, 100, 100)]  # the worst case for the deduplication: every behaviour its own category
GRAPHS = ("graph", "previous", "tiled")


# ------------------------------------------------------------------ benchmark-only graphs


def PREVIOUS_SERVE(
    self: DIN, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
) -> tuple[Tensor, Tensor]:
    """BENCHMARK ONLY: DIN.serve_explained as it was before the attention ran in slices of the history
    (the graph of the previous stop): the same algebra, but the first layer's (U, n, T, H1+1)
    activations are one tensor that the GEMM writes and the gather-add, the sigmoid and the next
    layer each read back from memory.

    Kept verbatim (attention pooling, no softmax: the benchmark's model) so the benchmark can export
    and time it next to the current graph; nothing else uses it.
    """
    U, T = hist_items.shape
    N = target_items.shape[0]
    E = self.cfg.embed_dim
    q = self.embed(target_items)  # (N, E)
    k = self.embed(hist_items)  # (U, T, E): once per user
    mask = self._mask(hist_len, T)  # (U, T)
    pair, hist, hidden, out = self._serve_attention_weights()
    H = pair.shape[-1]  # H1 + 1 (the constant unit)
    Ei = self.cfg.item_dim
    Ec = E - Ei
    slot, n_max = self._serve_slots(target_user, U, N)
    ones = torch.ones(N, 1, dtype=q.dtype)
    grid = torch.zeros(U * n_max, Ei + 1, dtype=q.dtype)
    q_item = grid.index_put((slot,), torch.cat([q[:, :Ei], ones], 1)).view(U, n_max, Ei + 1)
    q_cate = torch.zeros(U * n_max, Ec, dtype=q.dtype).index_put((slot,), q[:, Ei:]).view(U, n_max, Ec)

    kt = k[..., :Ei].transpose(1, 2).unsqueeze(-1)  # (U, Ei, T, 1)
    key_pair = torch.matmul(torch.cat([kt, torch.ones_like(kt)], -1), pair[:Ei])  # (U, Ei, T, H)
    key_hist = torch.matmul(k, hist[:E]) + hist[E]  # (U, T, H)
    keys = torch.cat([key_pair.reshape(U, Ei, T * H), key_hist.reshape(U, 1, T * H)], 1)  # (U, Ei+1, T*H)
    h_item = torch.matmul(q_item, keys)  # (U, n_max, T*H)

    cats, cat_slot, C = self._serve_categories(hist_items)  # (U, C), (U, T)
    kc = self.cate_emb(cats).transpose(1, 2).unsqueeze(-1)  # (U, Ec, C, 1)
    cate_keys = torch.matmul(torch.cat([kc, torch.ones_like(kc)], -1), pair[Ei:])  # (U, Ec, C, H)
    h_cate = torch.matmul(q_cate, cate_keys.reshape(U, Ec, C * H))  # (U, n_max, C*H)
    rows = torch.arange(U * n_max).view(U, n_max, 1) * C + cat_slot.unsqueeze(1)  # (U, n_max, T)
    h = h_item.view(U, n_max, T, H) + F.embedding(rows, h_cate.reshape(U * n_max * C, H))  # 1st layer
    a = torch.sigmoid(h).reshape(U * n_max * T, H)
    for W in hidden:
        a = torch.sigmoid(torch.matmul(a, W))
    scores = torch.matmul(out, a.T).reshape(U, n_max, T)  # (U, n_max, T)
    u_grid = torch.matmul(scores, k * mask.unsqueeze(-1).to(k.dtype))
    weights = scores.reshape(U * n_max, T)[slot].masked_fill(~mask[target_user], 0.0)
    u = u_grid.reshape(U * n_max, E)[slot]  # (N, E)
    return torch.sigmoid(self._serve_head(u, q)), weights


def TILED_SERVE(
    self: DIN, target_items: Tensor, target_user: Tensor, hist_items: Tensor, hist_len: Tensor
) -> tuple[Tensor, Tensor]:
    """BENCHMARK ONLY: the training form behind the serving inputs (tiles the history per candidate).
    Its second output is the mask (the graph must have two outputs; its cost is the ctr's)."""
    hist, lens = hist_items[target_user], hist_len[target_user]
    mask = DIN._mask(lens, hist.shape[1]).to(torch.float32)
    return torch.sigmoid(DIN.forward(self, target_items, hist, lens)), mask


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
    """An ORT session: ORT_ENABLE_ALL, default threads and spinning, unless overridden."""
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


def matmul_session(K: int, N: int) -> ort.InferenceSession:
    """ONNX Runtime's own float32 matrix multiply, (M, K) @ (K, N) with the weights in the graph, on
    all cores like the graphs: the second yardstick (MLAS), next to numpy's (OpenBLAS)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).random((K, N), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def calls_per_second(
    s: ort.InferenceSession, f: dict[str, np.ndarray], threads: int, seconds: float
) -> float:
    """Calls a second with `threads` Python threads calling `s` at once (ORT releases the GIL)."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        s.run(["ctr"], f)  # warm
        while time.perf_counter() < stop:
            s.run(["ctr"], f)
            done[i] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - t0)


def random_model(items: int, categories: int) -> tuple[DIN, list[np.ndarray]]:
    """The benchmarks' model: a DIN of random weights (seed 0) over `items` items in `categories`
    categories (also seed 0), in eval mode; and each category's item indices (non-empty ones only),
    from which `make_feeds` draws histories of distinct categories."""
    g = torch.Generator().manual_seed(0)
    item_cate = torch.randint(FIRST_ID, categories, (items,), generator=g)
    item_cate[:FIRST_ID] = torch.tensor([PAD, OOV])
    cate = item_cate.numpy()
    by_category = [np.flatnonzero(cate == c) for c in range(FIRST_ID, categories)]
    cfg = DINConfig(n_items=items, n_categories=categories)
    return build_model(cfg, item_cate, seed=0).eval(), [ids for ids in by_category if len(ids)]


def make_feeds(
    rng: np.random.Generator, U: int, C: int, T: int, K: int, by_category: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """U users, C random candidates each, histories of T items drawn from K distinct categories."""
    n_items = sum(len(items) for items in by_category) + FIRST_ID
    hist = np.zeros((U, T), dtype=np.int64)
    for u in range(U):
        cats = rng.choice(len(by_category), size=min(K, T), replace=False)
        order = np.concatenate([cats, rng.choice(cats, size=T - len(cats))]) if T else cats[:0]
        hist[u] = [rng.choice(by_category[c]) for c in rng.permutation(order)]
    return {
        "target_items": rng.integers(FIRST_ID, n_items, U * C).astype(np.int64),
        "target_user": np.repeat(np.arange(U, dtype=np.int64), C),
        "hist_items": hist,
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

    model, by_category = random_model(args.items, args.categories)
    E, (H1, H2) = model.cfg.embed_dim, model.cfg.att_hidden
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
    throughput: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in GRAPHS}
        export_graph(model, paths["graph"])
        export_graph(model, paths["previous"], PREVIOUS_SERVE)
        export_graph(model, paths["tiled"], TILED_SERVE)
        sessions = {name: session(p) for name, p in paths.items()}
        mm = matmul_session(E, H1)

        rng = np.random.default_rng(0)
        hdr = (
            f"{'U':>2} {'N/user':>6} {'T':>4} {'cats':>4} |"
            + "".join(f" {n + ' ms':>11}" for n in GRAPHS)
            + f" | {'sgemm GF/s':>10} {'ORT mm GF/s':>11} |"
            + "".join(f" {n + ' GF/s':>13}" for n in GRAPHS)
            + " |"
            + "".join(f" {n + ' %sgemm':>15}" for n in GRAPHS)
            + f" {'graph %ORT mm':>13}"
            + f" | {'max|d| graph':>12} {'previous':>9} {'tiled':>9} | clean"
        )
        print("\n" + hdr + "\n" + "-" * len(hdr))
        for U, C, T, K in GRID:
            f = make_feeds(rng, U, C, T, K, by_category)
            want = reference(model, f)
            diffs = {name: float(np.max(np.abs(s.run(None, f)[0] - want))) for name, s in sessions.items()}
            a = np.asarray(rng.random((U * C * T, E)), dtype=np.float32)
            b = np.asarray(rng.random((E, H1)), dtype=np.float32)
            fns: dict[str, Callable[[], Any]] = {
                name: (lambda s=s, f=f: s.run(["ctr"], f)) for name, s in sessions.items()
            }
            fns["sgemm"] = lambda a=a, b=b: a @ b
            fns["ort_mm"] = lambda a=a: mm.run(None, {"a": a})
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
                graph = sessions["graph"]
                fns["graph_separate"] = lambda s=graph, fs=singles: [s.run(["ctr"], x) for x in fs]
            ms, clean = time_interleaved(fns, args.seconds, {"sgemm": 0.25})
            flops = U * C * T * pair_flops
            sgemm = 2 * U * C * T * E * H1 / ms["sgemm"] / 1e6
            ort_mm = 2 * U * C * T * E * H1 / ms["ort_mm"] / 1e6
            gflops = {n: flops / ms[n] / 1e6 for n in GRAPHS}
            row: dict[str, Any] = {
                "users": U,
                "candidates_per_user": C,
                "T": T,
                "history_categories": K,
                "nominal_gflop": flops / 1e9,
                "ms": {n: ms[n] for n in GRAPHS},
                "gflops": gflops,
                "sgemm_gflops": sgemm,
                "sgemm_shape": [U * C * T, E, H1],
                "share_of_sgemm": {n: gflops[n] / sgemm for n in GRAPHS},
                "ort_matmul_gflops": ort_mm,
                "share_of_ort_matmul": {n: gflops[n] / ort_mm for n in GRAPHS},
                "max_abs_diff": diffs,
                "clean_rounds": clean,
            }
            if U > 1:
                row["graph_separate_calls_ms"] = ms["graph_separate"]
            rows.append(row)
            print(
                f"{U:>2} {C:>6} {T:>4} {K:>4} |"
                + "".join(f" {ms[n]:>11.2f}" for n in GRAPHS)
                + f" | {sgemm:>10.0f} {ort_mm:>11.0f} |"
                + "".join(f" {gflops[n]:>13.0f}" for n in GRAPHS)
                + " |"
                + "".join(f" {gflops[n] / sgemm:>15.0%}" for n in GRAPHS)
                + f" {gflops['graph'] / ort_mm:>13.0%}"
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
        f = make_feeds(rng, U, C, T, HISTORY_CATEGORIES, by_category)
        L = ort.GraphOptimizationLevel
        variants: dict[str, dict[str, Any]] = {
            "ENABLE_ALL, default threads, spinning": {},
            "intra_op_num_threads=1": {"threads": 1},
            "spinning off": {"spinning": False},
            "threads=1, spinning off": {"threads": 1, "spinning": False},
            "ORT_ENABLE_EXTENDED": {"level": L.ORT_ENABLE_EXTENDED},
            "ORT_ENABLE_BASIC": {"level": L.ORT_ENABLE_BASIC},
            "cpu mem arena off": {"arena": False},
        }
        fns = {n: (lambda s=session(paths["graph"], **kw): s.run(["ctr"], f)) for n, kw in variants.items()}
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

        # Throughput on every core: one call at a time on all of them (intra-op threads), or one call
        # per core side by side, one thread each (the service's default: DIN_INFERENCE_WORKERS).
        cores = usable_cores()
        one, many = "one call at a time, all cores", f"{cores} calls side by side, 1 thread each"
        single_thread = {name: session(paths[name], threads=1) for name in ("graph", "previous")}
        print(f"\nthroughput on {cores} cores (median of 3 interleaved rounds)")
        for U in (1, 2):
            f = make_feeds(rng, U, C, T, HISTORY_CATEGORIES, by_category)
            for name, side in single_thread.items():
                rates: dict[str, list[float]] = {one: [], many: []}
                for _ in range(3):
                    rates[one].append(calls_per_second(sessions[name], f, 1, 2 * args.seconds))
                    rates[many].append(calls_per_second(side, f, cores, 2 * args.seconds))
                for how, values in rates.items():
                    rate = float(np.median(values))
                    throughput.append(
                        {
                            "graph": name,
                            "users": U,
                            "candidates_per_user": C,
                            "T": T,
                            "how": how,
                            "calls_per_s": rate,
                            "users_per_s": U * rate,
                            "rounds": values,
                        }
                    )
                    print(
                        f"  {U} x {C} x T={T}  {name:<8} {how:<34} {rate:7.1f} calls/s"
                        f" {U * rate:7.1f} users/s  ({', '.join(f'{v:.1f}' for v in values)})"
                    )

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
            "session": "ORT_ENABLE_ALL, default intra-op threads and spinning (one call on all cores)",
            "timing": "median per call over interleaved blocks; sgemm = numpy float32 (N*T, E) @ (E, H1); "
            "ORT mm = the same product as a one-node ONNX Runtime graph (MLAS), all cores",
        },
        "graphs": {
            "graph": "DIN.serve_explained: per user, the item half as one GEMM [q_item,1] @ K, the category "
            "half once per distinct history category, then gathered; the attention in slices of the history",
            "previous": "PREVIOUS_SERVE in bench/inference.py: the same, over the whole history at once",
            "tiled": "DIN.forward behind the serving inputs: (N, T, 4E) attention input",
        },
        "grid": rows,
        "ort_settings": settings,
        "throughput": throughput,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'inference.json'} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
