"""The model set over real HTTP: /models, /readyz and the metrics speak per member (today one,
`default`), beside the single-model fields and metrics they always had; a reload moves the member."""

from __future__ import annotations

from tests.service.conftest import BundleInfo, LiveServer, make_settings, metric_value


def test_the_model_set_is_reported_per_member(
    bundle: BundleInfo, bundle_v2: BundleInfo, redis_url: str
) -> None:
    with LiveServer(make_settings(bundle.path, redis_url)) as server, server.client() as c:
        server.wait_ready()
        ready = c.get("/readyz").json()
        assert ready["model_version"] == "test-v1" and ready["models"] == {"default": "test-v1"}
        models = c.get("/models").json()
        assert models["default"] == "default" and list(models["models"]) == ["default"]
        member = models["models"]["default"]
        assert member["model_version"] == "test-v1" and member["bundle"] == str(bundle.path)
        assert member["max_history"] == bundle.manifest["max_history"] and member["can_explain"] is True

        r = c.post("/rank", json={"user_id": "u", "candidates": ["i2", "i3"], "history": ["i4"]})
        assert r.status_code == 200 and r.json()["model_version"] == "test-v1"
        text = c.get("/metrics").text
        info = {"model": "default", "model_version": "test-v1"}
        assert metric_value(text, "din_models_info", info) == 1
        assert metric_value(text, "din_model_batches_total", info) >= 1
        assert metric_value(text, "din_model_info", {"model_version": "test-v1"}) == 1  # as it always was

        assert c.post("/admin/reload", json={"bundle": str(bundle_v2.path)}).status_code == 200
        assert c.get("/readyz").json()["models"] == {"default": "test-v2"}
        assert c.get("/models").json()["models"]["default"]["model_version"] == "test-v2"
        text = c.get("/metrics").text
        assert metric_value(text, "din_models_info", {"model": "default", "model_version": "test-v2"}) == 1
        assert metric_value(text, "din_model_info", {"model_version": "test-v2"}) == 1
