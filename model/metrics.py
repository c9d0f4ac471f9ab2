"""Ranking metrics, vectorised with numpy: AUC, GAUC (paper §6.3) and log loss."""

from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # average of 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC, over users with both classes (paper §6.3)."""
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((scores, users))  # by user, then score
    u, l, s = users[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    # within-user average ranks: global ranks of (user, score) minus the user's offset
    r = np.empty(len(u), dtype=np.float64)
    key_change = np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])]
    run_starts = np.flatnonzero(key_change)
    run_ends = np.r_[run_starts[1:], len(u)]
    r_runs = (run_starts + run_ends + 1) / 2.0
    r[:] = np.repeat(r_runs, run_ends - run_starts)
    r -= np.repeat(starts, ends - starts)
    n = ends - starts
    n_pos = np.add.reduceat(l.astype(np.int64), starts)
    n_neg = n - n_pos
    pos_rank_sum = np.add.reduceat(np.where(l, r, 0.0), starts)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_user = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_user, weights=n[ok]))


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (ties corrected); nan when either is constant or n < 2.
    O(n^2): n is one impression's logged items."""
    n = len(x)
    if n < 2:
        return math.nan
    i, j = np.triu_indices(n, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    untied_x, untied_y = int(np.count_nonzero(sx)), int(np.count_nonzero(sy))
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float((sx * sy).sum() / math.sqrt(untied_x * untied_y))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def evaluate(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The three numbers reported everywhere: AUC, GAUC, log loss."""
    return {"auc": auc(labels, probs), "gauc": gauc(users, labels, probs), "logloss": logloss(labels, probs)}
