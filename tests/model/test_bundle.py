"""Bundle integrity: `load_bundle` refuses a manifest that reaches outside the bundle, and a model.onnx
that is not self-contained, needs operators ONNX Runtime does not have built in, breaks the input and
output contract, or is not protobuf at all; the real exported bundle and valid small models pass."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

import model.export as export_mod
from contracts.bundle import INPUTS, check_model, load_bundle
from contracts.errors import BundleError, ExportError
from model.din import DIN
from model.export import export_model
from tests.model.conftest import ExportCache, export_reusing, make_model

INT64, FLOAT = TensorProto.INT64, TensorProto.FLOAT
ONNX = helper.make_opsetid("", 20)
Spec = dict[str, tuple[int, list[str] | None]]  # value name -> (elem type, dims; None: no shape)


def small_din() -> tuple[DIN, list[str]]:
    """A random DIN and its item ids: the export tests' (tests/model/conftest.py make_model)."""
    return make_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, export_cache: ExportCache) -> Path:
    """A real `din export` bundle (its graphs traced by the real exporter once a session for these
    weights, and shared with tests/model/test_export.py's: the exporter is not what is tested here)."""
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    export_reusing(export_cache, *small_din(), path, model_version="test-bundle")
    return path


# ------------------------------------------------------------------------------------ building models


