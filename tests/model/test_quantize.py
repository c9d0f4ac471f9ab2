"""The int8 serving graph: written beside model.onnx only when it passes the quality gate on held-out
samples; a deliberately broken quantization is refused, and the export says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from contracts.bundle import INT8_GRAPH, load_bundle
from contracts.errors import ExportError
from model.checkpoint import load_run
from model.export import export, export_model
from model.quantize import GATE, held_out_from_data, quality_gate, quantize_int8
from tests.model.conftest import ExportCache


def _head_too(src: Path, dst: Path) -> dict[str, Any]:
    """The naive quantization: every constant-weight MatMul and the head's Gemms (the interest vector
    gets one uint8 scale per call). On this trained model it moves the top 10 and the AUC too much."""
    return quantize_int8(src, dst, scope="all")


def _negated(src: Path, dst: Path) -> dict[str, Any]:
    """quantize_int8, then every int8 weight negated (a sign bug in a hand-written quantizer)."""
    method = quantize_int8(src, dst)
    proto = onnx.load(str(dst))
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            w = -numpy_helper.to_array(t).astype(np.int16)
            t.CopyFrom(numpy_helper.from_array(w.clip(-128, 127).astype(np.int8), t.name))
    onnx.save(proto, str(dst))
    return {**method, "broken": "int8 weights negated"}


def _scaled(src: Path, dst: Path) -> dict[str, Any]:
    """quantize_int8, then the quantized weights' scales tripled (a graph whose weights are scaled)."""
    method = quantize_int8(src, dst)
    proto = onnx.load(str(dst))
    for t in proto.graph.initializer:
        if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3.0, t.name))
    onnx.save(proto, str(dst))
    return {**method, "broken": "weight scales x3"}


@pytest.fixture(scope="module")
def int8_bundle(run_1epoch: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    return out, export(run_1epoch, out)


def test_int8_graph_passes_the_gate_and_is_listed(int8_bundle: tuple[Path, dict]) -> None:
    out, manifest = int8_bundle
    int8 = manifest["precision"]["int8"]
    assert int8["written"] and int8["reason"] is None
    gate = int8["gate"]
    assert gate["passed"] and gate["reasons"] == []
    assert gate["auc_drop"] <= GATE["auc_drop"] and gate["gauc_drop"] <= GATE["gauc_drop"]
    assert gate["top10_overlap"] >= GATE["top10_overlap"]
    assert -1.0 <= gate["kendall_tau_mean"] <= 1.0 and gate["requests"] > 0 and gate["samples"] > 0
    assert json.loads((out / "manifest.json").read_text())["precision"] == manifest["precision"]
    assert INT8_GRAPH in manifest["files"]
    bundle = load_bundle(out)
    assert bundle.int8_bytes == (out / INT8_GRAPH).read_bytes()
    kinds = {n.op_type for n in onnx.load(str(out / INT8_GRAPH)).graph.node}
    assert "MatMulInteger" in kinds or "DynamicQuantizeMatMul" in kinds


def test_int8_file_is_hashed_like_the_others(int8_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from contracts.errors import BundleError

    out, _ = int8_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    data = bytearray((copy / INT8_GRAPH).read_bytes())
    data[-1] ^= 1
    (copy / INT8_GRAPH).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for model\.int8\.onnx"):
        load_bundle(copy)


@pytest.mark.parametrize("broken", [_scaled, _head_too, _negated], ids=["scaled", "head-too", "negated"])
def test_a_broken_quantization_is_refused(
    broken: Any, run_1epoch: Path, prepared_data: Path, int8_bundle: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = int8_bundle
    model, _ = load_run(run_1epoch)
    held = held_out_from_data(prepared_data, model.cfg.max_history)
    broken(out / "model.onnx", tmp_path / "broken.onnx")
    report = quality_gate(out / "model.onnx", tmp_path / "broken.onnx", held, model.cfg.n_items)
    assert not report["passed"] and report["reasons"]


def test_export_without_the_refused_graph_says_why(
    run_1epoch: Path, prepared_data: Path, tmp_path: Path, reused_exports: ExportCache
) -> None:
    model, ckpt = load_run(run_1epoch)
    held = held_out_from_data(prepared_data, model.cfg.max_history)
    out = tmp_path / "b"
    manifest = export_model(model, list(ckpt.items), out, held_out=held, quantize=_scaled)
    int8 = manifest["precision"]["int8"]
    assert not int8["written"] and int8["reason"] and not int8["gate"]["passed"]
    assert INT8_GRAPH not in manifest["files"] and not (out / INT8_GRAPH).exists()
    assert load_bundle(out).int8_bytes is None  # a bundle without the int8 graph is a valid one
    # --precision int8 refuses the whole export, and leaves the bundle there as it was
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match=r"int8 graph was refused: .*no bundle written"):
        export_model(model, list(ckpt.items), out, held_out=held, quantize=_scaled, precision="int8")
    assert (out / "manifest.json").read_bytes() == before


def test_fp32_only_and_no_held_out(run_1epoch: Path, tmp_path: Path, reused_exports: ExportCache) -> None:
    model, ckpt = load_run(run_1epoch)
    manifest = export_model(model, list(ckpt.items), tmp_path / "a", precision="fp32")
    assert "precision" not in manifest and INT8_GRAPH not in manifest["files"]
    manifest = export_model(model, list(ckpt.items), tmp_path / "b")  # both, but nothing to gate it on
    assert manifest["precision"]["int8"]["reason"] == "no held-out samples to gate it on"
    assert not (tmp_path / "b" / INT8_GRAPH).exists()
    with pytest.raises(ExportError, match="precision must be one of"):
        export_model(model, list(ckpt.items), tmp_path / "c", precision="fp16")
