"""The bundle contract shared by `din export` (writes it) and the service (reads it): the format
version, the serving graph's inputs and output, the checksums, and `load_bundle`, which verifies a
bundle before anything serves it. No torch here: the serving image imports this module."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import BundleError
from model.vocab import OOV, PAD, Vocab, read_vocab

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


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, manifest and item vocabulary."""

    path: Path
    manifest: dict[str, Any]
    vocab: Vocab

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def max_history(self) -> int:
        return int(self.manifest["max_history"])

    @property
    def graph(self) -> Path:
        return self.path / "model.onnx"


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
    for key, want in (("pad_index", PAD), ("oov_index", OOV)):
        if manifest.get(key, want) != want:
            raise BundleError(
                f"bundle {path}: manifest.json has {key} {manifest[key]!r}, the contract is {want}"
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
    return Bundle(path=path, manifest=manifest, vocab=Vocab(items))