def interface(
    inputs: Spec | None = None, outputs: Spec | None = None
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs: the contract's unless given."""
    inputs = inputs if inputs is not None else contract()
    outputs = outputs if outputs is not None else {"ctr": (FLOAT, ["N"])}
    return (
        [helper.make_tensor_value_info(n, t, dims) for n, (t, dims) in inputs.items()],
        [helper.make_tensor_value_info(n, t, dims) for n, (t, dims) in outputs.items()],
    )


def model_of(
    nodes: list[onnx.NodeProto],
    *,
    initializers: list[onnx.TensorProto] | None = None,
    opsets: list[onnx.OperatorSetIdProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
    inputs: Spec | None = None,
    outputs: Spec | None = None,
) -> onnx.ModelProto:
    ins, outs = interface(inputs, outputs)
    graph = helper.make_graph(nodes, "g", ins, outs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=opsets or [ONNX], functions=functions or [])
    model.ir_version = 10  # what this ONNX Runtime reads, and what `din export` writes
    return model


def cast_ctr() -> list[onnx.NodeProto]:
    """ctr = float(target_items): the smallest graph with the contract's interface."""
    return [helper.make_node("Cast", ["target_items"], ["ctr"], to=FLOAT, name="cast")]


def valid_model() -> onnx.ModelProto:
    """A small model using what the checks must let through: ONNX, ONNX-ML and com.microsoft opsets,
    a contrib op, a model-local function (with an opset of its own domain), an If with subgraphs, a
    Constant with an inline tensor and an initializer."""
    twice = helper.make_function(
        "local.fns",
        "Twice",
        ["x"],
        ["y"],
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [ONNX],
    )
    branch = helper.make_graph(
        [helper.make_node("Identity", ["gelu"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", FLOAT, ["N"])],
    )
    nodes = [
        helper.make_node("Cast", ["target_items"], ["f"], to=FLOAT),
        helper.make_node("Twice", ["f"], ["f2"], domain="local.fns"),
        helper.make_node("Gelu", ["f2"], ["gelu"], domain="com.microsoft"),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Greater", ["half", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["ctr"], then_branch=branch, else_branch=branch),
    ]
    return model_of(
        nodes,
        initializers=[numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
        opsets=[
            ONNX,
            helper.make_opsetid("ai.onnx.ml", 3),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("local.fns", 1),
        ],
        functions=[twice],
    )


def with_model(exported: Path, tmp_path: Path, model: onnx.ModelProto | bytes) -> Path:
    """A copy of the exported bundle with this model.onnx, its manifest checksum rewritten to match."""
    path = tmp_path / "bundle"
    shutil.copytree(exported, path)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (path / "model.onnx").write_bytes(data)
    set_files(path, {"model.onnx": hashlib.sha256(data).hexdigest()})
    return path


def set_files(path: Path, files: dict[str, str]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"].update(files)
    (path / "manifest.json").write_text(json.dumps(manifest))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ what passes


def test_exported_bundle_passes(exported: Path) -> None:
    bundle = load_bundle(exported)
    assert bundle.model_version == "test-bundle"
    check_model((exported / "model.onnx").read_bytes())


def test_valid_small_model_passes_and_onnx_runtime_runs_it(exported: Path, tmp_path: Path) -> None:
    model = valid_model()
    onnx.checker.check_model(model, full_check=True)
    bundle = load_bundle(with_model(exported, tmp_path, model))
    session = ort.InferenceSession(str(bundle.graph), providers=["CPUExecutionProvider"])
    feeds = {n: np.zeros([1] * len(dims), np.int64) for n, dims in INPUTS.items()}
    feeds["target_items"] = np.array([1, 2], np.int64)
    (ctr,) = session.run(["ctr"], feeds)
    assert ctr.shape == (2,)


def test_export_refuses_a_graph_the_service_would_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`din export` runs the same check before writing: no bundle that load_bundle would refuse."""

    def export_without_hist_len(model: DIN, path: Path) -> None:
        onnx.save(model_of(cast_ctr(), inputs=contract(hist_len=None)), path)  # passes onnx's checker

    monkeypatch.setattr(export_mod, "_export_onnx", export_without_hist_len)
    with pytest.raises(
        ExportError, match=r"breaks the bundle contract: model\.onnx has inputs \[.*no bundle written"
    ):
        export_model(*small_din(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging directory left


def test_a_symlink_inside_the_bundle_passes(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    (path / "alias.txt").symlink_to("items.txt")
    set_files(path, {"alias.txt": sha(path / "items.txt")})
    load_bundle(path)


def test_a_symlinked_bundle_directory_passes(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "current").symlink_to(exported)
    load_bundle(tmp_path / "current")


# ------------------------------------------------------------------------------------ manifest names


def test_manifest_name_with_dotdot_is_refused_before_it_is_read(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    (tmp_path / "x").write_text("outside")
    set_files(path, {"../x": "0" * 64})  # a wrong checksum: the name is refused before any hashing
    with pytest.raises(BundleError, match=r"manifest\.json lists '\.\./x', which has a '\.\.' part"):
        load_bundle(path)


def test_manifest_name_with_dotdot_inside_is_refused(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    set_files(path, {"sub/../items.txt": sha(path / "items.txt")})
    with pytest.raises(BundleError, match=r"'\.\.' part"):
        load_bundle(path)


def test_absolute_manifest_name_is_refused(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    set_files(path, {str(outside): sha(outside)})  # even with the right checksum
    with pytest.raises(BundleError, match=rf"lists '{outside}', which is an absolute path"):
        load_bundle(path)


def test_symlink_pointing_outside_is_refused(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (path / "link.txt").symlink_to(outside)
    set_files(path, {"link.txt": sha(outside)})
    with pytest.raises(
        BundleError, match=r"lists 'link\.txt', which resolves to .*outside\.txt, outside the bundle"
    ):
        load_bundle(path)


def test_model_onnx_symlinked_outside_is_refused(exported: Path, tmp_path: Path) -> None:
    path = with_model(exported, tmp_path, valid_model())
    (path / "model.onnx").rename(tmp_path / "model.onnx")
    (path / "model.onnx").symlink_to(tmp_path / "model.onnx")
    with pytest.raises(BundleError, match=r"lists 'model\.onnx', which resolves to .* outside the bundle"):
        load_bundle(path)


@pytest.mark.parametrize("name", ["", ".", "a\0b"])
def test_manifest_name_that_is_no_file_name_is_refused(exported: Path, tmp_path: Path, name: str) -> None:
    path = with_model(exported, tmp_path, valid_model())
    set_files(path, {name: "0" * 64})
    with pytest.raises(BundleError, match="which is not a file name"):
        load_bundle(path)


# ------------------------------------------------------------------------------------ operators


def refused(exported: Path, tmp_path: Path, model: onnx.ModelProto | bytes, pattern: str) -> None:
    """load_bundle refuses this model with a message matching pattern, naming the bundle and model.onnx."""
    with pytest.raises(BundleError, match=rf"bundle .*: model\.onnx {pattern}"):
        load_bundle(with_model(exported, tmp_path, model))


def test_custom_domain_operator_is_refused(exported: Path, tmp_path: Path) -> None:
    nodes = [helper.make_node("Evil", ["target_items"], ["ctr"], domain="my.ops", name="evil")]
    refused(exported, tmp_path, model_of(nodes), r"node 'evil' runs operator 'Evil' of domain 'my\.ops'")


def test_custom_opset_import_is_refused(exported: Path, tmp_path: Path) -> None:
    model = model_of(cast_ctr(), opsets=[ONNX, helper.make_opsetid("my.ops", 1)])
    refused(
        exported,
        tmp_path,
        model,
        r"imports operator set 'my\.ops', which ONNX Runtime does not have built in",
    )


@pytest.mark.parametrize("domain", ["ai.onnx.preview.training", "com.microsoft.nchwc", "com.microsoftx"])
def test_domains_outside_the_allow_list_are_refused(exported: Path, tmp_path: Path, domain: str) -> None:
    nodes = [helper.make_node("Op", ["target_items"], ["ctr"], domain=domain, name="n")]
    refused(exported, tmp_path, model_of(nodes), rf"node 'n' runs operator 'Op' of domain '{domain}'")


def if_node(then_nodes: list[onnx.NodeProto], name: str = "if") -> onnx.NodeProto:
    """If cond: these nodes, else a clean Cast; both branches output "b"."""

    def branch(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
        return helper.make_graph(nodes, "branch", [], [helper.make_tensor_value_info("b", FLOAT, ["N"])])

    clean = [helper.make_node("Cast", ["target_items"], ["b"], to=FLOAT)]
    return helper.make_node(
        "If", ["cond"], ["ctr"], then_branch=branch(then_nodes), else_branch=branch(clean), name=name
    )


def cond_node() -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True)))


def test_custom_domain_in_a_subgraph_is_refused(exported: Path, tmp_path: Path) -> None:
    evil = helper.make_node("Evil", ["target_items"], ["b"], domain="my.ops", name="deep")
    model = model_of([cond_node(), if_node([evil])])
    refused(
        exported, tmp_path, model, r"node 'deep' in attribute 'then_branch' of node 'if' runs operator 'Evil'"
    )


def test_custom_domain_in_a_loop_body_two_levels_down_is_refused(exported: Path, tmp_path: Path) -> None:
    evil = helper.make_node("Evil", ["target_items"], ["b"], domain="my.ops", name="deeper")
    body = helper.make_graph(
        [cond_node(), if_node([evil], name="inner")],
        "body",
        [
            helper.make_tensor_value_info("i", INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("ctr", FLOAT, ["N"]),
        ],
    )
    loop = helper.make_node("Loop", ["", ""], ["ctr"], body=body, name="loop")
    refused(
        exported,
        tmp_path,
        model_of([loop]),
        r"node 'deeper' in attribute 'then_branch' of node 'inner' in attribute 'body' of node 'loop' runs",
    )


def test_local_function_body_is_checked(exported: Path, tmp_path: Path) -> None:
    fn = helper.make_function(
        "local.fns",
        "Wrap",
        ["x"],
        ["y"],
        [helper.make_node("Evil", ["x"], ["y"], domain="my.ops", name="inside")],
        [ONNX],
    )
    nodes = [helper.make_node("Wrap", ["target_items"], ["ctr"], domain="local.fns")]
    model = model_of(nodes, opsets=[ONNX, helper.make_opsetid("local.fns", 1)], functions=[fn])
    refused(exported, tmp_path, model, r"node 'inside' in function local\.fns::Wrap runs operator 'Evil'")


def test_local_function_opset_import_is_checked(exported: Path, tmp_path: Path) -> None:
    fn = helper.make_function(
        "local.fns",
        "Wrap",
        ["x"],
        ["y"],
        [helper.make_node("Identity", ["x"], ["y"])],
        [ONNX, helper.make_opsetid("my.ops", 1)],
    )
    nodes = [helper.make_node("Wrap", ["target_items"], ["ctr"], domain="local.fns")]
    model = model_of(nodes, opsets=[ONNX, helper.make_opsetid("local.fns", 1)], functions=[fn])
    refused(exported, tmp_path, model, r"imports operator set 'my\.ops' in function local\.fns::Wrap")


def test_unknown_operator_in_a_local_function_domain_is_refused(exported: Path, tmp_path: Path) -> None:
    """A local function's domain lets through the functions the model defines, nothing else of it."""
    fn = helper.make_function(
        "local.fns", "Wrap", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [ONNX]
    )
    nodes = [helper.make_node("Other", ["target_items"], ["ctr"], domain="local.fns", name="n")]
    model = model_of(nodes, opsets=[ONNX, helper.make_opsetid("local.fns", 1)], functions=[fn])
    refused(exported, tmp_path, model, r"node 'n' runs operator 'Other' of domain 'local\.fns'")


def test_a_graph_split_over_two_fields_is_checked_whole(exported: Path, tmp_path: Path) -> None:
    """Protobuf merges a message field that occurs twice: the reader must see both halves' nodes."""
    clean = model_of(cast_ctr())
    evil = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["y"], domain="my.ops", name="second")], "g", [], []
    ).SerializeToString()
    data = clean.SerializeToString() + bytes([7 << 3 | 2, len(evil)]) + evil  # a second ModelProto.graph
    assert [n.name for n in onnx.load_from_string(data).graph.node] == ["cast", "second"]
    refused(exported, tmp_path, data, r"node 'second' runs operator 'Evil'")


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_ifs(levels: int) -> bytes:
    """A model whose graph has If nodes nested `levels` subgraphs deep, written by hand: the protobuf
    library refuses to build messages this deep (about 33 subgraphs)."""
    node = field(4, b"Identity")
    for _ in range(levels):  # NodeProto.attribute (5) > AttributeProto.g (6) > GraphProto.node (1)
        node = field(4, b"If") + field(5, field(1, b"then_branch") + field(6, field(1, node)))
    return model_of(cast_ctr()).SerializeToString() + field(7, field(1, node))  # merged into the graph


def test_subgraphs_nested_too_deep_are_refused() -> None:
    check_model(nested_ifs(32))
    with pytest.raises(BundleError, match="nests subgraphs more than 32 deep in attribute 'then_branch'"):
        check_model(nested_ifs(33))


# ------------------------------------------------------------------------------------ external data


def test_external_data_initializer_is_refused(exported: Path, tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones(64, np.float32), "w")
    model = model_of(cast_ctr(), initializers=[weight])
    path = with_model(exported, tmp_path, model)
    onnx.save_model(
        model, path / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    assert (path / "w.bin").is_file()  # the data file lies next to it, listed with its checksum
    set_files(path, {"model.onnx": sha(path / "model.onnx"), "w.bin": sha(path / "w.bin")})
    with pytest.raises(BundleError, match=r"model\.onnx initializer 'w' keeps its data in another file"):
        load_bundle(path)


def external(name: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), name)
    set_external_data(tensor, location="/etc/passwd", offset=0, length=16)  # data_location EXTERNAL
    tensor.ClearField("raw_data")
    return tensor


def test_external_data_in_a_constant_is_refused(exported: Path, tmp_path: Path) -> None:
    nodes = [helper.make_node("Constant", [], ["c"], value=external("c"), name="const"), *cast_ctr()]
    refused(
        exported, tmp_path, model_of(nodes), r"tensor 'c' in attribute 'value' of node 'const' keeps its data"
    )


def test_external_data_in_a_subgraph_initializer_is_refused(exported: Path, tmp_path: Path) -> None:
    node = if_node([helper.make_node("Identity", ["e"], ["b"])])
    node.attribute[1].g.initializer.append(external("e"))  # attributes sorted: else_branch, then_branch
    refused(
        exported,
        tmp_path,
        model_of([cond_node(), node]),
        r"initializer 'e' in attribute 'then_branch' of node 'if' keeps its data",
    )


def test_external_data_in_a_sparse_initializer_is_refused(exported: Path, tmp_path: Path) -> None:
    model = model_of(cast_ctr())
    sparse = helper.make_sparse_tensor(
        external("s"), numpy_helper.from_array(np.array([0, 1, 2, 3]), "i"), [4]
    )
    model.graph.sparse_initializer.append(sparse)
    refused(exported, tmp_path, model, r"sparse initializer 's' keeps its data in another file")


def test_external_data_entries_alone_are_refused() -> None:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "w")
    entry = tensor.external_data.add()  # data_location left DEFAULT
    entry.key, entry.value = "location", "w.bin"
    with pytest.raises(BundleError, match="initializer 'w' keeps its data in another file"):
        check_model(model_of(cast_ctr(), initializers=[tensor]).SerializeToString())


def test_external_data_location_alone_is_refused() -> None:
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "w")
    tensor.data_location = TensorProto.EXTERNAL  # no external_data entries
    with pytest.raises(BundleError, match="initializer 'w' keeps its data in another file"):
        check_model(model_of(cast_ctr(), initializers=[tensor]).SerializeToString())


# ------------------------------------------------------------------------------------ the interface


def contract(**changes: tuple[int, list[str] | None] | None) -> Spec:
    """The contract's inputs, with these changed (None: left out)."""
    inputs: Spec = {n: (INT64, dims) for n, dims in INPUTS.items()}
    for name, value in changes.items():
        if value is None:
            del inputs[name]
        else:
            inputs[name] = value
    return inputs


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        (
            contract(hist_len=None),
            r"has inputs \['target_items', 'target_user', 'hist_items'\], the contract is",
        ),
        (contract(extra=(INT64, ["N"])), r"has inputs \[.*'extra'\], the contract is"),
        (
            contract(target_user=(TensorProto.INT32, ["N"])),
            r"input 'target_user' is int32 of rank 1, the contract is int64",
        ),
        (
            contract(hist_items=(INT64, ["U"])),
            r"input 'hist_items' is int64 of rank 1, the contract is int64 of rank 2",
        ),
        (contract(hist_len=(INT64, None)), r"input 'hist_len' is int64 of unknown rank"),
    ],
)
def test_wrong_inputs_are_refused(exported: Path, tmp_path: Path, inputs: Spec, pattern: str) -> None:
    refused(exported, tmp_path, model_of(cast_ctr(), inputs=inputs), pattern)


