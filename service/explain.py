"""What an explained answer says: each returned item's behaviours by their exact leave-one-out
contribution (`Explanation`, computed by the explaining graph), and the `because` / `against` lists
/rank answers with (`reasons`). Plain numpy: benchmarks and tools read it without the web stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Explanation:
    """What an explained request's returned items owe to each behaviour the model saw."""

    order: np.ndarray  # int (n_returned,): the returned items as indices of the candidates, best first
    history: list[str]  # the behaviours the model saw, newest first (cut to T)
    attention: np.ndarray  # float32 (n_returned, len(history)): each behaviour's pooling weight
    contribution: np.ndarray  # float32 (n_returned, len(history)): ctr - ctr without that behaviour


Reasons = list[dict[str, Any]]


def reasons(explanation: Explanation, top: int) -> list[tuple[Reasons, Reasons]]:
    """Per returned item (explanation.order), `because`: the `top` behaviours with the largest positive
    contributions, largest first, and `against`: the `top` with the most negative, most negative
    first (ties: the newer first). A behaviour whose removal leaves the score as it is is in neither."""
    contribution, weights, history = explanation.contribution, explanation.attention, explanation.history
    out: list[tuple[Reasons, Reasons]] = []
    for c, w in zip(contribution, weights, strict=True):  # (L,) each, one returned item
        up = np.argsort(-c, kind="stable")[:top]
        down = np.argsort(c, kind="stable")[:top]
        lists = []
        for picked, sign in ((up, 1.0), (down, -1.0)):
            picked = picked[sign * c[picked] > 0]
            lists.append(
                [
                    {"item_id": history[p], "position": p, "weight": wt, "contribution": ct}
                    for p, wt, ct in zip(picked.tolist(), w[picked].tolist(), c[picked].tolist(), strict=True)
                ]
            )
        out.append((lists[0], lists[1]))
    return out
