"""The int8 serving graph (bundle file model.int8.onnx) and the quality gate it must pass to be written.

What is quantized, and why (measured on a 2-vCPU "Intel(R) Xeon(R) Processor" (/proc/cpuinfo: AVX-512
VNNI and BF16, AMX tile/int8/bf16), a machine shared with other jobs at the time;
demo-sized model, 1 user x 200 candidates x 100 behaviours, one intra-op thread, interleaved medians;
`python bench/precision.py` repeats the measurement):

- ONNX Runtime's dynamic quantization (`quantize_dynamic`) of the attention MLP's hidden layers: the
  MatMuls with a constant weight fed by a sigmoid (one per history slice), int8 weights per output
  channel, the [0, 1] activations uint8 quantized per call (DynamicQuantizeLinear, fused by ORT into
  DynamicQuantizeMatMul). This is ~37% of the graph's nominal FLOPs (80 x 40 of the 65 x 81 + 80 x 40
  + 40 multiply-adds a pair). On the random demo model max |ctr diff| ~1e-6.
- The head's Gemms are kept fp32: quantizing them too (per channel) measured no faster (0.95-1.02x,
  noise) and on a trained test model (`din synth` -> 1 epoch) failed the gate: AUC -0.0025, GAUC
  -0.0033, top-10 overlap 0.967, max |ctr diff| 8.5e-3 (its input, the interest vector, is a sum of up
  to T weighted embeddings: one per-tensor uint8 scale per call fits it badly). Attention only on the
  same model: AUC -2e-5, GAUC 0, top-10 overlap 0.998, tau 0.9999, max |diff| 5e-5. Per-tensor
  weights: 0.89x; reduce_range: 0.87-0.89x and 3-5x the error.
- Kept in fp32:
  * the first attention layer's pair GEMM, [q_item, 1] @ keys: both operands are activations (the keys
    are built per user from the history), so int8 needs two dynamic quantizations a call; quantizing it
    (MatMulConstBOnly off) measured 0.80-0.86x the fp32 graph;
  * the softmax-free attention weighting (the pooling product weights @ keys), also activation x
    activation, and what the contribution / explain maths reads;
  * the head (above) and the final sigmoid;
  * Dice and batch norm: affine in eval mode and already folded into elementwise Mul/Add, nothing to
    quantize (and their statistics set the head's scale: an error there moves every score);
  * every sigmoid (attention units, the final CTR): elementwise, cheap, and where the output's precision
    is decided.
  Timings on this shared machine varied up to 2x between runs (other workers' load); the ratios above
  are interleaved medians within one process, and still noisy (the attention-only graph measured
  0.99x on typical histories and 0.9-1.4x on 100-category ones in different runs).
- Static quantization (`quantize_static`, MinMax calibration on histories): QDQ 0.67-0.79x (the
  Q/DQ pairs around every activation cost more than the integer GEMMs save), QOperator 0.96x with
  3-6x the error of the dynamic variant. Not used.

Why int8 does not pay more here: on this graph at 1 x 200 x 100 the GEMMs are ~40% of the time (ORT
profile: MatMul 36%, Gemm 4%); the rest is sigmoid, add, gather, slice and concat over the (n, T, H)
activations, which int8 does not touch, and the largest GEMM (the pair term) has no constant operand.
So the service's `DIN_PRECISION=auto` times both graphs on the machine it runs on and keeps the faster.

The gate (`quality_gate`): on held-out samples (the training data's test split), AUC and GAUC of the
int8 graph may drop at most GATE["auc_drop"] / GATE["gauc_drop"] below the fp32 graph's; on real-sized
requests (a held-out user's history against REQUEST_CANDIDATES random items) the mean top-10 overlap
must be at least GATE["top10_overlap"]; Kendall's tau-b is reported. A graph that misses it is not
written.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contracts.bundle import INPUTS
from contracts.vocab import FIRST_ID
from model.metrics import auc, gauc, kendall_tau_b

GATE = {"auc_drop": 0.001, "gauc_drop": 0.001, "top10_overlap": 0.98}
REQUEST_CANDIDATES = 200  # a real-sized request: the 200 candidates
GATE_REQUESTS = 64  # requests scored for the ranking agreement
GATE_SAMPLES = 20_000  # held-out samples scored for AUC / GAUC (a fixed random subset beyond this)
TOP_K = 10
BATCH = 512

# What `quantize_int8` does, kept in the manifest.
METHOD = {
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "scope": "attention",  # the attention MLP's hidden layers; "all": also the head's Gemms
    "op_types": ["MatMul", "Gemm"],
    "constant_weights_only": True,
    "weight_type": "int8",
    "activation_type": "uint8 (dynamic, per call)",
    "per_channel": True,
    "reduce_range": False,
    "kept_fp32": [
        "first attention layer pair GEMM (activation x activation)",
        "attention pooling (weights @ keys)",
        "Dice / batch norm (folded affine)",
        "sigmoids (attention units, final CTR)",
    ],
}

Quantizer = Callable[[Path, Path], dict[str, Any]]


def attention_matmuls(path: Path) -> list[str]:
    """The MatMuls of the attention MLP's hidden layers: a constant weight, fed by a Sigmoid (the
    previous layer's activation, in [0, 1]: one uint8 scale fits it well)."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"
    }
    made_by = {out: n for n in graph.node for out in n.output}
    names = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in consts:
            continue
        a = made_by.get(n.input[0])
        while a is not None and a.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            a = made_by.get(a.input[0])
        if a is not None and a.op_type == "Sigmoid":
            names.append(n.name)
    return names


