"""Fixtures for the load-test tests: the service's exported test bundle, re-exported from
tests/service/conftest.py (a conftest's fixtures only reach tests below it, and `pytest_plugins` is
not allowed outside the root conftest). `redis_server` / `redis_url` come from tests/conftest.py."""

from __future__ import annotations

from tests.service.conftest import bundle

__all__ = ["bundle"]
