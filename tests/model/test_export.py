"""Export: the ONNX serving graph equals the PyTorch reference, and the bundle describes itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import model.export as export_mod
from model.din import DIN, DINConfig, build_model
from model.errors import ExportError
from model.export import export_model, parity_cases, sha256_file
from model.vocab import FIRST_ID, OOV, OOV_TOKEN, PAD_TOKEN

N_ITEMS, N_CATE = 300, 12


def make_model(seed: int = 0, **cfg_kw: object) -> tuple[DIN, list[str]]:
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


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[DIN, Path, dict]:
    model, items = make_model()
    out = tmp_path_factory.mktemp("export") / "bundle"
    manifest = export_model(model, items, out, metrics={"auc": 0.5}, name="unit")
    return model, out, manifest


def test_bundle_files_and_manifest(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, manifest = bundle
    assert sorted(p.name for p in out.iterdir()) == ["items.txt", "manifest.json", "model.onnx"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == 1
    assert manifest["model_version"].startswith("unit-")
    assert manifest["files"] == {name: sha256_file(out / name) for name in ("model.onnx", "items.txt")}
    assert manifest["max_history"] == 20 and manifest["oov_index"] == OOV and manifest["pad_index"] == 0
    assert manifest["config"] == model.cfg.to_dict()
    assert manifest["metrics"] == {"auc": 0.5}
    assert (out / "items.txt").read_text().splitlines()[:3] == ["<pad>", "<oov>", "item2"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)


def test_parity_recorded_for_every_case(bundle: tuple[DIN, Path, dict]) -> None:
    _, _, manifest = bundle
    parity = manifest["parity"]
    names = [c["name"] for c in parity["cases"]]
    assert any("empty" in n for n in names) and any("full" in n for n in names)
    assert any("unknown" in n for n in names)
    assert {1, 1000} <= {c["candidates"] for c in parity["cases"]}
    assert max(c["users"] for c in parity["cases"]) > 1
    assert 0 <= parity["max_abs_diff"] <= 1e-5
    assert parity["max_abs_diff"] == max(c["max_abs_diff"] for c in parity["cases"])


def test_onnx_matches_torch_on_fresh_inputs(bundle: tuple[DIN, Path, dict]) -> None:
    """Independent of the exporter's own check: other shapes, other seed, T below max_history."""
    model, out, _ = bundle
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for case in parity_cases(N_ITEMS, 13, seed=7):
        (got,) = sess.run(["ctr"], {k: case[k] for k in export_mod.INPUTS})
        tu = torch.from_numpy(case["target_user"])
        with torch.no_grad():
            want = torch.sigmoid(
                model(
                    torch.from_numpy(case["target_items"]),
                    torch.from_numpy(case["hist_items"])[tu],
                    torch.from_numpy(case["hist_len"])[tu],
                )
            ).numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert np.all((got > 0) & (got < 1))


def test_graph_never_builds_the_4e_tensor(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, _ = bundle
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.onnx")))
    four_e = 4 * model.cfg.embed_dim
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3:  # an (N, T, x) or (U, T, x) activation
            assert not (dims[-1].HasField("dim_value") and dims[-1].dim_value == four_e), vi.name


def test_same_weights_give_the_same_bundle(bundle: tuple[DIN, Path, dict], tmp_path: Path) -> None:
    """The model version is content-addressed: it must not depend on where or when it was exported."""
    model, out, manifest = bundle
    proto = onnx.load(str(out / "model.onnx"))
    assert not any(node.metadata_props for node in proto.graph.node)  # no stack traces, no source paths
    _, items = make_model()
    again = export_model(model, items, tmp_path / "again", name="unit")
    assert again["files"] == manifest["files"]
    assert again["model_version"] == manifest["model_version"]


@pytest.mark.parametrize("kw", [{"pooling": "sum"}, {"att_softmax": True, "head_activation": "prelu"}])
def test_variants_export_within_tolerance(tmp_path: Path, kw: dict) -> None:
    model, items = make_model(seed=3, **kw)
    manifest = export_model(model, items, tmp_path / "b")
    assert manifest["parity"]["max_abs_diff"] <= 1e-5


def test_refuses_to_write_when_parity_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, items = make_model()
    real = export_mod._reference
    monkeypatch.setattr(export_mod, "_reference", lambda m, case: real(m, case) + 1e-4)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="parity check failed"):
        export_model(model, items, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_vocab_size_mismatch_is_refused(tmp_path: Path) -> None:
    model, items = make_model()
    with pytest.raises(ExportError, match="item ids"):
        export_model(model, items[:-1], tmp_path / "b")


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file of a bundle directory, by name, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("swap", ["exchange", "rename aside"])
def test_export_replaces_an_existing_bundle(
    bundle: tuple[DIN, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    _, first, first_manifest = bundle
    out = tmp_path / "bundle"
    shutil.copytree(first, out)
    swapped: list[bool] = []
    real = export_mod._exchange

    def exchange(a: Path, b: Path) -> bool:
        swapped.append(real(a, b) if swap == "exchange" else False)
        return swapped[-1]

    monkeypatch.setattr(export_mod, "_exchange", exchange)
    model, items = make_model(seed=1)
    manifest = export_model(model, items, out, name="unit")
    if swap == "exchange" and swapped != [True]:
        pytest.skip("renameat2 RENAME_EXCHANGE is not available here")
    assert swapped == [swap == "exchange"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or old directory left
    assert sorted(p.name for p in out.iterdir()) == ["items.txt", "manifest.json", "model.onnx"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["files"] == {name: sha256_file(out / name) for name in ("model.onnx", "items.txt")}
    assert manifest["model_version"] != first_manifest["model_version"]


@pytest.mark.parametrize("failure", ["parity", "swap"])
def test_failed_export_leaves_the_old_bundle_untouched(
    bundle: tuple[DIN, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Refused by the parity gate, or failing at the very swap (no renameat2, the new bundle cannot be
    renamed into place after the old one was moved aside): the old bundle stays, byte for byte."""
    _, first, _ = bundle
    out = tmp_path / "bundle"
    shutil.copytree(first, out)
    before = _snapshot(out)
    if failure == "parity":
        real = export_mod._reference
        monkeypatch.setattr(export_mod, "_reference", lambda m, case: real(m, case) + 1e-4)
        expected: tuple[type[Exception], str] = (ExportError, "parity check failed")
    else:
        monkeypatch.setattr(export_mod, "_exchange", lambda a, b: False)
        real_rename = Path.rename

        def rename(self: Path, target: str | Path) -> Path:
            staging = self.name.startswith(".bundle.") and ".old-" not in self.name
            if staging and Path(target) == out:
                raise OSError("disk on fire")
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        expected = (OSError, "disk on fire")
    model, items = make_model(seed=1)
    with pytest.raises(expected[0], match=expected[1]):
        export_model(model, items, out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or old directory left
