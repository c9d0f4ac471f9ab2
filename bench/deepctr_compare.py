"""Our `din train` against DeepCTR-Torch's DIN on the same samples: test AUC and training seconds.

    .venv/bin/python bench/deepctr_compare.py DATA_DIR [--epochs 2] [--deepctr-python PYTHON]

DeepCTR-Torch lives in its own virtual environment (it must not touch the project's), set up once:

    python3 -m venv /tmp/venv-deepctr
    /tmp/venv-deepctr/bin/pip install torch==2.13.0        # the local CPU wheel, first
    /tmp/venv-deepctr/bin/pip install --no-deps deepctr-torch
    /tmp/venv-deepctr/bin/pip install tqdm scikit-learn requests numpy

This script (run with the project's python) writes the train and test samples, histories padded
to max_history, to a scratch .npz; a second copy of itself, run with the DeepCTR python, trains
DeepCTR-Torch's DIN on them (item + category embeddings 64 + 64 shared with the history
sequences, attention MLP (80, 40), DNN (200, 80), Adam lr 1e-3, batch 256) and scores the test
samples. Ours runs as `din train --epochs N` in a subprocess with its defaults. Both use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- DeepCTR side (its own venv)


def deepctr_worker(npz_path: str, epochs: int, batch_size: int, seed: int) -> dict:
    import torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN
    from sklearn.metrics import log_loss, roc_auc_score

    torch.set_num_threads(os.cpu_count() or 1)
    d = np.load(npz_path)
    n_items, n_cates, T = int(d["n_items"]), int(d["n_categories"]), int(d["max_history"])

    def features(split: str) -> dict[str, np.ndarray]:
        return {
            "item": d[f"{split}_target"],
            "cate": d["item_cate"][d[f"{split}_target"]],
            "hist_item": d[f"{split}_hist"],
            "hist_cate": d["item_cate"][d[f"{split}_hist"]],
            "seq_length": d[f"{split}_hist_len"],
        }

    columns = [
        SparseFeat("item", n_items, embedding_dim=64),
        SparseFeat("cate", n_cates, embedding_dim=64),
        VarLenSparseFeat(
            SparseFeat("hist_item", n_items, embedding_dim=64, embedding_name="item"), T, "sum", "seq_length"
        ),
        VarLenSparseFeat(
            SparseFeat("hist_cate", n_cates, embedding_dim=64, embedding_name="cate"), T, "sum", "seq_length"
        ),
    ]
    model = DIN(columns, ["item", "cate"], att_hidden_size=(80, 40), dnn_hidden_units=(200, 80), seed=seed)
    model.compile("adam", "binary_crossentropy")
    x_train, y_train = features("train"), d["train_label"]
    t0 = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=1)
    train_seconds = time.perf_counter() - t0
    probs = model.predict(features("test"), batch_size=4096).reshape(-1)
    y = d["test_label"]
    return {
        "auc": float(roc_auc_score(y, probs)),
        "logloss": float(log_loss(y, probs)),
        "train_seconds": train_seconds,
    }


# ---------------------------------------------------------------- project side


def write_samples(data_dir: str, path: Path) -> int:
    """Train and test samples with histories padded to max_history, for DeepCTR-Torch."""
    from model.data import gather_histories, load_prepared

    data = load_prepared(data_dir)
    T = int(data.max_history)
    arrays: dict[str, np.ndarray] = {
        "n_items": np.array(len(data.items)),
        "n_categories": np.array(len(data.categories)),
        "max_history": np.array(T),
        "item_cate": np.asarray(data.item_cate, dtype=np.int64),
    }
    for name in ("train", "test"):
        split = getattr(data, name)
        hist, hist_len = gather_histories(data.seq_items, data.seq_offsets, split.user, split.pos, T)
        padded = np.zeros((len(hist), T), dtype=np.int64)
        padded[:, : hist.shape[1]] = hist
        arrays |= {
            f"{name}_target": np.asarray(split.target, dtype=np.int64),
            f"{name}_hist": padded,
            f"{name}_hist_len": np.asarray(hist_len, dtype=np.int64),
            f"{name}_label": np.asarray(split.label, dtype=np.float32),
        }
    np.savez(path, **arrays)
    return len(arrays["train_label"])


def run_ours(data_dir: str, run_dir: Path, epochs: int, extra: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent / "din"), "train", "--data", data_dir, "--out", str(run_dir)]
    cmd += ["--epochs", str(epochs), "--no-progress", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "metrics.json").read_text())
    return {
        "auc": m["test"]["auc"],
        "logloss": m["test"]["logloss"],
        "train_seconds": m["train_seconds"],
        "wall": wall,
    }


def run_deepctr(python: str, npz: Path, epochs: int, batch_size: int, seed: int) -> dict:
    out = npz.with_suffix(".json")
    cmd = [python, __file__, "--worker", str(npz), "--epochs", str(epochs), "--batch-size", str(batch_size)]
    cmd += ["--seed", str(seed), "--worker-out", str(out)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    return json.loads(out.read_text()) | {"wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", help="prepared data directory (din prepare / din synth)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="DeepCTR-Torch's batch size")
    p.add_argument("--seed", type=int, default=1024)
    p.add_argument("--deepctr-python", default="/tmp/venv-deepctr/bin/python")
    p.add_argument("--ours-args", default="", help="extra flags for din train, e.g. '--pooling sum'")
    p.add_argument("--skip-deepctr", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:  # inside the DeepCTR venv
        result = deepctr_worker(args.worker, args.epochs, args.batch_size, args.seed)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    if not args.data_dir:
        p.error("DATA_DIR is required")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="din-bench-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_deepctr:
            npz = tmp_path / "samples.npz"
            n = write_samples(args.data_dir, npz)
            print(f"{n:,} training samples written for DeepCTR-Torch", flush=True)
            results["DeepCTR-Torch DIN"] = run_deepctr(
                args.deepctr_python, npz, args.epochs, args.batch_size, args.seed
            )
        results["din-rank (din train)"] = run_ours(
            args.data_dir, tmp_path / "run", args.epochs, args.ours_args.split()
        )

    print(f"\n{args.epochs} epochs on {args.data_dir}, {os.cpu_count()} cores")
    print(f"{'model':<22}  {'test AUC':>8}  {'logloss':>7}  {'train s':>7}  {'wall s':>7}")
    for name, r in results.items():
        auc, loss, secs, wall = r["auc"], r["logloss"], r["train_seconds"], r["wall"]
        print(f"{name:<22}  {auc:>8.4f}  {loss:>7.4f}  {secs:>7.1f}  {wall:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
