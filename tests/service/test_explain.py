"""`/rank` with `explain`, over real HTTP against real ONNX Runtime and a real redis-server: every `because`
weight is the PyTorch reference's (`DIN.attention`) at that position, the listed behaviours are the
top-weighted ones, explain_top is bounded, degraded answers explain nothing and say so, and a bundle
exported before the attention output still serves but answers `explain` with 422 cannot_explain.
The ranking explorer's endpoints (/ui, /ui/suggestions, /ui/items) and the offline docs assets too."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.bundle import ATTENTION_OUTPUT, ITEM_CATEGORIES, load_bundle
from model.errors import CannotExplain
from model.vocab import Vocab
from service.ranker import Ranker
from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, LiveServer, make_settings, seed_histories

TOL = 1e-5
T = 20  # the test bundle's max_history


def reference_attention(bundle: BundleInfo, candidates: list[str], history: list[str]) -> np.ndarray:
    """DIN.attention (the paper's tiled form) for each candidate: (n, len(history cut to T))."""
    vocab = Vocab(bundle.items)
    hist = vocab.lookup(history[:T]).tolist()
    n = len(candidates)
    h = torch.zeros((n, max(1, len(hist))), dtype=torch.int64)
    if hist:
        h[:, : len(hist)] = torch.tensor(hist, dtype=torch.int64)
    with torch.no_grad():
        att = bundle.model.attention(
            torch.from_numpy(vocab.lookup(candidates)), h, torch.full((n,), len(hist), dtype=torch.int64)
        )
    return att[:, : len(hist)].numpy()


def assert_explained(
    bundle: BundleInfo, body: dict, candidates: list[str], history: list[str], top: int
) -> None:
    """Each item's `because` is the top `top` behaviours of the reference, with its weights to 1e-5."""
    seen = history[:T]
    assert body["explained"] is True and "explain_note" not in body
    assert body["history_length"] == len(seen)
    ref = dict(zip(candidates, reference_attention(bundle, candidates, history), strict=True))
    for item in body["items"]:
        weights = ref[item["item_id"]]
        because = item["because"]
        assert len(because) == min(top, len(seen))
        listed = [b["weight"] for b in because]
        assert listed == sorted(listed, reverse=True)
        assert len({b["position"] for b in because}) == len(because)
        for b in because:
            assert b["item_id"] == seen[b["position"]]
            assert abs(b["weight"] - float(weights[b["position"]])) <= TOL, (item["item_id"], b)
        # the listed ones are the top-weighted: nothing left out weighs more than the last listed
        left_out = np.delete(weights, [b["position"] for b in because])
        if because and left_out.size:
            assert float(left_out.max()) <= because[-1]["weight"] + TOL


@pytest.fixture(scope="module")
def server(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    with LiveServer(make_settings(bundle.path, redis_server.url, max_explain_top=30)) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def old_bundle(bundle: BundleInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle as `din export` wrote it before the attention output: model.onnx with `ctr` alone."""
    path = tmp_path_factory.mktemp("old") / "bundle"
    shutil.copytree(bundle.path, path)
    proto = onnx.load(str(path / "model.onnx"))
    kept = [o for o in proto.graph.output if o.name != ATTENTION_OUTPUT]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(path / "model.onnx"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["outputs"] = {"ctr": ["N"]}
    manifest["files"]["model.onnx"] = hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


# ------------------------------------------------------------------ the ranker


def test_ranker_attention_equals_the_reference_in_a_mixed_batch(bundle: BundleInfo) -> None:
    ranker = Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"])
    assert ranker.can_explain
    rng = np.random.default_rng(11)
    known = bundle.items[2:]
    rows = [
        ([*rng.choice(known, size=n).tolist(), "unknown"], rng.choice(known, size=h).tolist())
        for n, h in [(5, 0), (1, 1), (40, 7), (100, 20), (3, 35)]  # 35 > T: cut to the newest 20
    ]
    explained = ranker.score_batch(rows, explain=True)
    plain = ranker.score_batch(rows)
    for (cands, hist), e, p in zip(rows, explained, plain, strict=True):
        assert p.attention is None
        np.testing.assert_array_equal(e.scores, p.scores)  # asking for the weights changes no score
        assert e.attention is not None and e.attention.shape == (len(cands), min(len(hist), T))
        np.testing.assert_allclose(e.attention, reference_attention(bundle, cands, hist), atol=TOL, rtol=0)
        np.testing.assert_allclose(p.scores, bundle.reference(cands, hist), atol=TOL, rtol=0)


def test_a_bundle_without_the_attention_output_serves_but_cannot_explain(
    bundle: BundleInfo, old_bundle: Path
) -> None:
    old = Ranker(load_bundle(old_bundle), providers=["CPUExecutionProvider"])
    assert not old.can_explain
    rows = [(["i2", "i3", "i4"], ["i5", "i6"])]
    np.testing.assert_allclose(old.score_batch(rows)[0].scores, bundle.reference(*rows[0]), atol=TOL, rtol=0)
    with pytest.raises(CannotExplain, match="re-export"):
        old.score_batch(rows, explain=True)


# ------------------------------------------------------------------ over HTTP


def test_explain_with_redis_histories_equals_the_reference(
    server: LiveServer, bundle: BundleInfo, redis_server: EmbeddedRedis
) -> None:
    histories = {
        "ex-long": [f"i{k}" for k in range(30, 60)],  # longer than T: Redis keeps 20
        "ex-short": ["i5", "i7", "i9"],
        "ex-unknown": ["i100", "never-seen", "i200", "i100"],  # an OOV behaviour and a repeated one
    }
    seed_histories(redis_server.url, histories)
    candidates = [f"i{k}" for k in range(2, 60)] + ["unknown-candidate"]
    with server.client() as c:
        for user, hist in histories.items():
            for top in (1, 5, 30):
                resp = c.post(
                    "/rank",
                    json={"user_id": user, "candidates": candidates, "explain": True, "explain_top": top},
                )
                assert resp.status_code == 200, resp.text
                assert_explained(bundle, resp.json(), candidates, hist[:T], top)
            plain = c.post("/rank", json={"user_id": user, "candidates": candidates}).json()
            assert all("because" not in i for i in plain["items"]) and "explained" not in plain
            explained = c.post(
                "/rank", json={"user_id": user, "candidates": candidates, "explain": True}
            ).json()
            assert plain["items"] == [{k: i[k] for k in ("item_id", "score")} for i in explained["items"]]
            assert all(len(i["because"]) == min(5, len(hist)) for i in explained["items"])  # default 5


def test_explain_with_an_explicit_history_and_top_k(server: LiveServer, bundle: BundleInfo) -> None:
    history = [f"i{k}" for k in (90, 91, 12, 250, 7, 7, 33)] + ["nope"] + [f"i{k}" for k in range(100, 120)]
    candidates = ["i3", "i90", "i250", "i17", "zzz"]
    with server.client() as c:
        body = c.post(
            "/rank",
            json={
                "user_id": "anyone",
                "candidates": candidates,
                "history": history,
                "explain": True,
                "explain_top": 30,
                "top_k": 3,
            },
        ).json()
    assert len(body["items"]) == 3
    assert_explained(bundle, body, candidates, history, 30)


def test_cold_start_explains_with_no_behaviour(server: LiveServer) -> None:
    with server.client() as c:
        body = c.post(
            "/rank", json={"user_id": "nobody-at-all", "candidates": ["i2", "i3"], "explain": True}
        ).json()
    assert body["explained"] is True and body["history_length"] == 0
    assert [i["because"] for i in body["items"]] == [[], []]


def test_concurrent_requests_with_and_without_explain_share_batches(
    bundle: BundleInfo, redis_url: str
) -> None:
    """Explaining and plain requests batched together: each gets what it asked for, scores unchanged."""
    import asyncio

    seed_histories(redis_url, {f"u{k}": [f"i{k + j}" for j in range(2, 12)] for k in range(12)})
    settings = make_settings(bundle.path, redis_url, batch_max_delay_ms=30.0, request_timeout_ms=5000)

    async def go(server: LiveServer) -> list[dict]:
        async with server.async_client() as c:
            calls = [
                c.post(
                    "/rank",
                    json={"user_id": f"u{k}", "candidates": ["i2", "i40", "i80"], "explain": k % 2 == 0},
                )
                for k in range(12)
            ]
            return [r.json() for r in await asyncio.gather(*calls)]

    with LiveServer(settings) as server:
        server.wait_ready()
        answers = asyncio.run(go(server))
        with server.client() as c:
            text = c.get("/metrics").text
    batches = [
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("din_batch_requests_count")
    ]
    assert batches and batches[0] < 12  # batched, not one call each
    for k, body in enumerate(answers):
        hist = [f"i{k + j}" for j in range(2, 12)]
        if k % 2 == 0:
            assert_explained(bundle, body, ["i2", "i40", "i80"], hist, 5)
        else:
            assert all("because" not in i for i in body["items"]) and "explained" not in body
        ref = dict(zip(["i2", "i40", "i80"], bundle.reference(["i2", "i40", "i80"], hist), strict=True))
        assert all(abs(i["score"] - ref[i["item_id"]]) <= TOL for i in body["items"])


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"explain": True, "explain_top": 0}, "explain_top"),
        ({"explain": True, "explain_top": 31}, "explain_top"),  # over DIN_MAX_EXPLAIN_TOP (30 here)
        ({"explain": True, "explain_top": "5"}, "explain_top"),
        ({"explain": True, "explain_top": 2.5}, "explain_top"),
        ({"explain": "yes"}, "explain"),
        ({"explain": 1}, "explain"),
    ],
)
def test_explain_fields_are_validated(server: LiveServer, extra: dict, field: str) -> None:
    with server.client() as c:
        resp = c.post("/rank", json={"user_id": "u", "candidates": ["i2"], **extra})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "validation_error"
    assert [d["field"] for d in body["detail"]] == [field]
    assert "Traceback" not in resp.text


def test_openapi_documents_explain_and_its_limit(server: LiveServer) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    props = spec["components"]["schemas"]["RankRequest"]["properties"]
    assert props["explain"]["type"] == "boolean" and props["explain"]["default"] is False
    assert props["explain_top"]["maximum"] == 30 and props["explain_top"]["default"] == 5
    assert "because" in spec["components"]["schemas"]["ScoredItem"]["properties"]


def test_a_degraded_answer_explains_nothing_and_says_so(bundle: BundleInfo, tmp_path: Path) -> None:
    redis_srv = EmbeddedRedis(tmp_path / "redis", port=0, unix_socket=False)
    redis_srv.start()
    try:
        with LiveServer(make_settings(bundle.path, redis_srv.url)) as server, server.client() as c:
            server.wait_ready()
            seed_histories(redis_srv.url, {"gone": ["i4", "i5"]})
            redis_srv.stop()
            resp = c.post("/rank", json={"user_id": "gone", "candidates": ["i2", "i3"], "explain": True})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["degraded"] is True and body["history_length"] == 0
            assert body["explained"] is False
            assert "could not be read" in body["explain_note"] and "redis_unavailable" in body["explain_note"]
            assert [i["because"] for i in body["items"]] == [[], []]
            # an explicit history needs no Redis: explained
            ok = c.post(
                "/rank", json={"user_id": "gone", "candidates": ["i2"], "history": ["i4"], "explain": True}
            ).json()
            assert ok["degraded"] is False and ok["explained"] is True
            assert ok["items"][0]["because"][0]["item_id"] == "i4"
    finally:
        redis_srv.stop()


def test_an_old_bundle_serves_and_answers_explain_with_a_clear_422(
    bundle: BundleInfo, old_bundle: Path, redis_url: str
) -> None:
    with LiveServer(make_settings(old_bundle, redis_url)) as server, server.client() as c:
        server.wait_ready()
        plain = c.post("/rank", json={"user_id": "u", "candidates": ["i2", "i3"], "history": ["i4"]})
        assert plain.status_code == 200, plain.text
        resp = c.post(
            "/rank", json={"user_id": "u", "candidates": ["i2"], "history": ["i4"], "explain": True}
        )
        assert resp.status_code == 422, resp.text
        body = resp.json()
        assert body["error"] == "cannot_explain"
        assert "re-export" in body["message"] and "din export" in body["message"]
        assert [d["field"] for d in body["detail"]] == ["explain"]
        assert body["request_id"] == resp.headers["x-request-id"]
        assert c.get("/ui/suggestions").json()["can_explain"] is False


def test_a_reload_to_an_old_bundle_between_admission_and_batch_refuses_only_the_explaining(
    bundle: BundleInfo, old_bundle: Path, redis_url: str
) -> None:
    """The batcher checks the model it runs: a request admitted under an explaining model and run under
    one that cannot gets the same 422, and the plain requests of the batch are answered."""
    import asyncio

    async def go(server: LiveServer) -> tuple[int, int, dict]:
        old = Ranker(load_bundle(old_bundle), providers=["CPUExecutionProvider"], intra_op_threads=1)
        async with server.async_client() as c:
            body = {"user_id": "u", "candidates": ["i2"], "history": ["i4"]}
            explaining = asyncio.create_task(c.post("/rank", json={**body, "explain": True}))
            plain = asyncio.create_task(c.post("/rank", json=body))
            await asyncio.sleep(0.25)  # both admitted, queued: the batch closes after 600 ms
            server.app.state.din.live.swap(old)
            a, b = await asyncio.gather(explaining, plain)
            return a.status_code, b.status_code, a.json()

    settings = make_settings(bundle.path, redis_url, batch_max_delay_ms=600.0, request_timeout_ms=5000)
    with LiveServer(settings) as server:
        server.wait_ready()
        explained, plain, body = asyncio.run(go(server))
    assert (explained, plain) == (422, 200)
    assert body["error"] == "cannot_explain"


# ------------------------------------------------------------------ the explorer's endpoints, the docs


def test_the_explorer_page_and_its_files_are_served(server: LiveServer) -> None:
    with server.client() as c:
        page = c.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="ui/static/explorer.js"' in page.text and "http" not in page.text.replace(
            "http-equiv", ""
        )
        js = c.get("/ui/static/explorer.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "fetch(" in js.text and "https://" not in js.text
        assert c.get("/ui/static/explorer.css").headers["content-type"].startswith("text/css")
        for bad in ("/ui/static/nope.js", "/ui/static/..%2F..%2Fconfig.py", "/ui/static/__init__.py"):
            resp = c.get(bad)
            assert resp.status_code == 404 and resp.json()["error"] == "not_found", bad


def test_suggestions_and_item_lookups(
    server: LiveServer, bundle: BundleInfo, redis_server: EmbeddedRedis
) -> None:
    seed_histories(redis_server.url, {"sugg-a": ["i4"], "sugg-b": ["i5", "i6"], "x*[y]": ["i7"]})
    cats = load_bundle(bundle.path).item_categories
    assert cats is not None
    with server.client() as c:
        s = c.get("/ui/suggestions", params={"users": 50, "items": 7}).json()
        assert s["model_version"] == "test-v1" and s["can_explain"] is True
        assert (s["max_history"], s["max_explain_top"], s["max_candidates"]) == (20, 30, 1000)
        assert {"sugg-a", "sugg-b", "x*[y]"} <= set(s["users"])
        assert len(s["items"]) == 7 and len({i["item_id"] for i in s["items"]}) == 7
        for item in s["items"]:
            assert item["known"] and item["category"] == cats[bundle.items.index(item["item_id"])]
        got = c.post("/ui/items", json={"item_ids": ["i9", "nope", "i9"]}).json()["items"]
        assert got == [
            {"item_id": "i9", "known": True, "category": cats[9]},
            {"item_id": "nope", "known": False, "category": None},
            {"item_id": "i9", "known": True, "category": cats[9]},
        ]
        for params in ({"users": -1}, {"items": 201}, {"users": "x"}):
            resp = c.get("/ui/suggestions", params=params)
            assert resp.status_code == 422 and resp.json()["detail"][0]["field"] in (
                "query.users",
                "query.items",
            )
        resp = c.post("/ui/items", json={"item_ids": []})
        assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "item_ids"


def test_bundles_carry_item_categories_and_old_ones_go_without(bundle: BundleInfo, tmp_path: Path) -> None:
    b = load_bundle(bundle.path)
    assert b.item_categories is not None and len(b.item_categories) == len(b.vocab)
    assert b.manifest["files"][ITEM_CATEGORIES]
    # a bundle without the file (exported before it) loads, with no categories
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][ITEM_CATEGORIES]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / ITEM_CATEGORIES).unlink()
    assert load_bundle(path).item_categories is None


def test_docs_assets_are_served_by_the_service(server: LiveServer) -> None:
    with server.client() as c:
        docs = c.get("/docs").text
        redoc = c.get("/redoc").text
        assert "/docs/assets/swagger-ui-bundle.js" in docs and "/docs/assets/swagger-ui.css" in docs
        assert "/docs/assets/redoc.standalone.js" in redoc
        for page in (docs, redoc):
            assert "cdn.jsdelivr.net" not in page and "fonts.googleapis" not in page
            assert "fastapi.tiangolo.com" not in page
        js = c.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and "SwaggerUIBundle" in js.text[:2000]
        assert c.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
        redoc_js = c.get("/docs/assets/redoc.standalone.js")
        assert redoc_js.status_code == 200 and "cdn.redoc.ly" not in redoc_js.text  # its one remote file
        assert c.get("/docs/assets/nope.js").status_code == 404


def test_item_categories_must_match_the_vocabulary(bundle: BundleInfo, tmp_path: Path) -> None:
    from model.errors import BundleError, ExportError
    from model.export import export_model

    with pytest.raises(ExportError, match="category ids for a model with n_categories"):
        export_model(bundle.model, bundle.items, tmp_path / "out", categories=["<pad>", "<oov>", "c2"])
    assert not (tmp_path / "out").exists()
    path = tmp_path / "bundle"
    shutil.copytree(bundle.path, path)
    lines = (path / ITEM_CATEGORIES).read_text().splitlines()[:-1]  # one item short
    (path / ITEM_CATEGORIES).write_text("".join(f"{c}\n" for c in lines))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][ITEM_CATEGORIES] = hashlib.sha256((path / ITEM_CATEGORIES).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{ITEM_CATEGORIES} has {len(lines)} lines"):
        load_bundle(path)
