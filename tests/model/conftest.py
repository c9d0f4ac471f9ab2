"""Shared model fixtures: one small synthetic raw data set and its prepared data, made once per session,
and the exported graphs of the tests' models, kept for the tests whose point is not the exporter.

Small on purpose (300 users, 400 items, ~3.6k reviews; about a second to make) so training, scoring
and export tests can reuse them. Treat both directories as read-only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

import model.export as export_mod
from contracts.vocab import FIRST_ID, OOV_TOKEN, PAD_TOKEN
from model.data import prepare
from model.din import DIN, DINConfig, build_model
from model.synth import SynthParams, generate

SYNTH_PARAMS = SynthParams(users=300, items=400, categories=8, events_per_user=12.0, seed=7)
PREPARED_MAX_HISTORY = 30  # below the longest users' histories, so truncation is exercised
N_ITEMS, N_CATE = 300, 12  # make_model's


def make_model(seed: int = 0, **cfg_kw: object) -> tuple[DIN, list[str]]:
    """A random DIN (eval mode) and its item ids, for the export and bundle tests."""
    g = torch.Generator().manual_seed(seed)
    item_cate = torch.randint(2, N_CATE, (N_ITEMS,), generator=g)
    item_cate[0], item_cate[1] = 0, 1
    cfg = DINConfig(n_items=N_ITEMS, n_categories=N_CATE, max_history=20, **cfg_kw)  # type: ignore[arg-type]
    model = build_model(cfg, item_cate, seed=seed)
    with torch.no_grad():  # larger weights than at init, so scores spread and errors would show
        for p in model.parameters():
            p.mul_(3.0)
    items = [PAD_TOKEN, OOV_TOKEN, *(f"item{i}" for i in range(FIRST_ID, N_ITEMS))]
    return model.eval(), items


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `din synth` raw dir: reviews.json.gz, meta.json.gz, truth.npz, truth.json."""
    out = tmp_path_factory.mktemp("synth") / "raw"
    generate(out, SYNTH_PARAMS)
    return out


@pytest.fixture(scope="session")
def prepared_data(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`din prepare` of synth_raw (max_history 30, seed 0): load it with model.data.load_prepared."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        synth_raw / "reviews.json.gz",
        synth_raw / "meta.json.gz",
        out,
        max_history=PREPARED_MAX_HISTORY,
        seed=0,
    )
    return out


@pytest.fixture(scope="session")
def run_1epoch(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`din train` of prepared_data, one epoch (batch 256, seed 0, one thread): the run dir that the
    scoring tests (test_score, test_score_explain) read. Treat it as read-only."""
    from model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run-1epoch") / "run"
    train(
        prepared_data,
        out,
        TrainConfig(epochs=1, batch_size=256, seed=0, threads=1),
        progress=False,
        verbose=False,
    )
    return out


_real_export_onnx = export_mod._export_onnx


class ExportCache:
    """ONNX files written by the real exporter (`model.export._export_onnx`), by what decides their
    bytes: the weights and buffers, the config, the code of the model's classes (a test that patches a
    method of DIN gets a real export of its own), and which graph. That the same weights give the same
    bytes is tested without it (tests/model/test_export.py::test_same_weights_give_the_same_bundle)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[Hashable, Path] = {}
        self.code: list[object] = []  # what the keys' ids name, kept alive so no id is reused

    def key(self, model: DIN, explaining: bool, serve: Any) -> Hashable:
        digest = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
        for name, t in model.state_dict().items():
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.detach().contiguous().numpy().tobytes())
        members = [(c, name, v) for c in {type(m) for m in model.modules()} for name, v in vars(c).items()]
        self.code.append(members)
        return digest.hexdigest(), frozenset((c, n, id(v)) for c, n, v in members), explaining, serve

    def add(self, model: DIN, path: Path, *, explaining: bool = False, serve: Any = None) -> None:
        """Keep `path`, just written by the real exporter for `model`."""
        key = self.key(model, explaining, serve)
        self.files[key] = self.root / f"{len(self.files)}.onnx"
        shutil.copyfile(path, self.files[key])

    def export_onnx(self, model: DIN, path: Path, *, explaining: bool = False, serve: Any = None) -> None:
        """`_export_onnx`: the real one the first time for a key, a copy of its file after."""
        cached = self.files.get(self.key(model, explaining, serve))
        if cached is not None:
            shutil.copyfile(cached, path)
            return
        _real_export_onnx(model, path, explaining=explaining, serve=serve)
        self.add(model, path, explaining=explaining, serve=serve)


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    return ExportCache(tmp_path_factory.mktemp("export-cache"))


@pytest.fixture
def reused_exports(export_cache: ExportCache, monkeypatch: pytest.MonkeyPatch) -> ExportCache:
    """For a test whose point is not the exporter (a refusal, the bundle swap): `export_model` traces
    each of the session's models once and copies the graph after. Everything past the graph (its checks,
    parity, the files, the swap) runs as usual."""
    monkeypatch.setattr(export_mod, "_export_onnx", export_cache.export_onnx)
    return export_cache


def export_reusing(cache: ExportCache, *args: Any, **kw: Any) -> dict[str, Any]:
    """`export_model(*args, **kw)` whose graphs come from `cache` (the real exporter's, traced the first
    time the session exports these weights): for a fixture whose point is not the exporter."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "_export_onnx", cache.export_onnx)
        return export_mod.export_model(*args, **kw)
