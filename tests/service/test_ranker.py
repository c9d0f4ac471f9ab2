"""The ONNX Runtime ranker: bundle verification, id mapping, batch scoring equal to PyTorch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from contracts.bundle import load_bundle
from contracts.errors import BundleError
from contracts.vocab import known_ids
from service.ranker import Ranker, choose_providers
from tests.service.conftest import BundleInfo

TOL = 1e-5


def _copy(bundle: BundleInfo, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle.path, dst)
    return dst


@pytest.fixture(scope="module")
def ranker(bundle: BundleInfo) -> Ranker:
    return Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"], intra_op_threads=1)


def test_load_bundle_reads_manifest_and_items(bundle: BundleInfo) -> None:
    b = load_bundle(bundle.path)
    assert b.manifest == bundle.manifest
    assert b.vocab.ids == bundle.items
    assert b.model_version == "test-v1" and b.max_history == 20 and b.manifest["oov_index"] == 1


@pytest.mark.parametrize("name", ["model.onnx", "items.txt"])
def test_corrupt_file_is_refused_naming_it(bundle: BundleInfo, tmp_path: Path, name: str) -> None:
    path = _copy(bundle, tmp_path)
    with open(path / name, "r+b") as f:
        f.seek(-3, 2)
        last = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=rf"checksum mismatch for {name}"):
        load_bundle(path)


@pytest.mark.parametrize("name", ["model.onnx", "items.txt", "manifest.json"])
def test_missing_file_is_refused_naming_it(bundle: BundleInfo, tmp_path: Path, name: str) -> None:
    path = _copy(bundle, tmp_path)
    (path / name).unlink()
    with pytest.raises(BundleError, match=rf"{name} is missing"):
        load_bundle(path)


def test_bad_manifest_is_refused(bundle: BundleInfo, tmp_path: Path) -> None:
    path = _copy(bundle, tmp_path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json is unreadable"):
        load_bundle(path)
    manifest = dict(bundle.manifest)
    del manifest["files"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no 'files'"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nowhere")


def test_unknown_bundle_format_is_refused(bundle: BundleInfo, tmp_path: Path) -> None:
    path = _copy(bundle, tmp_path)
    manifest = {**bundle.manifest, "format_version": 99}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(path)


def test_encode_maps_unknown_and_placeholders_to_oov(ranker: Ranker) -> None:
    got = ranker.encode(["i2", "i299", "nope", "<pad>", "<oov>", ""])
    assert got.tolist() == [2, 299, 1, 1, 1, 1]
    assert got.dtype == np.int64


def test_score_batch_equals_pytorch(ranker: Ranker, bundle: BundleInfo) -> None:
    rng = np.random.default_rng(3)
    known = known_ids(bundle.items)
    rows = []
    for hlen, ncand in [(0, 5), (1, 1), (7, 40), (20, 100), (35, 3)]:  # 35 > T: truncated
        cands = [*rng.choice(known, size=ncand).tolist(), "unknown"]
        hist = rng.choice(known, size=hlen).tolist()
        rows.append((cands, hist))
    out = [row.scores for row in ranker.score_batch(rows)]
    assert [len(s) for s in out] == [len(c) for c, _ in rows]
    for (cands, hist), scores in zip(rows, out, strict=True):
        assert scores.dtype == np.float32
        np.testing.assert_allclose(scores, bundle.reference(cands, hist), atol=TOL, rtol=0)


def test_batch_composition_does_not_change_scores(ranker: Ranker) -> None:
    """A user's scores are the same alone or stacked with longer histories (padding is inert)."""
    alone = ranker.score_batch([(["i2", "i3"], ["i4"])])[0].scores
    stacked = ranker.score_batch([(["i9"], [f"i{k}" for k in range(2, 22)]), (["i2", "i3"], ["i4"])])[
        1
    ].scores
    np.testing.assert_allclose(alone, stacked, atol=1e-6, rtol=0)


def test_warmup_runs(ranker: Ranker) -> None:
    assert ranker.warmup(1) > 0


def test_providers_auto_and_explicit() -> None:
    auto = choose_providers(None)
    assert auto[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert auto[0] == "CUDAExecutionProvider"
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="not available"):
        choose_providers(["NoSuchExecutionProvider"])


def test_unloadable_model_is_a_bundle_error(bundle: BundleInfo, tmp_path: Path) -> None:
    """A model.onnx that matches its (rewritten) checksum but is not a model: a clear error."""
    import hashlib

    path = _copy(bundle, tmp_path)
    (path / "model.onnx").write_bytes(b"garbage")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256(b"garbage").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model\.onnx cannot be loaded"):
        Ranker(load_bundle(path), providers=["CPUExecutionProvider"])


def _no_gpu_reason() -> str | None:
    """Why the GPU test cannot run here, or None. onnxruntime-gpu lists CUDA even on a machine with
    no NVIDIA GPU (it would fall back to CPU): that is a skip, a GPU that does not work is a failure."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (no /dev/nvidiactl, no nvidia-smi)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu_reason() is not None, reason=_no_gpu_reason() or "")
def test_cuda_scores_equal_cpu(bundle: BundleInfo, ranker: Ranker) -> None:
    gpu = Ranker(load_bundle(bundle.path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider"
    rng = np.random.default_rng(5)
    known = known_ids(bundle.items)
    rows = [
        (rng.choice(known, size=n).tolist(), rng.choice(known, size=h).tolist())
        for n, h in [(1, 0), (50, 5), (1000, 20), (30, 13)]
    ]
    for cpu, gpu_row in zip(ranker.score_batch(rows), gpu.score_batch(rows), strict=True):
        np.testing.assert_allclose(gpu_row.scores, cpu.scores, atol=TOL, rtol=0)
    explain_rows = [(c[:10], h) for c, h in rows]
    for cpu_e, gpu_e in zip(ranker.explain_batch(explain_rows), gpu.explain_batch(explain_rows), strict=True):
        np.testing.assert_allclose(gpu_e.scores, cpu_e.scores, atol=TOL, rtol=0)
        np.testing.assert_allclose(gpu_e.attention, cpu_e.attention, atol=TOL, rtol=0)
        np.testing.assert_allclose(gpu_e.contribution, cpu_e.contribution, atol=TOL, rtol=0)
