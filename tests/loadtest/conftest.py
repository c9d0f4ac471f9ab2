"""Fixtures for the load-test tests. `bundle` (a small exported DIN bundle, for the run against the
real app) is re-exported from tests/service/conftest.py: a conftest's fixtures only reach the tests
below it, and `pytest_plugins` is not allowed outside the root conftest. `redis_server` / `redis_url`
come from tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.vocab import RESERVED, write_vocab
from tests.service.conftest import bundle

__all__ = ["bundle", "items_bundle"]


@pytest.fixture
def items_bundle(tmp_path: Path) -> Path:
    """A bundle directory holding only items.txt as `din export` writes it: <pad>, <oov>, then i2..i39.
    Enough for the id sources, without exporting a model."""
    path = tmp_path / "items-bundle"
    path.mkdir()
    write_vocab(path / "items.txt", [*RESERVED, *(f"i{k}" for k in range(2, 40))])
    return path
