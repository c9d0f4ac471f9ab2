"""The bundle contract shared by `din export` (writes it) and the service (reads it): the format
version, the serving graph's inputs and outputs (and the explaining graph's), the checksums, and
`load_bundle`, which verifies a bundle before anything serves it. No torch and no onnx here: the
serving image imports this module, so model.onnx is checked with a small protobuf reader of its own
(the end of this module)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from contracts.errors import BundleError
from contracts.vocab import OOV, PAD, Vocab, read_vocab

FORMAT_VERSION = 1
# Serving-graph inputs and output with their symbolic dimensions (N candidates, U users, T history).
INPUTS: dict[str, list[str]] = {
    "target_items": ["N"],
    "target_user": ["N"],
    "hist_items": ["U", "T"],
    "hist_len": ["U"],
}
OUTPUTS: dict[str, list[str]] = {"ctr": ["N"]}
# Outputs a bundle may have (bundles exported before them lack them, and still serve): the attention
# weight of every behaviour for every candidate, what `/rank`'s `explain` reads.
OPTIONAL_OUTPUTS: dict[str, list[str]] = {"attention": ["N", "T"]}
ATTENTION_OUTPUT = "attention"
# The explaining graph (`DIN.serve_contributions`), an optional file beside model.onnx: the same inputs,
# run only on the items an explained request returns. ONNX Runtime runs every node of a graph whatever
# outputs are asked for, so these outputs cannot live in model.onnx without costing every request.
# Bundles exported before it lack it, serve, and cannot explain.
EXPLAIN_GRAPH = "explain.onnx"
CONTRIBUTION_OUTPUT = "contribution"
EXPLAIN_OUTPUTS: dict[str, list[str]] = {"ctr": ["N"], "attention": ["N", "T"], "contribution": ["N", "T"]}
# The int8 variant of model.onnx (model.quantize), an optional file: the same contract, written by
# `din export` only when it passed the quality gate (its figures: manifest["precision"]["int8"]).
INT8_GRAPH = "model.int8.onnx"
# An optional file (bundles exported before it lack it): line i is the category id of item index i.
# For people (the ranking explorer labels behaviours with it); the graph holds its own item -> category table.
ITEM_CATEGORIES = "item_categories.txt"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a renamed file or bundle is whole after a power
    loss): the bundle writer's and the log export's durability rule, written once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, manifest and item vocabulary, and the graph's bytes as they
    were verified (a session is built from these, so a file swapped in after the check never runs)."""

    path: Path
    manifest: dict[str, Any]
    vocab: Vocab
    graph_bytes: bytes = field(repr=False, compare=False)
    item_categories: list[str] | None = field(default=None, repr=False, compare=False)  # per item index
    explain_bytes: bytes | None = field(default=None, repr=False, compare=False)  # explain.onnx, if any
    int8_bytes: bytes | None = field(default=None, repr=False, compare=False)  # model.int8.onnx, if any

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
    """Read manifest.json, verify the sha256 of every file it lists, check model.onnx (and
    explain.onnx and model.int8.onnx, when the manifest lists them), read the item vocabulary.

    Every file the manifest lists must lie inside the bundle directory (checked before any is read).
    model.onnx must be self-contained (no external data), use only operators ONNX Runtime has built
    in (or functions defined in the model itself) and have the contract's inputs and output.
    Raises BundleError naming the file and the reason on anything missing, corrupt, inconsistent
    or refused.
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
    for name in files:  # before anything is read: a name must not reach outside the bundle
        why = _outside(path, name)
        if why:
            raise BundleError(
                f"bundle {path}: manifest.json lists {name!r}, which {why}; "
                "a bundle's files must lie inside its directory"
            )
    graphs: dict[str, bytes] = {}
    for name, want in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"bundle {path}: {name} is missing")
        if name in ("model.onnx", EXPLAIN_GRAPH, INT8_GRAPH):  # hashed and checked from the same bytes
            if fpath.stat().st_size > _MAX_PROTOBUF:
                raise BundleError(f"bundle {path}: {name} is over 2 GiB, more than protobuf can hold")
            graphs[name] = fpath.read_bytes()
            got = hashlib.sha256(graphs[name]).hexdigest()
        else:
            got = sha256_file(fpath)
        if got != want:
            raise BundleError(
                f"bundle {path}: checksum mismatch for {name} (sha256 {got[:12]}..., "
                f"manifest says {str(want)[:12]}...): the file is corrupt or was changed after export"
            )
    graph, explain, int8 = graphs["model.onnx"], graphs.get(EXPLAIN_GRAPH), graphs.get(INT8_GRAPH)
    try:
        check_model(graph)
        if int8 is not None:
            check_model(int8, name=INT8_GRAPH)
        if explain is not None:
            check_model(explain, name=EXPLAIN_GRAPH, outputs=EXPLAIN_OUTPUTS, optional={})
    except BundleError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    items = read_vocab(path / "items.txt")
    n_items = manifest.get("vocab", {}).get("items")
    if n_items is not None and n_items != len(items):
        raise BundleError(f"bundle {path}: items.txt has {len(items)} ids, manifest says {n_items}")
    item_categories = None
    if ITEM_CATEGORIES in files:
        item_categories = read_vocab(path / ITEM_CATEGORIES)
        if len(item_categories) != len(items):
            raise BundleError(
                f"bundle {path}: {ITEM_CATEGORIES} has {len(item_categories)} lines, items.txt {len(items)}"
            )
    return Bundle(
        path=path,
        manifest=manifest,
        vocab=Vocab(items),
        graph_bytes=graph,
        item_categories=item_categories,
        explain_bytes=explain,
        int8_bytes=int8,
    )


def _outside(root: Path, name: object) -> str | None:
    """Why a manifest file name would leave the bundle directory `root`, or None when it stays in."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "is not a file name"
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute():
        return "is an absolute path"
    if ".." in parts:
        return "has a '..' part"
    if not parts:
        return "is not a file name"
    try:  # symlinks followed, the bundle directory's own included
        base, resolved = root.resolve(), (root / name).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        return f"cannot be resolved ({e})"
    if resolved == base or not resolved.is_relative_to(base):
        return f"resolves to {resolved}, outside the bundle directory"
    return None


