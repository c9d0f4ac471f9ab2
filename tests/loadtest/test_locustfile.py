"""loadtest/locustfile.py without locust installed: it compiles."""

from __future__ import annotations

import py_compile
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def test_locustfile_compiles() -> None:
    py_compile.compile(str(LOCUSTFILE), doraise=True)