def test_input_that_is_not_a_tensor_is_refused(exported: Path, tmp_path: Path) -> None:
    model = model_of(cast_ctr())
    model.graph.input[0].type.CopyFrom(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(INT64, ["N"]))
    )
    refused(exported, tmp_path, model, r"input 'target_items' is not a tensor")


def test_missing_ctr_output_is_refused(exported: Path, tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["target_items"], ["score"], to=FLOAT)]
    model = model_of(nodes, outputs={"score": (FLOAT, ["N"])})
    refused(exported, tmp_path, model, r"has no output 'ctr' \(its outputs: \['score'\]\)")


def test_wrong_ctr_type_is_refused(exported: Path, tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["target_items"], ["ctr"], to=TensorProto.DOUBLE)]
    model = model_of(nodes, outputs={"ctr": (TensorProto.DOUBLE, ["N"])})
    refused(
        exported, tmp_path, model, r"output 'ctr' is float64 of rank 1, the contract is float32 of rank 1"
    )


def test_more_outputs_than_ctr_pass() -> None:
    nodes = [*cast_ctr(), helper.make_node("Identity", ["ctr"], ["logit"])]
    check_model(model_of(nodes, outputs={"ctr": (FLOAT, ["N"]), "logit": (FLOAT, ["N"])}).SerializeToString())


