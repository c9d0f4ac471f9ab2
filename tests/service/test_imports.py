"""What importing the service costs: settings that start nothing, a server that never imports torch.

Each check runs in a fresh interpreter (this one has long since imported everything) and reads its
`sys.modules`."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_layout import ROOT


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` from the repository root."""
    report = "import json, sys, threading\nprint(json.dumps([sorted(sys.modules), threading.active_count()]))"
    probe = f"{code}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    modules, threads = json.loads(out.stdout.splitlines()[-1])
    assert threads == 1, "importing started a thread"
    return set(modules)


def test_importing_the_settings_starts_nothing_and_loads_no_c_library() -> None:
    modules = _modules_after("import service.config")
    assert "ctypes" not in modules  # the embedded redis-server manager loads libc through it
    assert "service.store.embedded" not in modules  # ... and registers an atexit hook
    assert "torch" not in modules


def test_the_redis_configuration_is_built_from_the_settings_in_one_place() -> None:
    built = {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8").count("RedisConfig(")
        for p in sorted((ROOT / "service").rglob("*.py"))
        if "RedisConfig(" in p.read_text(encoding="utf-8")
    }
    # Settings.redis; `din seed` builds its own from its flags (it has no Settings)
    assert built == {"service/config.py": 1, "service/store/seed.py": 2}


def test_the_service_imports_no_torch() -> None:
    # the whole app built (every route, the middleware, the schemas), as `din serve` builds it
    modules = _modules_after(
        "from service.app import create_app\n"
        "from service.config import Settings\n"
        "create_app(Settings(_env_file=None))"
    )
    assert "torch" not in modules and "onnx" not in modules
    assert "service.app" in modules and "contracts.bundle" in modules


def test_every_error_answers_a_status_from_the_service() -> None:
    from contracts import errors
    from service.errors import http_status

    tree = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DinError)]
    assert all(not hasattr(c, "status") for c in tree)  # HTTP-free codes; the statuses live in service/
    assert http_status(errors.Overloaded("x", reason="r")) == 503
    assert http_status(errors.CorsRefused("x")) == 400 and http_status(errors.InferenceFailed("x")) == 500
