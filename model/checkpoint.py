"""The run directory's checkpoint: weights + model config + vocabularies + training state.

The payload holds only plain types and tensors, so `torch.load(weights_only=True)` reads it and
`din score` / `din export` rebuild the model from the file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from contracts.vocab import Vocab
from model.din import DIN, DINConfig

FORMAT = "din-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    config: DINConfig
    items: list[str]  # item id of every item index (0 "<pad>", 1 "<oov>")
    categories: list[str]  # category id of every category index
    max_history: int  # T: behaviours kept per example, newest first
    best_epoch: int  # 1-based epoch whose weights were kept (by validation AUC)
    metrics: dict[str, Any]  # {"valid": {auc, gauc, logloss}, "test": {...}} of the best epoch
    train_args: dict[str, Any]  # the options `din train` ran with
    format: str = FORMAT

    @cached_property
    def vocab(self) -> Vocab:
        """item id -> item index, by the vocabulary contract (unknown ids -> OOV); built once."""
        return Vocab(self.items)


def save_run(
    run_dir: str | Path,
    model: DIN,
    items: list[str],
    categories: list[str],
    max_history: int,
    best_epoch: int,
    metrics: dict[str, Any],
    train_args: dict[str, Any],
) -> Path:
    """Write RUN_DIR/checkpoint.pt; returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "items": list(items),
        "categories": list(categories),
        "max_history": int(max_history),
        "best_epoch": int(best_epoch),
        "metrics": metrics,
        "train_args": train_args,
    }
    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
    return path


def load_run(run_dir: str | Path) -> tuple[DIN, Checkpoint]:
    """Rebuild the trained model (in eval mode) and its description from RUN_DIR/checkpoint.pt."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {payload.get('format')!r}, expected {FORMAT!r}")
    cfg = DINConfig.from_dict(payload["config"])
    state = payload["state_dict"]
    model = DIN(cfg, state["item_cate"])
    model.load_state_dict(state)
    model.eval()
    ckpt = Checkpoint(
        config=cfg,
        items=list(payload["items"]),
        categories=list(payload["categories"]),
        max_history=int(payload["max_history"]),
        best_epoch=int(payload["best_epoch"]),
        metrics=dict(payload["metrics"]),
        train_args=dict(payload["train_args"]),
        format=payload["format"],
    )
    if len(ckpt.items) != cfg.n_items:
        raise ValueError(f"{path}: {len(ckpt.items)} item ids for a vocabulary of {cfg.n_items}")
    return model, ckpt
