"""Serving-graph benchmark: what "tile without tiling" buys, measured in one run on this machine.

Three ways to score N candidates of U users against histories of length T, same weights:
- rewrite : the exported serving graph (DIN.serve in ONNX Runtime): history terms once per user
- tiled   : the training form exported as-is to ONNX Runtime: every candidate re-reads its tiled
            history through the [q, k, q-k, q*k] (N, T, 4E) input
- torch   : the PyTorch reference (DIN.forward, eager, no grad)
Reported as median milliseconds per call and as ratios against the rewrite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import model.export as export_mod
from model.din import DIN, DINConfig, build_model

# (users, candidates per user, history length)
GRID = [(1, 1, 100), (1, 100, 100), (1, 1000, 100), (1, 1000, 20), (8, 100, 50), (32, 50, 100)]


def _tiled_serve(
    self: DIN, ti: torch.Tensor, tu: torch.Tensor, hi: torch.Tensor, hl: torch.Tensor
) -> torch.Tensor:
    return torch.sigmoid(DIN.forward(self, ti, hi[tu], hl[tu]))


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(fn, min_seconds: float, min_runs: int = 5) -> float:
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=63_000, help="item vocabulary (Electronics: 63k)")
    ap.add_argument("--categories", type=int, default=800)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime / torch intra-op threads (0: all)")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per cell")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    g = torch.Generator().manual_seed(0)
    item_cate = torch.randint(2, args.categories, (args.items,), generator=g)
    item_cate[:2] = torch.tensor([0, 1])
    model = build_model(DINConfig(n_items=args.items, n_categories=args.categories), item_cate, seed=0).eval()

    with tempfile.TemporaryDirectory() as tmp:
        rewrite_path, tiled_path = Path(tmp) / "rewrite.onnx", Path(tmp) / "tiled.onnx"
        export_mod._export_onnx(model, rewrite_path)
        original = DIN.serve
        DIN.serve = _tiled_serve  # type: ignore[method-assign]
        try:
            export_mod._export_onnx(model, tiled_path)
        finally:
            DIN.serve = original  # type: ignore[method-assign]
        rewrite, tiled = _session(rewrite_path, threads), _session(tiled_path, threads)

        rows = []
        rng = np.random.default_rng(0)
        print(
            f"{'users':>5} {'cands':>6} {'T':>4} | {'rewrite ms':>10} {'tiled ms':>9} {'torch ms':>9} |",
            end="",
        )
        print(f" {'tiled/rewrite':>13} {'torch/rewrite':>13} | {'cand/s (rewrite)':>16}")
        for U, C, T in GRID:
            feeds = {
                "target_items": rng.integers(2, args.items, U * C).astype(np.int64),
                "target_user": np.repeat(np.arange(U, dtype=np.int64), C),
                "hist_items": rng.integers(2, args.items, (U, T)).astype(np.int64),
                "hist_len": np.full(U, T, dtype=np.int64),
            }
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run_torch(t: dict[str, torch.Tensor] = t) -> None:
                with torch.no_grad():
                    tu = t["target_user"]
                    torch.sigmoid(model(t["target_items"], t["hist_items"][tu], t["hist_len"][tu]))

            ms = {
                "rewrite": _time(lambda f=feeds: rewrite.run(None, f), args.seconds),
                "tiled": _time(lambda f=feeds: tiled.run(None, f), args.seconds),
                "torch": _time(run_torch, args.seconds),
            }
            row = {"users": U, "candidates_per_user": C, "T": T, "ms": ms}
            row["tiled_over_rewrite"] = ms["tiled"] / ms["rewrite"]
            row["torch_over_rewrite"] = ms["torch"] / ms["rewrite"]
            row["candidates_per_s"] = U * C / ms["rewrite"] * 1000
            rows.append(row)
            print(
                f"{U:>5} {C:>6} {T:>4} | {ms['rewrite']:>10.2f} {ms['tiled']:>9.2f} {ms['torch']:>9.2f} |"
                f" {row['tiled_over_rewrite']:>12.2f}x {row['torch_over_rewrite']:>12.2f}x |"
                f" {row['candidates_per_s']:>16,.0f}"
            )

    # Micro-batching: 8 users x 100 candidates as 8 calls or as one stacked call
    U, C, T = 8, 100, 100
    one = {
        "target_items": rng.integers(2, args.items, U * C).astype(np.int64),
        "target_user": np.repeat(np.arange(U, dtype=np.int64), C),
        "hist_items": rng.integers(2, args.items, (U, T)).astype(np.int64),
        "hist_len": np.full(U, T, dtype=np.int64),
    }
    singles = [
        {
            "target_items": one["target_items"][u * C : (u + 1) * C],
            "target_user": np.zeros(C, dtype=np.int64),
            "hist_items": one["hist_items"][u : u + 1],
            "hist_len": one["hist_len"][u : u + 1],
        }
        for u in range(U)
    ]
    batched_ms = _time(lambda: rewrite.run(None, one), args.seconds)
    separate_ms = _time(lambda: [rewrite.run(None, f) for f in singles], args.seconds)
    print(
        f"\nmicro-batching, {U} users x {C} candidates, T={T}: one call {batched_ms:.2f} ms, "
        f"{U} calls {separate_ms:.2f} ms ({separate_ms / batched_ms:.2f}x)"
    )

    report = {
        "command": "make bench (python bench/run.py)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
        },
        "config": {"items": args.items, "categories": args.categories, "threads": threads, "E": 128},
        "grid": rows,
        "micro_batching": {
            "users": U,
            "candidates": C,
            "T": T,
            "one_call_ms": batched_ms,
            "separate_ms": separate_ms,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'inference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
