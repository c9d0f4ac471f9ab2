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
from contracts.errors import ExportError
from contracts.vocab import FIRST_ID, OOV, OOV_TOKEN, PAD, PAD_TOKEN, Vocab
from model.din import DIN
from model.export import export_model, parity_cases, sha256_file
from tests.model.conftest import N_ITEMS, ExportCache, export_reusing, make_model

GRAPH_FILES = ("model.onnx", "explain.onnx", "items.txt")  # the files the manifest lists
FILES = ["explain.onnx", "items.txt", "manifest.json", "model.onnx"]  # what the bundle directory holds


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, export_cache: ExportCache) -> tuple[DIN, Path, dict]:
    """An export of make_model(), its graphs the real exporter's (traced here, or already for these
    weights by test_bundle's `exported`); they are kept for the tests that use `reused_exports`."""
    model, items = make_model()
    out = tmp_path_factory.mktemp("export") / "bundle"
    manifest = export_reusing(export_cache, model, items, out, metrics={"auc": 0.5}, name="unit")
    return model, out, manifest


def test_bundle_files_and_manifest(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, manifest = bundle
    assert sorted(p.name for p in out.iterdir()) == FILES
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == 1
    assert manifest["model_version"].startswith("unit-")
    assert manifest["files"] == {name: sha256_file(out / name) for name in GRAPH_FILES}
    assert manifest["explain"]["graph"] == "explain.onnx"
    assert manifest["explain"]["outputs"] == {
        "ctr": ["N"],
        "attention": ["N", "T"],
        "contribution": ["N", "T"],
    }
    assert manifest["max_history"] == 20 and manifest["oov_index"] == OOV and manifest["pad_index"] == 0
    assert manifest["config"] == model.cfg.to_dict()
    assert manifest["metrics"] == {"auc": 0.5}
    assert (out / "items.txt").read_text().splitlines()[:3] == ["<pad>", "<oov>", "item2"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    onnx.checker.check_model(onnx.load(str(out / "explain.onnx")), full_check=True)


def test_parity_recorded_for_every_case(bundle: tuple[DIN, Path, dict]) -> None:
    _, _, manifest = bundle
    parity = manifest["parity"]
    names = [c["name"] for c in parity["cases"]]
    assert any("empty" in n for n in names) and any("full" in n for n in names)
    assert any("unknown" in n for n in names)
    assert {1, 1000} <= {c["candidates"] for c in parity["cases"]}
    assert max(c["users"] for c in parity["cases"]) > 1
    assert 0 <= parity["max_abs_diff"] <= 1e-5
    worst = max(max(c["max_abs_diff"], c["attention_max_abs_diff"]) for c in parity["cases"])
    assert parity["max_abs_diff"] == worst
    assert all(0 <= c["attention_max_abs_diff"] <= 1e-5 for c in parity["cases"])
    explain = manifest["explain"]["parity"]
    assert [c["name"] for c in explain["cases"]] == names
    assert 0 <= explain["max_abs_diff"] <= 1e-5
    assert all(0 <= c["contribution_max_abs_diff"] <= c["max_abs_diff"] for c in explain["cases"])


def torch_reference(model: DIN, case: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch reference computed here, not by the exporter: `DIN.forward`, the tiled training
    form (each candidate against its own copy of its user's history), then a sigmoid."""
    tu = torch.from_numpy(case["target_user"])
    with torch.no_grad():
        logits = model(
            torch.from_numpy(case["target_items"]),
            torch.from_numpy(case["hist_items"])[tu],
            torch.from_numpy(case["hist_len"])[tu],
        )
    return torch.sigmoid(logits).numpy()


def onnx_output(onnx_path: Path, case: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["ctr"], {k: case[k] for k in export_mod.INPUTS})
    return got


def serving_case(
    hists: list[list[str]], candidates: list[list[str]], items: list[str]
) -> dict[str, np.ndarray]:
    """Serving-graph inputs built from item ids, through the vocabulary contract (unknown ids -> OOV)."""
    vocab = Vocab(items)
    width = max((len(h) for h in hists), default=0)
    hist = np.full((len(hists), width), PAD, dtype=np.int64)
    for u, h in enumerate(hists):
        hist[u, : len(h)] = vocab.lookup(h)
    return {
        "target_items": vocab.lookup([c for cands in candidates for c in cands]),
        "target_user": np.repeat(np.arange(len(hists), dtype=np.int64), [len(c) for c in candidates]),
        "hist_items": hist,
        "hist_len": np.array([len(h) for h in hists], dtype=np.int64),
    }


def own_cases(items: list[str], T: int, seed: int = 11) -> dict[str, dict[str, np.ndarray]]:
    """Cases written in this test, independent of the exporter's parity_cases."""
    rng = np.random.default_rng(seed)
    known = items[FIRST_ID:]

    def draw(n: int) -> list[str]:
        return [known[i] for i in rng.integers(0, len(known), size=n)]

    unknown = ["no-such-item", PAD_TOKEN, OOV_TOKEN]  # every one of them is OOV for a client
    return {
        "empty history": serving_case([[]], [draw(5)], items),
        "full history": serving_case([draw(T)], [draw(7)], items),
        "unknown items": serving_case([[*draw(3), *unknown, *draw(T - 6)]], [[*unknown, *draw(4)]], items),
        "several users: empty, short, full, one": serving_case(
            [[], draw(2), draw(T), draw(1)], [draw(3), draw(1), draw(40), draw(2)], items
        ),
        "one user, 500 candidates": serving_case([draw(T // 2)], [draw(500)], items),
    }


def check_explain_here(model: DIN, items: list[str], explain_path: Path) -> None:
    """explain.onnx on this test's own cases (at most 20 candidates each) against the references
    computed here: ctr by `forward`, contribution by `DIN.leave_one_out` (forward on every history
    with one behaviour removed)."""
    sess = ort.InferenceSession(str(explain_path), providers=["CPUExecutionProvider"])
    moved = 0.0
    for name, full in own_cases(items, model.cfg.max_history).items():
        case = {**full, "target_items": full["target_items"][:20], "target_user": full["target_user"][:20]}
        ctr, att, contribution = sess.run(
            ["ctr", "attention", "contribution"], {k: case[k] for k in export_mod.INPUTS}
        )
        tu = torch.from_numpy(case["target_user"])
        with torch.no_grad():
            want = model.leave_one_out(
                torch.from_numpy(case["target_items"]),
                torch.from_numpy(case["hist_items"])[tu],
                torch.from_numpy(case["hist_len"])[tu],
            ).numpy()
        assert contribution.shape == want.shape == att.shape and contribution.dtype == np.float32, name
        np.testing.assert_allclose(ctr, torch_reference(model, case), atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(contribution, want, atol=1e-5, rtol=0, err_msg=name)
        moved = max(moved, float(np.abs(want).max(initial=0.0)))
    assert moved > 1e-3  # the behaviours do move these scores: the comparison can fail


def test_explain_graph_matches_leave_one_out_computed_here(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, _ = bundle
    _, items = make_model()
    check_explain_here(model, items, out / "explain.onnx")


def check_parity_here(model: DIN, items: list[str], onnx_path: Path) -> None:
    cases = own_cases(items, model.cfg.max_history)
    assert (cases["unknown items"]["target_items"][:3] == OOV).all()  # the contract did its part
    for name, case in cases.items():
        got, want = onnx_output(onnx_path, case), torch_reference(model, case)
        assert got.shape == want.shape == case["target_items"].shape and got.dtype == np.float32, name
        assert np.all((got > 0) & (got < 1)), name
        assert float(np.max(np.abs(got - want))) <= 1e-5, name


def test_onnx_matches_torch_computed_here(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, _ = bundle
    _, items = make_model()
    check_parity_here(model, items, out / "model.onnx")


def test_onnx_matches_torch_on_fresh_inputs(bundle: tuple[DIN, Path, dict]) -> None:
    """Other shapes, other seed, T below max_history, the reference again computed here."""
    model, out, _ = bundle
    for case in parity_cases(N_ITEMS, 13, seed=7):
        got, want = onnx_output(out / "model.onnx", case), torch_reference(model, case)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert np.all((got > 0) & (got < 1))


def activation_widths(onnx_path: Path) -> list[int]:
    """Last dimension of every 3-D tensor of the graph (an (N, T, x) or (U, T, x) activation), after
    ONNX shape inference; symbolic last dimensions are left out."""
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    widths = []
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[-1].HasField("dim_value"):
            widths.append(dims[-1].dim_value)
    return widths


def test_graph_never_builds_the_4e_tensor(bundle: tuple[DIN, Path, dict]) -> None:
    model, out, _ = bundle
    widths = activation_widths(out / "model.onnx")
    E = model.cfg.embed_dim
    assert E in widths  # shapes were inferred: the history embeddings (U, T, E) are there
    assert 4 * E not in widths


def test_the_4e_check_catches_a_tiled_graph(
    bundle: tuple[DIN, Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above is not vacuous: the tiled form, exported as the serving graph, fails it."""
    model, _, _ = bundle

    def tiled_serve(
        self: DIN, ti: torch.Tensor, tu: torch.Tensor, hi: torch.Tensor, hl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctr = torch.sigmoid(DIN.forward(self, ti, hi[tu], hl[tu]))
        return ctr, DIN.attention(self, ti, hi[tu], hl[tu])

    monkeypatch.setattr(DIN, "serve_explained", tiled_serve)
    export_mod._export_onnx(model, tmp_path / "tiled.onnx")
    assert 4 * model.cfg.embed_dim in activation_widths(tmp_path / "tiled.onnx")


def _runtime_shapes(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every intermediate value of the graph on these inputs, as ONNX Runtime computes it."""
    proto = onnx.load(str(path))
    seen = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in seen:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                seen.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = sess.run(None, feeds)
    return {o.name: tuple(np.shape(v)) for o, v in zip(sess.get_outputs(), values, strict=True)}


def _one_user_shapes(path: Path, N: int, T: int, seed: int) -> dict[str, tuple[int, ...]]:
    """`_runtime_shapes` for one user with N random candidates and a full history of T."""
    rng = np.random.default_rng(seed)
    feeds = {
        "target_items": rng.integers(2, N_ITEMS, N),
        "target_user": np.zeros(N, dtype=np.int64),
        "hist_items": rng.integers(2, N_ITEMS, (1, T)),
        "hist_len": np.array([T]),
    }
    return _runtime_shapes(path, feeds)


def test_graph_never_builds_a_per_candidate_history(bundle: tuple[DIN, Path, dict]) -> None:
    """No (N, T, E) or (N, T, 4E) value in any axis order: no q*k, no per-candidate copy of the history
    (the previous graph had both). N, T, E are distinct here so each axis is recognisable."""
    model, out, _ = bundle
    N, T, E = 37, 23, model.cfg.embed_dim
    shapes = _one_user_shapes(out / "model.onnx", N, T, seed=0)
    assert shapes["ctr"] == (N,)
    assert len(shapes) > 20
    for name, shape in shapes.items():
        bad = N in shape and T in shape and (E in shape or 4 * E in shape)
        assert not bad, f"{name}: {shape}"


def test_graph_never_holds_the_whole_first_layer(bundle: tuple[DIN, Path, dict]) -> None:
    """At a ranking call's size the first attention layer's (N, T, H1+1) activations exist only a slice
    of the history at a time (DIN._SERVE_CHUNKS): no value has the N, T and H1+1 axes at once, and
    the slices are there. N, T, H1+1 are distinct here so each axis is recognisable."""
    model, out, _ = bundle
    N, T, H = 97, 53, model.cfg.att_hidden[0] + 1
    shapes = _one_user_shapes(out / "model.onnx", N, T, seed=1)
    whole = [(n, s) for n, s in shapes.items() if N in s and T in s and H in s]
    assert not whole, whole
    step = DIN._serve_chunk(N, T)
    assert 0 < step < T
    sliced = [s for s in shapes.values() if s == (1, N, step, H)]
    assert len(sliced) >= 2 * (T // step)  # the GEMM's output and the first layer, per full slice


def test_onnx_matches_torch_with_interleaved_users(bundle: tuple[DIN, Path, dict]) -> None:
    """Candidates of several users in any order, junk past hist_len: the same scores as grouped."""
    model, out, _ = bundle
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    U, T = 4, 17
    hist_len = np.array([17, 0, 5, 11])
    hist = rng.integers(2, N_ITEMS, (U, T))  # junk past hist_len
    target_user = rng.permutation(np.repeat(np.arange(U), [9, 4, 13, 1]))
    target = rng.integers(2, N_ITEMS, len(target_user))
    target[:3] = OOV
    (got,) = sess.run(
        ["ctr"],
        {"target_items": target, "target_user": target_user, "hist_items": hist, "hist_len": hist_len},
    )
    with torch.no_grad():
        tu = torch.from_numpy(target_user)
        want = torch.sigmoid(
            model(torch.from_numpy(target), torch.from_numpy(hist)[tu], torch.from_numpy(hist_len)[tu])
        ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_same_weights_give_the_same_bundle(bundle: tuple[DIN, Path, dict], tmp_path: Path) -> None:
    """The model version is content-addressed: it must not depend on where or when it was exported (nor
    on whether its graph's trace was kept or traced afresh: the next test)."""
    model, out, manifest = bundle
    proto = onnx.load(str(out / "model.onnx"))
    assert not any(node.metadata_props for node in proto.graph.node)  # no stack traces, no source paths
    _, items = make_model()
    again = export_model(model, items, tmp_path / "again", name="unit")
    assert again["files"] == manifest["files"]
    assert again["model_version"] == manifest["model_version"]


def test_a_trace_is_kept_on_disk_for_the_next_process_and_a_damaged_one_is_traced_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIN_GRAPH_CACHE: a configuration is traced once (torch.export is most of an export's time); another
    process binds its own weights into the kept trace, and gets the bytes a fresh trace gives."""
    model, items = make_model(seed=11)  # make_model()'s configuration
    first = export_model(model, items, tmp_path / "first", name="unit")
    cache = tmp_path / "graphs"
    cache.mkdir()
    for key, data in export_mod._TRACES.items():
        (cache / f"{key}.onnx").write_bytes(data)
    monkeypatch.setenv("DIN_GRAPH_CACHE", str(cache))
    monkeypatch.setattr(export_mod, "_TRACES", {})  # a new process: only the disk has them

    def no_trace(*args: object) -> bytes:
        raise AssertionError("traced again with the trace on disk")

    with monkeypatch.context() as mp:
        mp.setattr(export_mod, "_trace", no_trace)
        again = export_model(model, items, tmp_path / "again", name="unit")
    assert again["files"] == first["files"]

    # the serving graph's trace (the one model_version hashes) damaged: traced afresh, not a failure, and
    # the same bytes as the kept trace gave
    damaged = cache / f"{export_mod._trace_key(model, False, None)}.onnx"
    damaged.write_bytes(b"not an onnx model")
    monkeypatch.setattr(export_mod, "_TRACES", {})
    retraced = export_model(model, items, tmp_path / "retraced", name="unit")
    assert retraced["files"] == first["files"] and retraced["model_version"] == first["model_version"]
    assert damaged.read_bytes() != b"not an onnx model"  # and the cache holds the new trace


OTHER: dict = {"seed": 3, "pooling": "sum"}  # another model than make_model()'s: its first variant


@pytest.mark.parametrize("kw", [{"pooling": "sum"}, {"att_softmax": True, "head_activation": "prelu"}])
def test_variants_export_within_tolerance(tmp_path: Path, export_cache: ExportCache, kw: dict) -> None:
    model, items = make_model(seed=3, **kw)
    manifest = export_model(model, items, tmp_path / "b")
    # real exports: kept for the tests that need a second model (OTHER) and use `reused_exports`
    export_cache.add(model, tmp_path / "b" / "model.onnx")
    export_cache.add(model, tmp_path / "b" / "explain.onnx", explaining=True)
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    assert manifest["explain"]["parity"]["max_abs_diff"] <= 1e-5
    check_parity_here(model, items, tmp_path / "b" / "model.onnx")
    check_explain_here(model, items, tmp_path / "b" / "explain.onnx")


@pytest.mark.parametrize("output", [0, 1], ids=["ctr", "attention"])
def test_refuses_to_write_when_parity_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reused_exports: ExportCache, output: int
) -> None:
    model, items = make_model()
    real = export_mod._reference

    def off_by_a_bit(m: DIN, case: dict) -> tuple[np.ndarray, np.ndarray]:
        want = list(real(m, case))
        want[output] = want[output] + 1e-4
        return want[0], want[1]

    monkeypatch.setattr(export_mod, "_reference", off_by_a_bit)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="parity check failed"):
        export_model(model, items, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_refuses_to_write_when_the_contributions_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reused_exports: ExportCache
) -> None:
    model, items = make_model()
    real = model.leave_one_out
    # This model's reference, not DIN's code: explain.onnx (serve_contributions) never calls it, so
    # the graph is the one make_model() always exports, and the check must refuse it.
    monkeypatch.setattr(model, "leave_one_out", lambda *a: real(*a) + 1e-4)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"parity check failed: explain\.onnx differs"):
        export_model(model, items, out)
    assert list(tmp_path.iterdir()) == []


def test_vocab_size_mismatch_is_refused(tmp_path: Path) -> None:
    model, items = make_model()
    with pytest.raises(ExportError, match="item ids"):
        export_model(model, items[:-1], tmp_path / "b")


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file of a bundle directory, by name, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("swap", ["exchange", "rename aside"])
def test_export_replaces_an_existing_bundle(
    bundle: tuple[DIN, Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reused_exports: ExportCache,
    swap: str,
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
    model, items = make_model(**OTHER)
    manifest = export_model(model, items, out, name="unit")
    if swap == "exchange" and swapped != [True]:
        pytest.skip("renameat2 RENAME_EXCHANGE is not available here")
    assert swapped == [swap == "exchange"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or old directory left
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["files"] == {name: sha256_file(out / name) for name in GRAPH_FILES}
    assert manifest["model_version"] != first_manifest["model_version"]


@pytest.mark.parametrize("failure", ["parity", "swap"])
def test_failed_export_leaves_the_old_bundle_untouched(
    bundle: tuple[DIN, Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reused_exports: ExportCache,
    failure: str,
) -> None:
    """Refused by the parity gate, or failing at the very swap (no renameat2, the new bundle cannot be
    renamed into place after the old one was moved aside): the old bundle stays, byte for byte."""
    _, first, _ = bundle
    out = tmp_path / "bundle"
    shutil.copytree(first, out)
    before = _snapshot(out)
    if failure == "parity":
        real = export_mod._reference
        monkeypatch.setattr(
            export_mod, "_reference", lambda m, case: (real(m, case)[0] + 1e-4, real(m, case)[1])
        )
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
    model, items = make_model(**OTHER)
    with pytest.raises(expected[0], match=expected[1]):
        export_model(model, items, out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or old directory left