# ---------------------------------------------------------------------------------------- model.onnx
#
# The serving image has no `onnx` package, so model.onnx is read here at the protobuf wire level:
# only the fields of onnx.proto the checks need, everything else skipped. Length-delimited fields
# are memoryview slices of the file, so tensor payloads (raw_data) are stepped over, never copied.

# Operator domains ONNX Runtime runs with no custom-op library: ONNX ("" and its alias "ai.onnx"),
# ONNX-ML ("ai.onnx.ml") and Microsoft's contrib ops ("com.microsoft"), the domains every standard
# ONNX Runtime build registers kernels for. Not "ai.onnx.preview.training" (kernels only in training
# builds), nor ORT's internal layout domains ("com.microsoft.nchwc", "com.ms.internal.nhwc"), which
# ORT's own optimizer inserts into a graph after loading it. Anything else needs code from outside
# ONNX Runtime (a custom-op library), which the service never loads.
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

_MAX_PROTOBUF = 2**31 - 1  # bytes: the most one protobuf message (so one model.onnx) can hold
_MAX_NESTING = 32  # subgraphs in subgraphs (If/Loop/Scan bodies): far more than a real model has


# onnx.proto field numbers (published numbers never change), per message.
class _Model:
    GRAPH, OPSET_IMPORT, TRAINING_INFO, FUNCTIONS = 7, 8, 20, 25


class _OpsetId:
    DOMAIN = 1


class _TrainingInfo:
    INITIALIZATION, ALGORITHM = 1, 2


class _Function:
    NAME, NODE, OPSET_IMPORT, DOMAIN, ATTRIBUTE_PROTO, OVERLOAD = 1, 7, 9, 10, 11, 13


class _Graph:
    NODE, INITIALIZER, INPUT, OUTPUT, SPARSE_INITIALIZER = 1, 5, 11, 12, 15


class _Node:
    NAME, OP_TYPE, ATTRIBUTE, DOMAIN, OVERLOAD = 3, 4, 5, 7, 8


class _Attribute:
    NAME, T, G, TENSORS, GRAPHS, SPARSE_TENSOR, SPARSE_TENSORS = 1, 5, 6, 10, 11, 22, 23


class _Tensor:
    NAME, EXTERNAL_DATA, DATA_LOCATION = 8, 13, 14
    DEFAULT = 0  # DataLocation: the data is in the tensor itself (EXTERNAL = 1: in another file)


class _SparseTensor:
    VALUES, INDICES = 1, 2


class _ValueInfo:
    NAME, TYPE = 1, 2


class _Type:
    TENSOR_TYPE = 1  # TypeProto.tensor_type; Tensor: elem_type 1, shape 2; TensorShapeProto: dim 1
    ELEM_TYPE, SHAPE, DIM = 1, 2, 1
    FLOAT, INT64 = 1, 7  # TensorProto.DataType


_DTYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 8: "string", 9: "bool"}
_DTYPE_NAMES |= {10: "float16", 11: "float64", 16: "bfloat16"}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types (3 and 4, groups, are not used by ONNX)


class _Malformed(Exception):
    """The bytes are not a protobuf ModelProto."""


class _Refused(Exception):
    """A well-formed model that breaks a rule; the message completes "model.onnx ..." (or its name)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at buf[pos:] and the position after it."""
    value = shift = 0
    while shift < 70:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Malformed("varint longer than 10 bytes")


