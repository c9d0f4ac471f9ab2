"""The bundle contract shared by `din export` (writes it) and the service (reads it). No torch here:
the serving image imports this module."""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT_VERSION = 1
# Serving-graph inputs and output with their symbolic dimensions (N candidates, U users, T history).
INPUTS: dict[str, list[str]] = {
    "target_items": ["N"],
    "target_user": ["N"],
    "hist_items": ["U", "T"],
    "hist_len": ["U"],
}
OUTPUTS: dict[str, list[str]] = {"ctr": ["N"]}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
