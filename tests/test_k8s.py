"""deploy/k8s without a cluster: every manifest of the kustomization is valid against the Kubernetes
schemas in strict mode (kubernetes-validate, offline: unknown fields are errors too), and holds what
the service relies on: probes on /readyz and /healthz, a grace period that covers preStop, the drain
and uvicorn's graceful shutdown, settings that exist, the bundle delivered before the service starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # the dev extra installs it

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"  # the oldest Kubernetes the manifests are for (autoscaling/v2, policy/v1)
UVICORN_GRACEFUL_S = 10  # service/server.py: timeout_graceful_shutdown


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def docs(kustomization: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind -> the one manifest of that kind, over every resource the kustomization lists."""
    out: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']}s"
            out[doc["kind"]] = doc
    return out


def test_the_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_manifest_is_valid_in_strict_mode(docs: dict[str, dict[str, Any]]) -> None:
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    } <= set(docs)
    for doc in docs.values():
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_strict_validation_catches_mistakes(docs: dict[str, dict[str, Any]]) -> None:
    typo = copy.deepcopy(docs["Deployment"])
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # an unknown field
    wrong = copy.deepcopy(docs["HorizontalPodAutoscaler"])
    wrong["spec"]["minReplicas"] = "three"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSION, strict=True)


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_point_at_the_right_paths_and_port(docs: dict[str, dict[str, Any]]) -> None:
    c = _container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"  # never /readyz: Redis down is no restart
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    config = docs["ConfigMap"]["data"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port[c[probe]["httpGet"]["port"]] == int(config["DIN_PORT"])
    assert config["DIN_HOST"] == "0.0.0.0"
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def test_the_grace_period_covers_prestop_the_drain_and_the_graceful_shutdown(
    docs: dict[str, dict[str, Any]],
) -> None:
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    command = _container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(docs["ConfigMap"]["data"]["DIN_SHUTDOWN_DRAIN_S"])
    assert drain > 0
    # the readiness probe sees /readyz fail within the drain: the pod leaves the endpoints in time
    probe = _container(docs)["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= drain
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + UVICORN_GRACEFUL_S


def test_settings_named_in_the_manifests_exist(docs: dict[str, dict[str, Any]]) -> None:
    names = [k for k in docs["ConfigMap"]["data"] if k.startswith("DIN_")]
    names += [e["name"] for e in _container(docs).get("env", [])]
    names += list(docs["Secret"]["stringData"])
    assert "DIN_REDIS_CLUSTER" in names and "DIN_API_KEYS" in names
    unknown = [n for n in names if n.removeprefix("DIN_").lower() not in Settings.model_fields]
    assert not unknown, unknown
    # and their values are ones Settings accepts
    values = {k: v for k, v in docs["ConfigMap"]["data"].items() if k.startswith("DIN_")}
    Settings(_env_file=None, **{k.removeprefix("DIN_").lower(): v for k, v in values.items()})  # type: ignore[call-arg]


def test_resources_threads_bundle_and_scaling(docs: dict[str, dict[str, Any]]) -> None:
    c = _container(docs)
    res = c["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS: the capacity plan's whole cores
    data = docs["ConfigMap"]["data"]  # the cores ONNX Runtime uses are the CPU limit's
    assert int(data["DIN_INFERENCE_WORKERS"]) * int(data["DIN_INTRA_OP_THREADS"]) == int(res["limits"]["cpu"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    bundle = docs["ConfigMap"]["data"]["DIN_BUNDLE"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert bundle.startswith(mounts["models"]["mountPath"]) and mounts["models"]["readOnly"]
    assert any(m["name"] == "models" for m in init["volumeMounts"]) and "manifest.json" in " ".join(
        init["args"]
    )
    labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert (
        docs["Service"]["spec"]["selector"]
        == labels
        == docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    )
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_the_redis_example_is_an_operator_managed_cluster() -> None:
    (doc,) = yaml.safe_load_all((K8S / "redis-cluster" / "redis-cluster.yaml").read_text())
    assert doc["kind"] == "RedisCluster" and doc["apiVersion"].startswith("redis.redis.opstreelabs.in/")
    assert doc["spec"]["clusterSize"] == 3 and doc["spec"]["redisFollower"]["replicas"] == 3
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert config["DIN_REDIS_URL"].startswith(f"redis://{doc['metadata']['name']}-leader:")
