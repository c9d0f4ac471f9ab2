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

Precision (DIN_PRECISION): the bundle may hold model.int8.onnx beside model.onnx (written by `din export`
only when it passed the quality gate). "int8" serves it (a bundle without it is refused), "fp32" never
does, "auto" times both on this machine at load (`choose_precision`) and keeps the faster. The model
version stays the bundle's: the int8 graph is the same model, within the gate's tolerance, and the
impression log, `din report` and `din promote` key on the version; which graph runs is `precision`
(/readyz, /models, din_model_info).
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from contracts.bundle import EXPLAIN_GRAPH, EXPLAIN_OUTPUTS, INPUTS, INT8_GRAPH, OUTPUTS, Bundle
from contracts.errors import BundleError, CannotExplain
from contracts.vocab import FIRST_ID, Vocab

log = logging.getLogger(__name__)

INPUT_NAMES = tuple(INPUTS)
(OUTPUT_NAME,) = OUTPUTS
PRECISIONS = ("auto", "fp32", "int8")
# auto: the int8 graph is kept only when at least this much faster (timings at load are noisy; fp32 is
# the reference the bundle was checked against to 1e-5)
AUTO_MARGIN = 0.05


@dataclass(frozen=True, slots=True)
class Scored:
    """One row of a batch: its candidates' CTRs."""

    scores: np.ndarray  # float32 (n_candidates,), in the row's candidate order
    # the row as the graph saw it: its candidates' and its history's vocabulary indices (the impression
    # log reads the categories by these, with no second lookup of the ids)
    items: np.ndarray  # int64 (n_candidates,)
    history: np.ndarray  # int64 (history length, cut to T)


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