def _wire_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of one message: an int for a varint, a slice for a
    length-delimited field; fixed-width values (floats, doubles) are skipped, as 0."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        value: int | memoryview
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if size > end - pos:
                raise _Malformed(f"field {number} runs past the end of its message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (_I64, _I32):
            value, pos = 0, pos + (8 if wire == _I64 else 4)
            if pos > end:
                raise _Malformed(f"field {number} runs past the end of its message")
        else:
            raise _Malformed(f"wire type {wire} (field {number})")
        yield number, value


class _Message:
    """One protobuf message, its fields decoded one level deep. Several chunks are merged as protobuf
    merges a singular message field that occurs more than once: repeated fields add up, the last
    scalar wins."""

    def __init__(self, *chunks: memoryview) -> None:
        self.fields: dict[int, list[int | memoryview]] = {}
        for chunk in chunks:
            for number, value in _wire_fields(chunk):
                self.fields.setdefault(number, []).append(value)

    def has(self, number: int) -> bool:
        return number in self.fields

    def _chunks(self, number: int) -> list[memoryview]:
        values = self.fields.get(number, [])
        if not all(isinstance(v, memoryview) for v in values):
            raise _Malformed(f"field {number} should be length-delimited")
        return values  # type: ignore[return-value]

    def messages(self, number: int) -> list[_Message]:
        """A repeated message field."""
        return [_Message(chunk) for chunk in self._chunks(number)]

    def message(self, number: int) -> _Message:
        """A singular message field (empty when absent)."""
        return _Message(*self._chunks(number))

    def string(self, number: int) -> str:
        chunks = self._chunks(number)
        try:
            return str(chunks[-1], "utf-8") if chunks else ""
        except UnicodeDecodeError:
            raise _Malformed(f"field {number} is not UTF-8") from None

    def integer(self, number: int) -> int:
        values = self.fields.get(number, [0])
        if not isinstance(values[-1], int):
            raise _Malformed(f"field {number} should be a varint")
        return values[-1]


def check_model(
    data: bytes,
    *,
    name: str = "model.onnx",
    outputs: dict[str, list[str]] = OUTPUTS,
    optional: dict[str, list[str]] = OPTIONAL_OUTPUTS,
) -> None:
    """Check the bytes of a graph (model.onnx; explain.onnx with EXPLAIN_OUTPUTS): self-contained,
    built-in operators only, the contract's inputs and outputs. Raises BundleError("<name> ...")."""
    try:
        _check_model(data, outputs, optional)
    except _Malformed as e:
        raise BundleError(f"{name} cannot be loaded: not a valid ONNX model ({e})") from None
    except _Refused as e:
        raise BundleError(f"{name} {e}") from None


def _check_model(data: bytes, outputs: dict[str, list[str]], optional: dict[str, list[str]]) -> None:
    model = _Message(memoryview(data))
    if not model.has(_Model.GRAPH):
        raise _Refused("has no graph")
    functions = model.messages(_Model.FUNCTIONS)
    local = {
        (f.string(_Function.DOMAIN), f.string(_Function.NAME), f.string(_Function.OVERLOAD))
        for f in functions
    }
    _check_opsets(model.messages(_Model.OPSET_IMPORT), local, "")
    graph = model.message(_Model.GRAPH)
    _check_interface(graph, outputs, optional)
    _check_graph(graph, local, "", 0)
    for f in functions:
        where = f" in function {f.string(_Function.DOMAIN)}::{f.string(_Function.NAME)}"
        _check_opsets(f.messages(_Function.OPSET_IMPORT), local, where)
        for node in f.messages(_Function.NODE):
            _check_node(node, local, where, 0)
        for attribute in f.messages(_Function.ATTRIBUTE_PROTO):  # defaults of the function's attributes
            _check_attribute(attribute, local, where, 0)
    for info in model.messages(_Model.TRAINING_INFO):
        for number in (_TrainingInfo.INITIALIZATION, _TrainingInfo.ALGORITHM):
            _check_graph(info.message(number), local, " in training_info", 0)


def _check_opsets(opsets: list[_Message], local: set[tuple[str, str, str]], where: str) -> None:
    own = {domain for domain, _, _ in local}
    for opset in opsets:
        domain = opset.string(_OpsetId.DOMAIN)
        if domain not in BUILTIN_DOMAINS and domain not in own:
            raise _Refused(
                f"imports operator set {domain!r}{where}, which ONNX Runtime does not have built in "
                f"(allowed: {sorted(BUILTIN_DOMAINS)} and the model's own functions)"
            )


def _check_graph(graph: _Message, local: set[tuple[str, str, str]], where: str, depth: int) -> None:
    if depth > _MAX_NESTING:
        raise _Refused(f"nests subgraphs more than {_MAX_NESTING} deep{where}")
    for tensor in graph.messages(_Graph.INITIALIZER):
        _check_tensor(tensor, "initializer", where)
    for sparse in graph.messages(_Graph.SPARSE_INITIALIZER):
        _check_sparse(sparse, "sparse initializer", where)
    for node in graph.messages(_Graph.NODE):
        _check_node(node, local, where, depth)


def _check_node(node: _Message, local: set[tuple[str, str, str]], where: str, depth: int) -> None:
    domain, op = node.string(_Node.DOMAIN), node.string(_Node.OP_TYPE)
    if domain not in BUILTIN_DOMAINS and (domain, op, node.string(_Node.OVERLOAD)) not in local:
        raise _Refused(
            f"node {node.string(_Node.NAME)!r}{where} runs operator {op!r} of domain {domain!r}, which "
            f"ONNX Runtime does not have built in (allowed: {sorted(BUILTIN_DOMAINS)} and the model's "
            "own functions)"
        )
    of_node = f" of node {node.string(_Node.NAME) or op!r}{where}"
    for attribute in node.messages(_Node.ATTRIBUTE):
        _check_attribute(attribute, local, of_node, depth)


def _check_attribute(attribute: _Message, local: set[tuple[str, str, str]], where: str, depth: int) -> None:
    where = f" in attribute {attribute.string(_Attribute.NAME)!r}{where}"
    for number in (_Attribute.T, _Attribute.TENSORS):
        for tensor in attribute.messages(number):
            _check_tensor(tensor, "tensor", where)
    for number in (_Attribute.SPARSE_TENSOR, _Attribute.SPARSE_TENSORS):
        for sparse in attribute.messages(number):
            _check_sparse(sparse, "sparse tensor", where)
    for number in (_Attribute.G, _Attribute.GRAPHS):  # If/Loop/Scan bodies, and any other subgraph
        for graph in attribute.messages(number):
            _check_graph(graph, local, where, depth + 1)


def _check_sparse(sparse: _Message, kind: str, where: str) -> None:
    for number in (_SparseTensor.VALUES, _SparseTensor.INDICES):
        if sparse.has(number):
            _check_tensor(sparse.message(number), kind, where)


def _check_tensor(tensor: _Message, kind: str, where: str) -> None:
    if tensor.has(_Tensor.EXTERNAL_DATA) or tensor.integer(_Tensor.DATA_LOCATION) != _Tensor.DEFAULT:
        raise _Refused(
            f"{kind} {tensor.string(_Tensor.NAME)!r}{where} keeps its data in another file "
            "(external data); a bundle's graph must be self-contained"
        )


def _tensor_type(value: _Message) -> tuple[int, int | None] | None:
    """(elem_type, rank or None when the shape is unknown) of a tensor value; None for other types."""
    type_ = value.message(_ValueInfo.TYPE)
    if not type_.has(_Type.TENSOR_TYPE):
        return None
    tensor = type_.message(_Type.TENSOR_TYPE)
    rank = len(tensor.message(_Type.SHAPE).messages(_Type.DIM)) if tensor.has(_Type.SHAPE) else None
    return tensor.integer(_Type.ELEM_TYPE), rank


def _describe(found: tuple[int, int | None] | None) -> str:
    if found is None:
        return "not a tensor"
    elem, rank = found
    dtype = _DTYPE_NAMES.get(elem, f"data type {elem}")
    return f"{dtype} of unknown rank" if rank is None else f"{dtype} of rank {rank}"


def _check_interface(graph: _Message, required: dict[str, list[str]], optional: dict[str, list[str]]) -> None:
    """Inputs exactly INPUTS (int64, their ranks); outputs include `required` (float32, their ranks),
    and `optional`, where present, are float32 of their ranks."""
    inputs = graph.messages(_Graph.INPUT)
    names = [value.string(_ValueInfo.NAME) for value in inputs]
    if sorted(names) != sorted(INPUTS):
        raise _Refused(f"has inputs {names}, the contract is {list(INPUTS)}")
    outputs = {value.string(_ValueInfo.NAME): value for value in graph.messages(_Graph.OUTPUT)}
    missing = [name for name in required if name not in outputs]
    if missing:
        raise _Refused(f"has no output {missing[0]!r} (its outputs: {list(outputs)})")
    wanted = [(n, "input", _Type.INT64, INPUTS[n], v) for n, v in zip(names, inputs, strict=True)]
    wanted += [(n, "output", _Type.FLOAT, dims, outputs[n]) for n, dims in required.items()]
    wanted += [(n, "output", _Type.FLOAT, d, outputs[n]) for n, d in optional.items() if n in outputs]
    for name, kind, elem, dims, value in wanted:
        found = _tensor_type(value)
        if found != (elem, len(dims)):
            raise _Refused(
                f"{kind} {name!r} is {_describe(found)}, the contract is {_describe((elem, len(dims)))}"
            )
