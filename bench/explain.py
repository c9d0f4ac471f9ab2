"""What `explain` costs, and what the attention output costs requests that do not explain.

One random DIN of the demo's size (3,000 items, 32 categories, E = 128, T = 100) exported by `din export`,
and the same graph with the attention output removed (a bundle exported before explanations existed).
For each batch shape (users x candidates each, full T-item histories), `Ranker.score_batch` timed as:

- old graph, ctr: the serving graph before the attention output existed;
- new graph, ctr: what a batch without an explaining request runs (ONNX Runtime is asked for ctr alone);
- new graph, ctr + attention: what a batch with an explaining request runs (the weights fetched too);
- and a second session of the old graph, ctr: the same work twice, so the table shows how far apart
  two measurements of one thing land here (the noise floor to read the others against);

interleaved round after round in a shuffled order (so drift and neighbours' load hit all three alike),
median and p10-p90 of `--rounds`. One ONNX Runtime thread by default: the comparison is of the work
each variant does, and one thread keeps other load on a small shared machine from deciding it. Then
the service's own work for an explained answer: picking each item's `because` (top `explain_top` of T).

    python bench/explain.py            # writes bench/results/explain.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from model.bundle import ATTENTION_OUTPUT, load_bundle, sha256_file
from model.din import DINConfig, build_model
from model.export import export_model
from model.vocab import FIRST_ID
from service.api.rank import because
from service.ranker import Ranker

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 20), (1, 200), (2, 200), (8, 50), (1, 1000)]  # (users, candidates each)


def cpu_line() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{model}, {os.cpu_count()} logical CPUs"


def make_bundles(root: Path, T: int) -> tuple[Path, Path]:
    """A demo-sized random DIN exported (with attention), and a copy of its graph without the output."""
    n_items, n_cate = 3000, 32
    g = torch.Generator().manual_seed(0)
    item_cate = torch.randint(FIRST_ID, n_cate, (n_items,), generator=g)
    item_cate[0], item_cate[1] = 0, 1
    model = build_model(DINConfig(n_items=n_items, n_categories=n_cate, max_history=T), item_cate, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # spread the scores, as a trained model's are
    items = ["<pad>", "<oov>", *(f"i{k}" for k in range(FIRST_ID, n_items))]
    new = root / "new"
    export_model(model.eval(), items, new, model_version="bench-explain")
    old = root / "old"
    old.mkdir()
    for f in new.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    proto = onnx.load(str(old / "model.onnx"))
    kept = [o for o in proto.graph.output if o.name != ATTENTION_OUTPUT]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(old / "model.onnx"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(old / "model.onnx")
    manifest["outputs"] = {"ctr": ["N"]}
    (old / "manifest.json").write_text(json.dumps(manifest))
    return new, old


def summary(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10)
    return {"median_ms": statistics.median(samples) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100, help="timed rounds per shape and variant")
    ap.add_argument("--history", type=int, default=100, help="T, and every user's history length")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0 = ORT default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "explain.json")
    args = ap.parse_args()
    T = args.history
    with tempfile.TemporaryDirectory() as tmp:
        new_path, old_path = make_bundles(Path(tmp), T)
        kw: dict[str, Any] = {"providers": ["CPUExecutionProvider"], "intra_op_threads": args.threads}
        new, old = Ranker(load_bundle(new_path), **kw), Ranker(load_bundle(old_path), **kw)
        old_again = Ranker(load_bundle(old_path), **kw)
    assert new.can_explain and not old.can_explain
    rng = np.random.default_rng(0)
    known = new.vocab.known()
    results: list[dict[str, Any]] = []
    print(f"CPU: {cpu_line()}; T = {T}; {args.rounds} rounds; ORT threads {args.threads or 'default'}")
    head = ("users x cands", "old ctr", "new ctr", "ctr+att", "no-explain", "explain", "old vs old")
    print("{:>14} {:>10} {:>10} {:>10} {:>11} {:>9} {:>11}".format(*head))
    for users, cands in SHAPES:
        rows = [(rng.choice(known, cands).tolist(), rng.choice(known, T).tolist()) for _ in range(users)]
        variants: dict[str, Callable[[], object]] = {
            "old_ctr": lambda rows=rows: old.score_batch(rows),
            "new_ctr": lambda rows=rows: new.score_batch(rows),
            "new_ctr_attention": lambda rows=rows: new.score_batch(rows, explain=True),
            "old_ctr_again": lambda rows=rows: old_again.score_batch(rows),
        }
        for fn in variants.values():  # warm-up
            for _ in range(5):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants.items())
        shuffler = random.Random(users * 7919 + cands)
        for _ in range(args.rounds):
            shuffler.shuffle(order)
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        stats = {name: summary(t) for name, t in times.items()}
        base, plain, explained = (stats[n]["median_ms"] for n in ("old_ctr", "new_ctr", "new_ctr_attention"))
        row = {
            "users": users,
            "candidates_each": cands,
            **stats,
            "no_explain_overhead_pct": 100 * (plain / base - 1),
            "explain_overhead_pct": 100 * (explained / plain - 1),
            "same_work_twice_pct": 100 * (stats["old_ctr_again"]["median_ms"] / base - 1),
        }
        results.append(row)
        print(
            f"{users:>5} x {cands:<6} {base:>8.2f}ms {plain:>8.2f}ms {explained:>8.2f}ms "
            f"{row['no_explain_overhead_pct']:>+10.1f}% {row['explain_overhead_pct']:>+8.1f}% "
            f"{row['same_work_twice_pct']:>+10.1f}%"
        )

    # the handler's part of an explained answer: each returned item's top behaviours
    picks = []
    for n, top in [(200, 5), (200, 100), (1000, 5)]:
        w = rng.random((n, T), dtype=np.float32)
        hist = [f"i{k}" for k in range(T)]
        t = []
        for _ in range(50):
            t0 = time.perf_counter()
            because(w, hist, top)
            t.append(time.perf_counter() - t0)
        picks.append({"items": n, "explain_top": top, "median_ms": statistics.median(t) * 1e3})
        print(f"because(): {n} items x T={T}, explain_top {top}: {statistics.median(t) * 1e3:.2f} ms")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_line(), "T": T, "rounds": args.rounds, "graph": results, "because": picks}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