# ------------------------------------------------------------------------------------ malformed bytes


def test_empty_model_has_no_graph() -> None:
    with pytest.raises(BundleError, match=r"model\.onnx has no graph"):
        check_model(b"")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"garbage", "wire type 7"),
        (b"\x3a\xff\xff\xff\xff\x0f", "runs past the end"),  # graph: 4 GiB long
        (b"\x3a" + b"\x80" * 11, "varint longer than 10 bytes"),
        (b"\x3a\x80", "truncated varint"),
        (b"\x3b\x3c", "wire type 3"),  # a protobuf group
        (b"\x00\x00", "field number 0"),
        (b"\x38\x01", "field 7 should be length-delimited"),  # graph as a varint
        (b"\x3a\x00\x42\x03\x0a\x01\xff", "field 1 is not UTF-8"),  # opset_import domain
        (b"\x3a\x02\x0a\x01", "runs past the end"),  # the node inside the graph is cut short
        (b"\x09\x00\x00", "field 1 runs past the end"),  # a fixed64 cut short
    ],
)
def test_malformed_protobuf_is_refused_cleanly(exported: Path, tmp_path: Path, data: bytes, why: str) -> None:
    pattern = rf"model\.onnx cannot be loaded: not a valid ONNX model \(.*{why}.*\)"
    with pytest.raises(BundleError, match=pattern):
        load_bundle(with_model(exported, tmp_path, data))