def quantize_int8(src: Path, dst: Path, scope: str = "attention") -> dict[str, Any]:
    """Write the int8 variant of the serving graph `src` to `dst` (METHOD); returns METHOD.
    scope "all" also quantizes the head's Gemms (measured, refused by the gate: see above)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=attention_matmuls(src) if scope == "attention" else None,
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    return {**METHOD, "scope": scope}


@dataclass
class HeldOut:
    """Held-out samples, each with its own history: the gate's data."""

    target: np.ndarray  # int64 (S,)
    hist: np.ndarray  # int64 (S, L), newest first, 0-padded
    hist_len: np.ndarray  # int64 (S,)
    label: np.ndarray  # float32 (S,)
    group: np.ndarray  # (S,) the user of each sample, for GAUC

    def __len__(self) -> int:
        return len(self.label)


def held_out_from_data(data_dir: str | Path, max_history: int, limit: int = GATE_SAMPLES) -> HeldOut:
    """The test split of a `din prepare` directory (a fixed random subset of `limit` samples beyond)."""
    from model.data import gather_histories, load_prepared

    data = load_prepared(data_dir)
    split = data.test
    idx = np.arange(len(split))
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(0).choice(idx, size=limit, replace=False))
    user, pos = np.asarray(split.user)[idx], np.asarray(split.pos)[idx]
    hist, hist_len = gather_histories(data.seq_items, data.seq_offsets, user, pos, max_history)
    return HeldOut(
        target=np.asarray(split.target)[idx].astype(np.int64),
        hist=hist,
        hist_len=hist_len.astype(np.int64),
        label=np.asarray(split.label, dtype=np.float32)[idx],
        group=user,
    )


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def score_samples(session: Any, held: HeldOut) -> np.ndarray:
    """CTR of every held-out sample through a serving graph (each sample its own user)."""
    out = np.empty(len(held), dtype=np.float64)
    for s in range(0, len(held), BATCH):
        e = min(s + BATCH, len(held))
        width = max(int(held.hist_len[s:e].max(initial=0)), 1)
        feeds = {
            "target_items": held.target[s:e],
            "target_user": np.arange(e - s, dtype=np.int64),
            "hist_items": np.ascontiguousarray(held.hist[s:e, :width]),
            "hist_len": held.hist_len[s:e],
        }
        out[s:e] = session.run(["ctr"], feeds)[0]
    return out


