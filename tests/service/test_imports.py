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
