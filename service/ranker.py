"""One loaded model: a verified bundle (`contracts.bundle`) in an ONNX Runtime session. Maps ids to
indices through the bundle's vocabulary and scores a batch of users in one call.

`Ranker.score_batch` is synchronous and runs in a worker thread (never on the event loop). A Ranker
never changes once built; the service reaches the one it serves through `service.live.LiveModel`.

Explanations: a second session runs the bundle's explaining graph (explain.onnx, `DIN.serve_contributions`)
on the few items an explained request returns (`explain_batch`): their ctr, every behaviour's
attention weight and its exact leave-one-out contribution. ONNX Runtime runs every node of a graph
whatever outputs are asked for, so this work lives in its own graph and costs nothing to the requests
that do not explain. Bundles exported before explain.onnx existed still serve, and `can_explain` is
False for them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from contracts.bundle import EXPLAIN_GRAPH, EXPLAIN_OUTPUTS, INPUTS, OUTPUTS, Bundle
from contracts.errors import BundleError, CannotExplain
from contracts.vocab import FIRST_ID

log = logging.getLogger(__name__)

INPUT_NAMES = tuple(INPUTS)
(OUTPUT_NAME,) = OUTPUTS


@dataclass(frozen=True, slots=True)
class Scored:
    """One row of a batch: its candidates' CTRs."""

    scores: np.ndarray  # float32 (n_candidates,), in the row's candidate order


@dataclass(frozen=True, slots=True)
class Explained:
    """One row of an explaining call: for each of its items, per behaviour of the history the model saw
    (newest first, cut to T), its attention weight and what removing it does to the item's ctr."""

    scores: np.ndarray  # float32 (n_items,): the items' ctr, as the serving graph computes it
    attention: np.ndarray  # float32 (n_items, history length): the pooling's weight of each behaviour
    contribution: np.ndarray  # float32 (n_items, history length): ctr - ctr without that behaviour


def ranked(scores: np.ndarray, top_k: int | None) -> np.ndarray:
    """The order `/rank` returns candidates in: indices by score descending (ties keep request order),
    the best top_k of them when given. One function, so the batcher explains exactly what is returned."""
    order = np.argsort(-scores, kind="stable")
    return order if top_k is None else order[:top_k]


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
        # bundles exported before the explaining graph serve scores, not explanations
        self.explainer: ort.InferenceSession | None = None
        if bundle.explain_bytes is not None:
            try:
                self.explainer = ort.InferenceSession(
                    bundle.explain_bytes, sess_options=opts, providers=choose_providers(providers)
                )
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(
                    f"bundle {bundle.path}: {EXPLAIN_GRAPH} cannot be loaded: {first}"
                ) from None
        self.can_explain = self.explainer is not None

    # ---------------------------------------------------------------- encoding

    def encode(self, ids: list[str]) -> np.ndarray:
        """Item ids -> int64 indices; unknown ids map to the OOV index."""
        return self.vocab.lookup(ids)

    def categories(self, ids: list[str]) -> list[str | None]:
        """Each item's category id; None for an item the model does not know, or every item when the
        bundle has no category table (item_categories.txt)."""
        cats = self.bundle.item_categories
        if cats is None:
            return [None] * len(ids)
        return [cats[i] if i >= FIRST_ID else None for i in self.encode(ids).tolist()]

    # ---------------------------------------------------------------- inference

    def cannot_explain(self) -> CannotExplain:
        return CannotExplain(
            f"the model serving now ({self.model_version}) cannot explain: its bundle has no "
            f"{EXPLAIN_GRAPH} (exported before explanations by contribution existed); re-export it with "
            "`din export` and reload, or rank without explain",
            detail=[{"field": "explain", "message": f"this model has no {EXPLAIN_GRAPH}; re-export it"}],
        )

    @staticmethod
    def _feeds(
        target_items: np.ndarray, target_user: np.ndarray, hist_items: np.ndarray, hist_len: np.ndarray
    ) -> dict[str, np.ndarray]:
        return {
            "target_items": target_items,
            "target_user": target_user,
            "hist_items": hist_items,
            "hist_len": hist_len,
        }

    def run(
        self, target_items: np.ndarray, target_user: np.ndarray, hist_items: np.ndarray, hist_len: np.ndarray
    ) -> np.ndarray:
        """Raw serving-graph call: (N,), (N,), (U, T), (U,) int64 -> ctr (N,) float32 (ONNX Runtime is
        asked for ctr alone)."""
        (ctr,) = self.session.run([OUTPUT_NAME], self._feeds(target_items, target_user, hist_items, hist_len))
        return np.asarray(ctr)

    def encode_rows(
        self, rows: list[tuple[list[str], list[str]]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Rows (items, history newest first) -> the graphs' four inputs, and each row's item count.
        Histories are cut to the model's T and padded to the batch's longest (not to T)."""
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
        return target_items, target_user, hist_items, lens, counts

    def score_batch(self, rows: list[tuple[list[str], list[str]]]) -> list[Scored]:
        """Score several users in one ONNX Runtime call.

        rows: (candidates, history newest first) per user. Returns one `Scored` per row.
        """
        target_items, target_user, hist_items, lens, counts = self.encode_rows(rows)
        ctr = self.run(target_items, target_user, hist_items, lens)
        return [Scored(scores) for scores in np.split(ctr, np.cumsum(counts)[:-1])]

    def explain_batch(self, rows: list[tuple[list[str], list[str]]]) -> list[Explained]:
        """Explain several users' items in one call of the explaining graph (explain.onnx).

        rows: (items to explain, history newest first) per user: the items a request returns, not
        every candidate (the graph runs its head once per item and behaviour). Returns one `Explained`
        per row, its arrays (n_items, len(history cut to T)). Raises CannotExplain without explain.onnx.
        """
        if self.explainer is None:
            raise self.cannot_explain()
        target_items, target_user, hist_items, lens, counts = self.encode_rows(rows)
        feeds = self._feeds(target_items, target_user, hist_items, lens)
        ctr, attention, contribution = (
            np.asarray(a) for a in self.explainer.run(list(EXPLAIN_OUTPUTS), feeds)
        )
        cuts = np.cumsum(counts)[:-1]
        return [
            Explained(c, a[:, :n], d[:, :n])
            for c, a, d, n in zip(
                np.split(ctr, cuts),
                np.split(attention, cuts),
                np.split(contribution, cuts),
                lens.tolist(),
                strict=True,
            )
        ]

    def warmup(self, rounds: int) -> float:
        """Run the graph over several shapes so ORT's allocations and kernels are ready (the first round
        also runs the explaining graph, when the model has it, on 10 items a user). Returns seconds."""
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
                    self.explain_batch([(c[:10], h) for c, h in rows])
        return time.perf_counter() - t0
