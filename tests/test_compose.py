"""docker-compose.yml: valid against the Compose Specification schema (vendored in tests/data), and the
things the deployment relies on: start order, health checks, persistence, profiles, the GPU device."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # The schema says draft 2019-09 (its "$schema" URI ends in "#", which jsonschema does not look up).
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def _errors(validator: jsonschema.protocols.Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_matches_the_compose_spec(compose: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    assert _errors(validator, compose) == []


def test_the_schema_catches_mistakes(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["ranker"]["depends_on"]["redis"]["condition"] = "service_ready"  # not a condition
    bad["services"]["redis"]["helthcheck"] = bad["services"]["redis"].pop("healthcheck")  # typo
    assert len(_errors(validator, bad)) >= 2


def test_ranker_starts_after_redis_and_bootstrap(compose: dict[str, Any]) -> None:
    for name in ("ranker", "ranker-gpu"):
        svc = compose["services"][name]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        assert svc["restart"] == "unless-stopped"
        assert svc["environment"]["DIN_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["environment"]["DIN_BUNDLE"] == "/models/bundle"
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert any(v.startswith("models:/models") and v.endswith(":ro") for v in svc["volumes"])
    assert compose["services"]["ranker"]["build"]["target"] == "serve"
    assert compose["services"]["ranker"]["ports"] == ["8000:8000"]


def test_redis_persists_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    image, tag = redis["image"].split(":")
    assert image == "redis" and tag[0].isdigit() and tag.count(".") == 2  # pinned, not :latest
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_bootstrap_is_a_one_shot_train_job(compose: dict[str, Any]) -> None:
    boot = compose["services"]["bootstrap"]
    assert boot["build"]["target"] == "train"
    assert boot["restart"] == "no"
    assert boot["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v.startswith("models:/models") and not v.endswith(":ro") for v in boot["volumes"])
    script = (ROOT / "docker" / "bootstrap.sh").read_text()
    assert "din demo --no-serve" in script and "--redis-url" in script
    assert (ROOT / "docker" / "bootstrap.sh").stat().st_mode & 0o111, "bootstrap.sh must be executable"


def test_profiles_for_gpu_and_loadtest(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["ranker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "serve-gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    lt = compose["services"]["loadtest"]
    assert lt["profiles"] == ["loadtest"]
    assert lt["entrypoint"] == ["din", "loadtest"]
    assert "--url=http://ranker:8000" in lt["command"]
    assert lt["depends_on"]["ranker"]["condition"] == "service_healthy"
    # Services outside a profile start with a plain `docker compose up`.
    assert {n for n, s in compose["services"].items() if "profiles" not in s} == {
        "redis",
        "bootstrap",
        "ranker",
    }