def requests_from(held: HeldOut, n_items: int, n: int = GATE_REQUESTS, seed: int = 0) -> list[dict[str, Any]]:
    """Real-sized requests: the histories of up to `n` held-out users (their longest sample), each
    against REQUEST_CANDIDATES distinct random items (all items when there are fewer)."""
    rng = np.random.default_rng(seed)
    longest: dict[Any, int] = {}
    for i, (g, L) in enumerate(zip(held.group.tolist(), held.hist_len.tolist(), strict=True)):
        if g not in longest or held.hist_len[longest[g]] < L:
            longest[g] = i
    rows = list(longest.values())
    if len(rows) > n:
        rows = sorted(rng.choice(rows, size=n, replace=False).tolist())
    pool = np.arange(FIRST_ID, n_items, dtype=np.int64)
    out = []
    for r in rows:
        L = int(held.hist_len[r])
        cands = rng.choice(pool, size=min(REQUEST_CANDIDATES, len(pool)), replace=False)
        out.append(
            {
                "target_items": cands.astype(np.int64),
                "target_user": np.zeros(len(cands), dtype=np.int64),
                "hist_items": np.ascontiguousarray(held.hist[r : r + 1, : max(L, 1)]),
                "hist_len": np.array([L], dtype=np.int64),
            }
        )
    return out


def quality_gate(fp32: Path, int8: Path, held: HeldOut, n_items: int) -> dict[str, Any]:
    """The int8 graph against the fp32 one: AUC / GAUC drop on `held`, top-10 overlap and Kendall tau-b
    on real-sized requests, the largest score difference. {"passed": bool, "reasons": [...], ...}."""
    s32, s8 = _session(fp32), _session(int8)
    p32, p8 = score_samples(s32, held), score_samples(s8, held)
    auc32, auc8 = auc(held.label, p32), auc(held.label, p8)
    gauc32, gauc8 = gauc(held.group, held.label, p32), gauc(held.group, held.label, p8)
    overlaps, taus, req_diff = [], [], 0.0
    for f in requests_from(held, n_items):
        feeds = {k: f[k] for k in INPUTS}
        a, b = s32.run(["ctr"], feeds)[0], s8.run(["ctr"], feeds)[0]
        k = min(TOP_K, len(a))
        top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
        overlaps.append(len(top_a & top_b) / k if k else 1.0)
        taus.append(kendall_tau_b(a, b))
        req_diff = max(req_diff, float(np.max(np.abs(a - b), initial=0.0)))
    finite_taus = [t for t in taus if not math.isnan(t)]
    report: dict[str, Any] = {
        "samples": len(held),
        "auc_fp32": auc32,
        "auc_int8": auc8,
        "auc_drop": auc32 - auc8,
        "gauc_fp32": gauc32,
        "gauc_int8": gauc8,
        "gauc_drop": gauc32 - gauc8,
        "requests": len(overlaps),
        "candidates_per_request": REQUEST_CANDIDATES,
        "top10_overlap": float(np.mean(overlaps)) if overlaps else math.nan,
        "top10_overlap_min": float(np.min(overlaps)) if overlaps else math.nan,
        "kendall_tau_mean": float(np.mean(finite_taus)) if finite_taus else math.nan,
        "kendall_tau_min": float(np.min(finite_taus)) if finite_taus else math.nan,
        "max_abs_diff": max(float(np.max(np.abs(p32 - p8), initial=0.0)), req_diff),
        "thresholds": dict(GATE),
    }
    reasons = []
    for key in ("auc_drop", "gauc_drop"):
        if not report[key] <= GATE[key]:  # NaN fails too
            reasons.append(f"{key.split('_')[0].upper()} drops by {report[key]:.4g} (> {GATE[key]:g})")
    if not report["top10_overlap"] >= GATE["top10_overlap"]:
        reasons.append(f"top-10 overlap {report['top10_overlap']:.4f} (< {GATE['top10_overlap']:g})")
    report["passed"] = not reasons
    report["reasons"] = reasons
    return _finite(report)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None, so the manifest stays strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def build_int8(
    fp32: Path, dst: Path, held: HeldOut | None, n_items: int, quantize: Quantizer = quantize_int8
) -> dict[str, Any]:
    """Quantize `fp32` and gate it. Writes `dst` only when the gate passes. Returns
    {"written": bool, "method": ..., "gate": ... | None, "reason": str | None}."""
    if held is None or len(held) == 0:
        return {"written": False, "method": None, "gate": None, "reason": "no held-out samples to gate it on"}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        candidate = Path(tmp) / dst.name
        method = quantize(fp32, candidate)
        report = quality_gate(fp32, candidate, held, n_items)
        if not report["passed"]:
            return {
                "written": False,
                "method": method,
                "gate": report,
                "reason": "; ".join(report["reasons"]),
            }
        candidate.replace(dst)
    return {"written": True, "method": method, "gate": report, "reason": None}
