"""Serving-graph precision benchmark: fp32 (model.onnx) vs int8 (model.int8.onnx, model.quantize) and a
bf16 attempt, at 1 user x 200 candidates x 100 behaviours, typical (HISTORY_CATEGORIES) and 100-distinct-
category histories, one intra-op thread and all cores; against the native fp32 sgemm rate measured in
the same process, interleaved.

The reference process runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (this script re-execs itself
without them when they are set: some machines set them for old OpenBLAS builds, which makes numpy's
sgemm use a Haswell kernel at about half the native speed). Which BLAS kernel ran is printed
(threadpoolctl when installed, else numpy's build config).

Nominal FLOPs as bench/inference.py: 2 * (E*H1 + H1*H2 + H2) per (candidate, behaviour) pair.

    python bench/precision.py [--graph model.onnx] [--seconds 0.6] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _UNSET) and __name__ == "__main__":  # before numpy loads OpenBLAS
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

# a sibling script (bench/ is not a package: the scripts run as `python bench/NAME.py`)
from inference import (  # noqa: E402
    HISTORY_CATEGORIES,
    cpu_line,
    make_feeds,
    matmul_session,
    random_model,
    reference,
    session,
    time_interleaved,
)

from model.export import export_graph  # noqa: E402
from model.quantize import attention_matmuls, quantize_int8  # noqa: E402

SHAPES = [(1, 200, 100, HISTORY_CATEGORIES), (1, 200, 100, 100)]  # (users, candidates, T, categories)


def blas_info() -> str:
    """Which BLAS numpy runs, and its kernel (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(
            f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} "
            f"threads={i.get('num_threads')}"
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        )
    except ImportError:
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = (cfg or {}).get("Build Dependencies", {}).get("blas", {})
        name, version = blas.get("name", "?"), blas.get("version", "?")
        return f"{name} {version} (threadpoolctl not installed: kernel unknown)"


def bf16_graph(src: Path, dst: Path) -> None:
    """The attention MLP's hidden MatMuls in bfloat16: weights stored bf16, the activation cast to bf16,
    the product cast back to float (what a bf16 GEMM would run; ORT's CPU provider may have no kernel)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(src))
    g = proto.graph
    wanted = set(attention_matmuls(src))
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    for n in g.node:
        if n.name not in wanted:
            new_nodes.append(n)
            continue
        a, w = n.input
        w_bf16 = w + "_bf16"
        if w_bf16 not in inits:
            arr = numpy_helper.to_array(inits[w]).astype(np.float32)
            t = helper.make_tensor(w_bf16, TensorProto.BFLOAT16, arr.shape, arr.flatten().tolist())
            g.initializer.append(t)
            inits[w_bf16] = t
        new_nodes.append(helper.make_node("Cast", [a], [a + "_bf16_" + n.name], to=TensorProto.BFLOAT16))
        new_nodes.append(helper.make_node("MatMul", [a + "_bf16_" + n.name, w_bf16], [n.output[0] + "_bf16"]))
        new_nodes.append(
            helper.make_node("Cast", [n.output[0] + "_bf16"], [n.output[0]], to=TensorProto.FLOAT)
        )
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.save(proto, str(dst))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=63_000)
    ap.add_argument("--categories", type=int, default=800)
    ap.add_argument(
        "--graph", type=Path, help="an exported fp32 serving graph of this model (skips the export)"
    )
    ap.add_argument("--seconds", type=float, default=0.6)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    t_start = time.perf_counter()

    model, by_category = random_model(args.items, args.categories)
    E, (H1, H2) = model.cfg.embed_dim, model.cfg.att_hidden
    pair_flops = 2 * (E * H1 + H1 * H2 + H2)

    cpu, flags = cpu_line()
    simd = [
        f
        for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
        if f in flags.split()
    ]
    print(f"CPU: {cpu} ({os.cpu_count()} logical CPUs); {' '.join(simd)}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}; BLAS: {blas_info()}")
    print(f"OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: {[os.environ.get(v) for v in _UNSET]} (unset for this run)")

    results: dict[str, Any] = {"cpu": cpu, "simd": simd, "onnxruntime": ort.__version__, "blas": blas_info()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = args.graph or Path(tmp) / "model.onnx"
        if args.graph is None:
            export_graph(model, fp32)
        paths = {"fp32": fp32, "int8": Path(tmp) / "int8.onnx", "int8_head_too": Path(tmp) / "int8_all.onnx"}
        quantize_int8(fp32, paths["int8"])
        quantize_int8(fp32, paths["int8_head_too"], scope="all")
        bf16 = Path(tmp) / "bf16.onnx"
        bf16_graph(fp32, bf16)
        try:
            session(bf16, threads=1)
            paths["bf16"] = bf16
            results["bf16"] = "ran"
        except Exception as e:  # ORT's CPU provider has no bf16 MatMul kernel on x86
            results["bf16"] = f"not runnable: {str(e).strip().splitlines()[0][:200]}"
        print(f"bf16 (attention MatMuls in bfloat16): {results['bf16']}")
        mm = matmul_session(E, H1)
        rng = np.random.default_rng(0)
        for threads in (1, 0):
            sessions = {n: session(p, threads=threads) if threads else session(p) for n, p in paths.items()}
            for U, C, T, K in SHAPES:
                f = make_feeds(rng, U, C, T, K, by_category)
                want = reference(model, f)
                diffs = {n: float(np.max(np.abs(s.run(["ctr"], f)[0] - want))) for n, s in sessions.items()}
                a = np.asarray(rng.random((U * C * T, E)), dtype=np.float32)
                b = np.asarray(rng.random((E, H1)), dtype=np.float32)
                fns: dict[str, Callable[[], Any]] = {
                    n: (lambda s=s, f=f: s.run(["ctr"], f)) for n, s in sessions.items()
                }
                fns["sgemm"] = lambda a=a, b=b: a @ b
                fns["ort_mm"] = lambda a=a: mm.run(None, {"a": a})
                ms, clean = time_interleaved(fns, args.seconds, {"sgemm": 0.25})
                flops = U * C * T * pair_flops
                sgemm = 2 * U * C * T * E * H1 / ms["sgemm"] / 1e6
                ort_mm = 2 * U * C * T * E * H1 / ms["ort_mm"] / 1e6
                row = {
                    "threads": threads or "all",
                    "shape": [U, C, T],
                    "history_categories": K,
                    "ms": {n: ms[n] for n in paths},
                    "speedup_vs_fp32": {n: ms["fp32"] / ms[n] for n in paths},
                    "gflops": {n: flops / ms[n] / 1e6 for n in paths},
                    "sgemm_gflops": sgemm,
                    "ort_matmul_gflops": ort_mm,
                    "share_of_sgemm": {n: flops / ms[n] / 1e6 / sgemm for n in paths},
                    "max_abs_diff_vs_pytorch": diffs,
                    "clean_rounds": clean,
                }
                rows.append(row)
                print(
                    f"\nthreads={row['threads']} {U}x{C}x{T}, {K} categories: sgemm {sgemm:.0f} GF/s, "
                    f"ORT mm {ort_mm:.0f} GF/s, clean rounds {clean:.0%}"
                )
                for n in paths:
                    print(
                        f"  {n:<14} {ms[n]:7.2f} ms  x{row['speedup_vs_fp32'][n]:.2f} vs fp32  "
                        f"{row['gflops'][n]:6.0f} GF/s nominal ({row['share_of_sgemm'][n]:.0%} of sgemm)  "
                        f"max|d| {diffs[n]:.1e}"
                    )
    results["rows"] = rows
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out / 'precision.json'} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