def test_truncated_model_is_refused(exported: Path) -> None:
    data = (exported / "model.onnx").read_bytes()
    with pytest.raises(BundleError, match="not a valid ONNX model"):
        check_model(data[: len(data) // 2])


def test_damaged_models_never_escape_as_other_errors(exported: Path) -> None:
    """Random damage to a real model: BundleError or a pass, never any other exception."""
    data = (exported / "model.onnx").read_bytes()
    rng = np.random.default_rng(0)
    damage: list[Callable[[bytearray], bytearray]] = [
        lambda b: b[: rng.integers(0, len(b))],
        lambda b: b[rng.integers(0, len(b)) :],
    ]
    refusals: list[str] = []
    for _ in range(300):
        buf = bytearray(data)
        if rng.random() < 0.3:
            buf = damage[int(rng.integers(0, 2))](buf)
        else:
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
                buf[pos] = int(rng.integers(0, 256))
        try:
            check_model(bytes(buf))
        except BundleError as e:
            refusals.append(str(e))
    assert len(refusals) > 50  # most damage is caught (some lands in weights, which nothing checks)


# ------------------------------------------------------------------------------------ speed


def test_a_100_mb_model_is_checked_well_under_a_second() -> None:
    weight = numpy_helper.from_array(np.zeros(25 * 2**20, np.float32), "w")  # 100 MiB of raw_data
    data = model_of(cast_ctr(), initializers=[weight]).SerializeToString()
    assert len(data) > 100 * 2**20
    t0 = time.perf_counter()
    check_model(data)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.1, f"{elapsed:.3f}s"


# ------------------------------------------------------------------------------------ explain.onnx


def test_the_explaining_graph_is_checked_against_its_own_contract(exported: Path, tmp_path: Path) -> None:
    """explain.onnx is verified like model.onnx, with its three outputs; one that lacks `contribution`
    (here: model.onnx copied in its place) is refused, naming explain.onnx and the missing output."""
    bundle = load_bundle(exported)
    assert bundle.explain_bytes == (exported / "explain.onnx").read_bytes()
    path = tmp_path / "bundle"
    shutil.copytree(exported, path)
    shutil.copyfile(path / "model.onnx", path / "explain.onnx")
    set_files(path, {"explain.onnx": sha(path / "explain.onnx")})
    with pytest.raises(BundleError, match=r"explain\.onnx has no output 'contribution'"):
        load_bundle(path)
    (path / "explain.onnx").write_bytes(b"junk")
    set_files(path, {"explain.onnx": sha(path / "explain.onnx")})
    with pytest.raises(BundleError, match=r"explain\.onnx cannot be loaded"):
        load_bundle(path)


def test_a_bundle_exported_before_the_explaining_graph_loads_without_it(
    exported: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bundle"
    shutil.copytree(exported, path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["explain.onnx"], manifest["explain"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "explain.onnx").unlink()
    assert load_bundle(path).explain_bytes is None
