"""The ONNX Runtime side: load and verify a bundle, map ids to indices, score a batch of users.

`Ranker.score_batch` is synchronous and runs in a worker thread (never on the event loop).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model.bundle import FORMAT_VERSION, INPUTS, OUTPUTS, sha256_file
from model.data import read_vocab
from service.errors import BundleError

log = logging.getLogger(__name__)

INPUT_NAMES = tuple(INPUTS)
(OUTPUT_NAME,) = OUTPUTS


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    items: list[str]

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def max_history(self) -> int:
        return int(self.manifest["max_history"])

    @property
    def oov_index(self) -> int:
        return int(self.manifest.get("oov_index", 1))


def load_bundle(path: str | Path) -> Bundle:
    """Read manifest.json, verify the sha256 of every file it lists, read the item vocabulary.

    Raises BundleError naming the file on anything missing, corrupt or inconsistent.
    """
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a directory")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {path}: manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {path}: manifest.json is unreadable ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: manifest.json is not a JSON object")
    for key in ("files", "model_version", "max_history"):
        if key not in manifest:
            raise BundleError(f"bundle {path}: manifest.json has no {key!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle {path}: manifest.json has format_version {manifest.get('format_version')!r}; "
            f"this service reads format {FORMAT_VERSION} (re-export with this version's `din export`)"
        )
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: manifest.json 'files' is not an object")
    for name in ("model.onnx", "items.txt"):
        if name not in files:
            raise BundleError(f"bundle {path}: manifest.json lists no checksum for {name}")
    for name, want in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"bundle {path}: {name} is missing")
        got = sha256_file(fpath)
        if got != want:
            raise BundleError(
                f"bundle {path}: checksum mismatch for {name} (sha256 {got[:12]}..., "
                f"manifest says {str(want)[:12]}...): the file is corrupt or was changed after export"
            )
    items = read_vocab(path / "items.txt")
    n_items = manifest.get("vocab", {}).get("items")
    if n_items is not None and n_items != len(items):
        raise BundleError(f"bundle {path}: items.txt has {len(items)} ids, manifest says {n_items}")
    return Bundle(path=path, manifest=manifest, items=items)


def choose_providers(requested: list[str] | None) -> list[str]:
    """None ('auto'): CUDA first when this onnxruntime has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    if requested is None:
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in wanted if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise BundleError(f"providers {missing} are not available in this onnxruntime (has {available})")
    return requested


class Ranker:
    """One ONNX Runtime session and the item vocabulary of one bundle."""

    def __init__(
        self, bundle: Bundle, *, providers: list[str] | None = None, intra_op_threads: int = 0
    ) -> None:
        self.bundle = bundle
        self.max_history = bundle.max_history
        self.oov = bundle.oov_index
        # Line i is index i; pad / oov placeholders are not real ids a client may send.
        self.index: dict[str, int] = {item: i for i, item in enumerate(bundle.items) if i > self.oov}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3  # ORT's own warnings go to stderr, not through logging
        try:
            self.session = ort.InferenceSession(
                str(bundle.path / "model.onnx"), sess_options=opts, providers=choose_providers(providers)
            )
        except BundleError:
            raise
        except Exception as e:  # ORT's errors are long; the file name and the first line are what matter
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"bundle {bundle.path}: model.onnx cannot be loaded: {first}") from None
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES):
            raise BundleError(
                f"bundle {bundle.path}: model.onnx has inputs {names}, expected {list(INPUT_NAMES)}"
            )
        self.providers: list[str] = self.session.get_providers()

    # ---------------------------------------------------------------- encoding

    def encode(self, ids: list[str]) -> np.ndarray:
        """Item ids -> int64 indices; unknown ids map to the OOV index."""
        get, oov = self.index.get, self.oov
        return np.fromiter((get(i, oov) for i in ids), dtype=np.int64, count=len(ids))

    # ---------------------------------------------------------------- inference

    def run(
        self, target_items: np.ndarray, target_user: np.ndarray, hist_items: np.ndarray, hist_len: np.ndarray
    ) -> np.ndarray:
        """Raw serving-graph call: (N,), (N,), (U, T), (U,) int64 -> ctr (N,) float32."""
        feeds = {
            "target_items": target_items,
            "target_user": target_user,
            "hist_items": hist_items,
            "hist_len": hist_len,
        }
        (ctr,) = self.session.run([OUTPUT_NAME], feeds)
        return np.asarray(ctr)

    def score_batch(self, rows: list[tuple[list[str], list[str]]]) -> list[np.ndarray]:
        """Score several users in one ONNX Runtime call.

        rows: (candidates, history newest first) per user. Histories are truncated to the model's T
        and padded to the batch's longest history (not to T). Returns one float32 array per row.
        """
        T = self.max_history
        hists = [self.encode(h[:T]) for _, h in rows]
        lens = np.fromiter((len(h) for h in hists), dtype=np.int64, count=len(hists))
        width = max(1, int(lens.max()) if len(lens) else 1)
        hist_items = np.zeros((len(rows), width), dtype=np.int64)
        for u, h in enumerate(hists):
            hist_items[u, : len(h)] = h
        counts = [len(c) for c, _ in rows]
        target_items = self.encode([item for c, _ in rows for item in c])
        target_user = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        ctr = self.run(target_items, target_user, hist_items, lens)
        return np.split(ctr, np.cumsum(counts)[:-1])

    def warmup(self, rounds: int) -> float:
        """Run the graph over several shapes so ORT's allocations and kernels are ready. Returns seconds."""
        t0 = time.perf_counter()
        known = [item for i, item in enumerate(self.bundle.items) if i > self.oov][:64] or ["<unknown>"]
        T = self.max_history
        shapes = [(1, 1, 0), (1, 10, T), (1, 100, T // 2), (4, 50, T), (16, 64, T), (1, 1000, T)]
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            for users, cands, hlen in shapes:
                rows = [
                    (list(rng.choice(known, size=cands)), list(rng.choice(known, size=hlen)) if hlen else [])
                    for _ in range(users)
                ]
                self.score_batch(rows)
        return time.perf_counter() - t0