def encode_rows(
    vocab: Vocab, max_history: int, rows: Sequence[tuple[Sequence[str], Sequence[str]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Rows (items, history newest first) -> the graphs' four inputs, and each row's item count.
    Histories are cut to `max_history` (the model's T) and padded to the batch's longest (not to T).
    A function of its own: the shadow worker process encodes with it too (`service.shadow_worker`)."""
    hists = [vocab.lookup(h[:max_history]) for _, h in rows]
    lens = np.fromiter((len(h) for h in hists), dtype=np.int64, count=len(hists))
    width = max(1, int(lens.max()) if len(lens) else 1)
    hist_items = np.zeros((len(rows), width), dtype=np.int64)
    for u, h in enumerate(hists):
        hist_items[u, : len(h)] = h
    counts = [len(c) for c, _ in rows]
    target_items = vocab.lookup([item for c, _ in rows for item in c])
    target_user = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    return target_items, target_user, hist_items, lens, counts


def graph_inputs(
    target_items: np.ndarray, target_user: np.ndarray, hist_items: np.ndarray, hist_len: np.ndarray
) -> dict[str, np.ndarray]:
    """The graphs' four inputs by name (a Ranker's sessions and the shadow worker's)."""
    return {
        "target_items": target_items,
        "target_user": target_user,
        "hist_items": hist_items,
        "hist_len": hist_len,
    }


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


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """The options every serving session is built with (the served versions' and the shadow worker's):
    every graph optimization, `intra_op_threads` threads (0: ONNX Runtime's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3  # ORT's own warnings go to stderr, not through logging
    return opts


class Ranker:
    """One ONNX Runtime session and the item vocabulary of one bundle."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.bundle = bundle
        self.model_version = bundle.model_version
        self.max_history = bundle.max_history
        self.vocab = bundle.vocab
        opts = session_options(intra_op_threads)
        if precision not in PRECISIONS:
            raise BundleError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.session = self._session(bundle.graph_bytes, "model.onnx", opts, providers)
        self.precision = "fp32"
        self.precision_timings: dict[str, float] = {}  # auto: median ms a call of each graph at load
        if precision == "int8" and bundle.int8_bytes is None:
            int8 = (bundle.manifest.get("precision") or {}).get("int8") or {}
            why = f" (the export's gate: {int8['reason']})" if int8.get("reason") else ""
            raise BundleError(
                f"bundle {bundle.path}: DIN_PRECISION=int8 but the bundle has no {INT8_GRAPH}{why}; "
                "export with `din export --precision both` or serve with DIN_PRECISION=fp32 or auto"
            )
        if precision != "fp32" and bundle.int8_bytes is not None:
            int8_session = self._session(bundle.int8_bytes, INT8_GRAPH, opts, providers)
            if precision == "int8":
                self.session, self.precision = int8_session, "int8"
            else:
                self.choose_precision(int8_session)
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

    def _session(
        self, data: bytes, name: str, opts: ort.SessionOptions, providers: list[str] | None
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, sess_options=opts, providers=choose_providers(providers))
        except BundleError:
            raise
        except Exception as e:  # ORT's errors are long; the file name and the first line are what matter
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"bundle {self.bundle.path}: {name} cannot be loaded: {first}") from None

    def choose_precision(self, int8: ort.InferenceSession, rounds: int = 7, calls: int = 3) -> None:
        """auto: time the fp32 and the int8 graph on this CPU at a typical shape (one user, 200
        candidates, a full history), interleaved after two warm calls each; keep int8 only when its
        median is AUTO_MARGIN faster."""
        rng = np.random.default_rng(0)
        known = self.vocab.lookup(self.vocab.known()[:1000] or ["<unknown>"])
        T = max(1, self.max_history)
        feeds = graph_inputs(
            rng.choice(known, size=200).astype(np.int64),
            np.zeros(200, dtype=np.int64),
            rng.choice(known, size=(1, T)).astype(np.int64),
            np.array([T], dtype=np.int64),
        )
        sessions = {"fp32": self.session, "int8": int8}
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():
            for _ in range(2):
                s.run([OUTPUT_NAME], feeds)
        for _ in range(rounds):
            for name, s in sessions.items():
                for _ in range(calls):
                    t = time.perf_counter()
                    s.run([OUTPUT_NAME], feeds)
                    samples[name].append(time.perf_counter() - t)
        ms = {name: statistics.median(v) * 1000 for name, v in samples.items()}
        self.precision_timings = ms
        if ms["int8"] < ms["fp32"] * (1 - AUTO_MARGIN):
            self.session, self.precision = int8, "int8"
        log.info(
            "precision auto: fp32 %.2f ms, int8 %.2f ms a call; serving %s",
            ms["fp32"],
            ms["int8"],
            self.precision,
        )

    def describe_precision(self) -> dict[str, Any]:
        """What /models reports: the graph that runs, what the bundle has, the load-time timings."""
        return {
            "precision": self.precision,
            "has_int8": self.bundle.int8_bytes is not None,
            "timings_ms": {k: round(v, 3) for k, v in self.precision_timings.items()},
        }

    # ---------------------------------------------------------------- encoding

    def encode(self, ids: list[str]) -> np.ndarray:
        """Item ids -> int64 indices; unknown ids map to the OOV index."""
        return self.vocab.lookup(ids)

    def categories(self, ids: list[str]) -> list[str | None]:
        """Each item's category id; None for an item the model does not know, or every item when the
        bundle has no category table (item_categories.txt)."""
        return self.categories_at(self.encode(ids))

    def categories_at(self, indices: np.ndarray) -> list[str | None]:
        """`categories` of ids already encoded (vocabulary indices)."""
        by_index = self._categories
        if by_index is None:
            return [None] * len(indices)
        return by_index[indices].tolist()

    @functools.cached_property
    def _categories(self) -> np.ndarray | None:
        """Each vocabulary index's category (None for the reserved rows), as an array to index with the
        encoded ids (the impression log's writer asks for 300 of them a record)."""
        cats = self.bundle.item_categories
        if cats is None:
            return None
        by_index = np.array(cats, dtype=object)
        by_index[:FIRST_ID] = None
        return by_index

    # ---------------------------------------------------------------- inference

    def cannot_explain(self) -> CannotExplain:
        return CannotExplain(
            f"the model serving now ({self.model_version}) cannot explain: its bundle has no "
            f"{EXPLAIN_GRAPH} (exported before explanations by contribution existed); re-export it with "
            "`din export` and reload, or rank without explain",
            detail=[{"field": "explain", "message": f"this model has no {EXPLAIN_GRAPH}; re-export it"}],
        )

    def run(
        self, target_items: np.ndarray, target_user: np.ndarray, hist_items: np.ndarray, hist_len: np.ndarray
    ) -> np.ndarray:
        """Raw serving-graph call: (N,), (N,), (U, T), (U,) int64 -> ctr (N,) float32 (ONNX Runtime is
        asked for ctr alone)."""
        (ctr,) = self.session.run(
            [OUTPUT_NAME], graph_inputs(target_items, target_user, hist_items, hist_len)
        )
        return np.asarray(ctr)

    def encode_rows(
        self, rows: Sequence[tuple[Sequence[str], Sequence[str]]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """`encode_rows` with this ranker's vocabulary and T."""
        return encode_rows(self.vocab, self.max_history, rows)

    def score_batch(self, rows: list[tuple[list[str], list[str]]]) -> list[Scored]:
        """Score several users in one ONNX Runtime call.

        rows: (candidates, history newest first) per user. Returns one `Scored` per row.
        """
        target_items, target_user, hist_items, lens, counts = self.encode_rows(rows)
        ctr = self.run(target_items, target_user, hist_items, lens)
        cuts = np.cumsum(counts)[:-1]
        return [
            Scored(scores, items, hist_items[u, :n])
            for u, (scores, items, n) in enumerate(
                zip(np.split(ctr, cuts), np.split(target_items, cuts), lens.tolist(), strict=True)
            )
        ]

    def explain_batch(self, rows: list[tuple[list[str], list[str]]]) -> list[Explained]:
        """Explain several users' items in one call of the explaining graph (explain.onnx).

        rows: (items to explain, history newest first) per user: the items a request returns, not
        every candidate (the graph runs its head once per item and behaviour). Returns one `Explained`
        per row, its arrays (n_items, len(history cut to T)). Raises CannotExplain without explain.onnx.
        """
        if self.explainer is None:
            raise self.cannot_explain()
        target_items, target_user, hist_items, lens, counts = self.encode_rows(rows)
        feeds = graph_inputs(target_items, target_user, hist_items, lens)
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
