"""docker-compose.yml: valid against the Compose Specification schema (vendored in tests/data), and the
things the deployment relies on: start order, health checks, persistence, profiles, the GPU device."""

from __future__ import annotations

import copy
import json
import re
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


def default_image(ref: str, variable: str) -> str:
    """`${VAR:-image:tag}` -> `image:tag`: every image is a variable with a public, pinned default."""
    m = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", ref)
    assert m and m.group(1) == variable, f"{ref}: not ${{{variable}:-...}}"
    return m.group(2)


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
    assert compose["services"]["ranker-gpu"]["ports"] == ["${DIN_GPU_PORT:-8001}:8000"]


def test_redis_persists_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    image, tag = default_image(redis["image"], "REDIS_IMAGE").split(":")
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
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    base = default_image(gpu["build"]["args"]["CUDA_IMAGE"], "CUDA_IMAGE")
    assert base.startswith("nvidia/cuda:") and "cudnn-runtime" in base
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    lt = compose["services"]["loadtest"]
    assert lt["profiles"] == ["loadtest"]
    assert lt["entrypoint"] == ["din", "loadtest"]
    assert "--url=http://lb:8000" in lt["command"]
    assert "lb" in lt["depends_on"]
    # Services outside a profile start with a plain `docker compose up`.
    assert {n for n, s in compose["services"].items() if "profiles" not in s} == {
        "redis",
        "bootstrap",
        "ranker",
        "lb",
    }


# ------------------------------------------------------------------ many replicas, Redis Cluster


def test_rankers_scale_behind_a_health_checking_load_balancer(compose: dict[str, Any]) -> None:
    cfg = (ROOT / "docker" / "haproxy.cfg").read_text()
    lbs = (
        ("ranker", "lb", "${DIN_LB_PORT:-8000}"),
        ("ranker-cluster", "lb-cluster", "${DIN_LB_CLUSTER_PORT:-8002}"),
    )
    for ranker, lb, port in lbs:
        svc = compose["services"][ranker]
        # `--scale` needs replicas without a fixed name or a published host port
        assert "container_name" not in svc and "ports" not in svc and svc["expose"] == ["8000"]
        balancer = compose["services"][lb]
        image, tag = default_image(balancer["image"], "HAPROXY_IMAGE").split(":")
        assert image == "haproxy" and re.match(r"\d+\.\d+\.\d+", tag), balancer["image"]  # official, pinned
        assert balancer["ports"] == [f"{port}:8000"]
        assert balancer["environment"]["RANKER_HOST"] == ranker
        assert balancer["depends_on"][ranker]["condition"] == "service_healthy"
        assert "./docker/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in balancer["volumes"]
    # every replica Docker's DNS returns is a server, checked on /readyz (draining replicas drop out)
    assert re.search(r'server-template \w+ 1-\d+ "\$\{RANKER_HOST\}":8000 check resolvers docker', cfg)
    assert "option httpchk GET /readyz" in cfg and "http-check expect status 200" in cfg
    assert "nameserver dns1 127.0.0.11:53" in cfg  # Docker's embedded DNS


def test_the_cluster_profile_is_three_masters_and_three_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = sorted(n for n in services if n.startswith("redis-node-"))
    assert len(nodes) == 6
    for name in nodes:
        node = services[name]
        assert node["profiles"] == ["cluster"] and node["image"] == services["redis"]["image"]
        assert "--cluster-enabled yes" in node["command"] and "--appendonly yes" in node["command"]
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
        assert node["hostname"] == name and node["volumes"][0].split(":")[0] in compose["volumes"]
    create = services["redis-cluster-create"]
    assert {n for n, d in create["depends_on"].items() if d["condition"] == "service_healthy"} == set(nodes)
    script = (ROOT / "docker" / "redis-cluster-create.sh").read_text()
    assert "redis-cli --cluster create" in script and "--cluster-replicas 1" in script
    assert all(n in script for n in nodes)
    boot = services["bootstrap-cluster"]
    assert boot["depends_on"]["redis-cluster-create"]["condition"] == "service_completed_successfully"
    assert boot["environment"]["DIN_REDIS_CLUSTER"] == "true"
    assert (
        '"${DIN_REDIS_CLUSTER:-false}" = "true" ] && cluster="--redis-cluster"'
        in (ROOT / "docker" / "bootstrap.sh").read_text()
    )
    ranker = services["ranker-cluster"]
    assert ranker["environment"]["DIN_REDIS_CLUSTER"] == "true"
    assert ranker["environment"]["DIN_REDIS_URL"].startswith("redis://redis-node-")
    assert ranker["depends_on"]["bootstrap-cluster"]["condition"] == "service_completed_successfully"
    assert all(services[n]["profiles"] == ["cluster"] for n in ("redis-cluster-create", "bootstrap-cluster",
                                                             "ranker-cluster", "lb-cluster"))  # fmt: skip


def test_images_and_indexes_are_variables_with_public_defaults(compose: dict[str, Any]) -> None:
    args = {}
    for name in ("bootstrap", "ranker", "bootstrap-cluster", "ranker-cluster"):
        args[name] = compose["services"][name]["build"]["args"]
        assert "dockerfile" not in compose["services"][name]["build"]  # the CPU Dockerfile
    assert all(a == args["ranker"] for a in args.values())
    assert default_image(args["ranker"]["PYTHON_IMAGE"], "PYTHON_IMAGE") == "python:3.11.11-slim-bookworm"
    assert args["ranker"]["PIP_INDEX_URL"] == "${PIP_INDEX_URL:-https://pypi.org/simple}"
    # `-`, not `:-`: TORCH_INDEX_URL= (empty) means the PIP_INDEX_URL mirror serves torch too
    assert args["ranker"]["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for arg in args["ranker"]:
        assert f"ARG {arg}=" in dockerfile, arg
    images = [s["image"] for s in compose["services"].values() if not s["image"].startswith("din-rank:")]
    assert all(i.startswith(("${REDIS_IMAGE:-", "${HAPROXY_IMAGE:-")) for i in images), images


def test_every_din_setting_compose_sets_is_a_setting(compose: dict[str, Any]) -> None:
    from service.config import Settings

    bootstrap_only = {"DIN_MODELS", "DIN_SYNTH_USERS", "DIN_SYNTH_ITEMS", "DIN_EPOCHS", "DIN_REDIS_CLUSTER"}
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for var in env:
            if not var.startswith("DIN_") or (name.startswith("bootstrap") and var in bootstrap_only):
                continue
            assert var.removeprefix("DIN_").lower() in Settings.model_fields, (name, var)
