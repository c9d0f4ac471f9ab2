"""One loaded model: a verified bundle (`model.bundle`) in an ONNX Runtime session. Maps ids to
indices through the bundle's vocabulary and scores a batch of users in one call.

`Ranker.score_batch` is synchronous and runs in a worker thread (never on the event loop). A Ranker
never changes once built; the service reaches the one it serves through `service.live.LiveModel`.

Explanations: the serving graph's second output, `attention` (N, T), is fetched only for a batch that
asks for it (`explain=True`); ONNX Runtime computes the ctr alone otherwise. Bundles exported before
that output existed still serve, and `can_explain` is False for them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from model.bundle import ATTENTION_OUTPUT, INPUTS, OUTPUTS, Bundle
from model.errors import BundleError, CannotExplain

log = logging.getLogger(__name__)

INPUT_NAMES = tuple(INPUTS)
(OUTPUT_NAME,) = OUTPUTS


@dataclass(frozen=True, slots=True)
class Scored:
    """One row of a batch: its candidates' CTRs and, when explained, the weights behind them."""

    scores: np.ndarray  # float32 (n_candidates,), in the row's candidate order
    attention: np.ndarray | None  # float32 (n_candidates, history length): weight of each behaviour


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
        self.model_version = bundle.model_version
        self.max_history = bundle.max_history
        self.vocab = bundle.vocab
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.log_severity_level = 3  # ORT's own warnings go to stderr, not through logging
        try:
            self.session = ort.InferenceSession(
                bundle.graph_bytes,
                sess_options=opts,
                providers=choose_providers(providers),
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
        # bundles exported before the attention output serve scores, not explanations
        self.can_explain = ATTENTION_OUTPUT in {o.name for o in self.session.get_outputs()}

    # ---------------------------------------------------------------- encoding

    def encode(self, ids: list[str]) -> np.ndarray:
        """Item ids -> int64 indices; unknown ids map to the OOV index."""
        return self.vocab.lookup(ids)

    # ---------------------------------------------------------------- inference

    def cannot_explain(self) -> CannotExplain:
        return CannotExplain(
            f"the model serving now ({self.model_version}) cannot explain: its bundle has no "
            f"'{ATTENTION_OUTPUT}' output (exported before explanations existed); re-export it with "
            "`din export` and reload, or rank without explain",
            detail=[{"field": "explain", "message": "this model has no attention output; re-export it"}],
        )

    def run(
        self,
        target_items: np.ndarray,
        target_user: np.ndarray,
        hist_items: np.ndarray,
        hist_len: np.ndarray,
        *,
        explain: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw serving-graph call: (N,), (N,), (U, T), (U,) int64 -> ctr (N,) float32, and with
        `explain` the attention (N, T) float32 (else None: ONNX Runtime is asked for ctr alone)."""
        feeds = {
            "target_items": target_items,
            "target_user": target_user,
            "hist_items": hist_items,
            "hist_len": hist_len,
        }
        if not explain:
            (ctr,) = self.session.run([OUTPUT_NAME], feeds)
            return np.asarray(ctr), None
        if not self.can_explain:
            raise self.cannot_explain()
        ctr, attention = self.session.run([OUTPUT_NAME, ATTENTION_OUTPUT], feeds)
        return np.asarray(ctr), np.asarray(attention)

    def score_batch(self, rows: list[tuple[list[str], list[str]]], *, explain: bool = False) -> list[Scored]:
        """Score several users in one ONNX Runtime call.

        rows: (candidates, history newest first) per user. Histories are truncated to the model's T
        and padded to the batch's longest history (not to T). Returns one `Scored` per row; with
        `explain`, its attention (n_candidates, len(history cut to T)) too.
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
        ctr, attention = self.run(target_items, target_user, hist_items, lens, explain=explain)
        cuts = np.cumsum(counts)[:-1]
        if attention is None:
            return [Scored(scores, None) for scores in np.split(ctr, cuts)]
        return [
            Scored(scores, weights[:, :n])
            for scores, weights, n in zip(
                np.split(ctr, cuts), np.split(attention, cuts), lens.tolist(), strict=True
            )
        ]

    def warmup(self, rounds: int) -> float:
        """Run the graph over several shapes so ORT's allocations and kernels are ready (the first round
        also fetches the attention, when the model has it). Returns seconds."""
        t0 = time.perf_counter()
        known = self.vocab.known()[:64] or ["<unknown>"]
        T = self.max_history
        shapes = [(1, 1, 0), (1, 10, T), (1, 100, T // 2), (4, 50, T), (16, 64, T), (1, 1000, T)]
        rng = np.random.default_rng(0)
        for r in range(rounds):
            for users, cands, hlen in shapes:
                rows = [
                    (list(rng.choice(known, size=cands)), list(rng.choice(known, size=hlen)) if hlen else [])
                    for _ in range(users)
                ]
                self.score_batch(rows)
                if r == 0 and self.can_explain:
                    self.score_batch(rows, explain=True)
        return time.perf_counter() - t0
