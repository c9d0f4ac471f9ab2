"""The layout's promises, checked on the source: what the server imports, and facts written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "model", "service", "cli", "demo", "loadtest", "loop")


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level module names `path` imports, anywhere in the file (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_server_imports_no_client_plotting_load_generation_or_torch() -> None:
    forbidden = {
        "httpx",
        "requests",
        "aiohttp",
        "urllib3",
        "matplotlib",
        "locust",
        "loadtest",
        "loop",
        "pyarrow",
        "demo",
        "torch",
    }
    found = {str(p.relative_to(ROOT)): _imports(p) & forbidden for p in _sources("service")}
    assert not {k: v for k, v in found.items() if v}


def test_the_model_side_never_imports_the_server_or_the_tools() -> None:
    found = {
        str(p.relative_to(ROOT)): _imports(p) & {"service", "cli", "demo", "loadtest", "loop"}
        for p in _sources("model")
    }
    assert not {k: v for k, v in found.items() if v}


def test_the_redis_key_layout_is_written_once() -> None:
    # code that builds a history key, i.e. the f-string or concatenation, not prose in help texts
    pattern = re.compile(r"""f["'][^"'\n]*\{[^}]*\}hist:|["']hist:["']""")
    writers = [
        str(p.relative_to(ROOT)) for pkg in PACKAGES for p in _sources(pkg) if pattern.search(p.read_text())
    ]
    assert writers == ["service/store/keys.py"]


def _spells_reserved(path: Path) -> bool:
    """A "<pad>" / "<oov>" string in code, or a vocabulary sliced past its reserved rows ([2:])."""
    text = path.read_text(encoding="utf-8")
    reserved = any(
        isinstance(n, ast.Constant) and n.value in ("<pad>", "<oov>") for n in ast.walk(ast.parse(text))
    )
    return reserved or re.search(r"(vocab|items\.txt\W*)\)?\s*\[2:\]", text) is not None


def test_the_reserved_vocabulary_rows_are_known_in_one_place() -> None:
    spelled = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in _sources(pkg) if _spells_reserved(p)]
    assert spelled == ["contracts/vocab.py"]


def test_only_settings_reads_the_environment_in_the_server() -> None:
    readers = [str(p.relative_to(ROOT)) for p in _sources("service") if "os.environ" in p.read_text()]
    assert readers == []


def test_the_deadline_rule_is_written_once() -> None:
    # a request's deadline counts from its arrival: service.log.request_deadline, asked by the
    # AdmissionGate and /rank alike
    readers = [
        str(p.relative_to(ROOT)) for p in _sources("service") if "request_started.get(" in p.read_text()
    ]
    assert readers == ["service/log.py"]


def _names(path: Path) -> set[str]:
    """Every identifier `path` binds or reads, attributes included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return names | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_the_contracts_are_torch_free_and_import_only_each_other() -> None:
    found = {
        str(p.relative_to(ROOT)): _imports(p)
        & {"torch", "onnx", "model", "service", "cli", "demo", "loadtest", "loop", "pyarrow"}
        for p in _sources("contracts")
    }
    assert not {k: v for k, v in found.items() if v}


def test_nothing_under_model_or_contracts_names_an_http_status() -> None:
    http = {"http", "fastapi", "starlette", "uvicorn"}
    for path in _sources("model") + _sources("contracts"):
        where = str(path.relative_to(ROOT))
        assert not _imports(path) & http, where
        assert not _names(path) & {"status", "status_code", "HTTPStatus", "headers"}, where
    # the tree's docstring lists codes, not statuses: the statuses are service/errors.py's
    assert not re.search(r"\b[45]\d\d\b", (ROOT / "contracts" / "errors.py").read_text())


def test_neither_half_of_the_batcher_is_a_class_longer_than_200_lines() -> None:
    for module in ("service/batcher.py", "service/rank_queue.py", "service/inference.py"):
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                assert length <= 200, f"{module}: class {node.name} is {length} lines"
