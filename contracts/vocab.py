"""The vocabulary contract, torch-free: what an index means, how vocabularies are stored, id -> index.

Every vocabulary (items, categories) is a text file with one id per line; line i is index i.
Index 0 (`<pad>`) is padding and index 1 (`<oov>`) the shared out-of-vocabulary entry; real ids start
at `FIRST_ID`. Clients never reach the reserved rows: an id spelled "<pad>" or "<oov>" is unknown,
like any other id the model never saw, and maps to OOV. `din prepare` and `din export` write these
files; training, scoring, the service, the demo and the load tests read them through this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from contracts.errors import DataError

PAD = 0  # index 0 of every vocabulary is padding
OOV = 1  # index 1 is the shared out-of-vocabulary entry
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"
RESERVED = (PAD_TOKEN, OOV_TOKEN)
FIRST_ID = len(RESERVED)  # index of the first real id


def read_vocab(path: str | Path) -> list[str]:
    """A vocabulary file: one id per line, line i is index i (reserved lines included)."""
    text = Path(path).read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def write_vocab(path: Path, tokens: Sequence[str]) -> None:
    """Write `tokens` one per line (index i on line i). Refuses an id holding a line break."""
    for t in tokens:
        if "\n" in t or "\r" in t:
            raise DataError(f"{path.name}: id {t!r} contains a line break")
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")


def known_ids(vocab: Sequence[str]) -> list[str]:
    """The real ids of a vocabulary, without the reserved <pad> / <oov> rows."""
    return list(vocab[FIRST_ID:])


class Vocab:
    """Id string -> vocabulary index; unknown ids (and the reserved tokens) map to OOV."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)  # index i -> id, reserved rows included
        # Built from the real ids only: a client sending "<pad>" must not reach the padding row.
        self._index = {item: i for i, item in enumerate(self.ids) if i >= FIRST_ID}

    @classmethod
    def from_file(cls, path: str | Path) -> Vocab:
        return cls(read_vocab(path))

    def __len__(self) -> int:
        return len(self.ids)

    def known(self) -> list[str]:
        """The real ids, without the reserved rows."""
        return known_ids(self.ids)

    def index(self, id_: str) -> int:
        return self._index.get(id_, OOV)

    def lookup(self, ids: Iterable[str] | Sequence[str]) -> np.ndarray:
        """ids -> int64 (len(ids),) indices, OOV for unknown ids."""
        ids = ids if isinstance(ids, Sequence) else list(ids)
        return np.fromiter(map(self._index.get, ids, itertools.repeat(OOV)), dtype=np.int64, count=len(ids))
