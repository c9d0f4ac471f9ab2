"""`/rank` with `explain`, over real HTTP against real ONNX Runtime and a real redis-server: every listed
`contribution` is the score a client gets through `/rank` with the history minus the score it gets with
that one behaviour removed (to 1e-5), and the PyTorch reference's (`DIN.leave_one_out`); `because` holds
the largest positive ones, `against` the most negative; a behaviour built to lower a score (in a small
hand-made model, where it also has the largest attention weight) is listed under `against`, never under
`because`; explain_top and the explained items are bounded, degraded answers explain nothing and say
so, and a bundle exported before explain.onnx still serves but answers `explain` with 422
cannot_explain. The ranking explorer's endpoints (/ui, /ui/suggestions, /ui/items) and the offline docs
assets too."""

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

from contracts.bundle import EXPLAIN_GRAPH, ITEM_CATEGORIES, load_bundle
from contracts.errors import CannotExplain
from contracts.vocab import Vocab
from model.din import DINConfig, build_model
from model.export import export_model
from service.ranker import Ranker
from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, LiveServer, make_settings, seed_histories

TOL = 1e-5
T = 20  # the test bundle's max_history
MAX_ITEMS = 60  # the module server's DIN_MAX_EXPLAIN_ITEMS


def reference(bundle: BundleInfo, candidates: list[str], history: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch references for each candidate, over the history cut to T: DIN.attention and
    DIN.leave_one_out (the paper's tiled form, each shortened history run through `forward`), each
    (n, len(history cut to T))."""
    vocab = Vocab(bundle.items)
    hist = vocab.lookup(history[:T]).tolist()
    n = len(candidates)
    h = torch.zeros((n, max(1, len(hist))), dtype=torch.int64)
    if hist:
        h[:, : len(hist)] = torch.tensor(hist, dtype=torch.int64)
    args = (torch.from_numpy(vocab.lookup(candidates)), h, torch.full((n,), len(hist), dtype=torch.int64))
    with torch.no_grad():
        att, loo = bundle.model.attention(*args), bundle.model.leave_one_out(*args)
    return att[:, : len(hist)].numpy(), loo[:, : len(hist)].numpy()


def assert_explained(
    bundle: BundleInfo, body: dict, candidates: list[str], history: list[str], top: int
) -> None:
    """Each item's `because` is its `top` largest positive contributions by the reference, `against` its
    `top` most negative, each with the reference's weight and contribution to 1e-5."""
    seen = history[:T]
    assert body["explained"] is True and "explain_note" not in body
    assert body["history_length"] == len(seen)
    att, loo = reference(bundle, candidates, history)
    ref = {c: (att[j], loo[j]) for j, c in enumerate(candidates)}
    for item in body["items"]:
        weights, contributions = ref[item["item_id"]]
        because, against = item["because"], item["against"]
        # as many as raised (lowered) it, up to `top` (a contribution within TOL of 0 may go either way)
        assert (
            min(top, int((contributions > TOL).sum()))
            <= len(because)
            <= min(top, int((contributions > -TOL).sum()))
        )
        assert (
            min(top, int((contributions < -TOL).sum()))
            <= len(against)
            <= min(top, int((contributions < TOL).sum()))
        )
        listed = [b["contribution"] for b in because]
        assert listed == sorted(listed, reverse=True) and all(c > 0 for c in listed)
        lowered = [b["contribution"] for b in against]
        assert lowered == sorted(lowered) and all(c < 0 for c in lowered)
        positions = [b["position"] for b in because + against]
        assert len(set(positions)) == len(positions)
        for b in because + against:
            assert b["item_id"] == seen[b["position"]]
            assert abs(b["weight"] - float(weights[b["position"]])) <= TOL, (item["item_id"], b)
            assert abs(b["contribution"] - float(contributions[b["position"]])) <= TOL, (item["item_id"], b)
        # the listed ones are the extremes: nothing left out raised (lowered) the score more
        left_out = np.delete(contributions, positions)
        if left_out.size:
            assert float(left_out.max()) <= (because[-1]["contribution"] if len(because) == top else 0) + TOL
            assert float(left_out.min()) >= (against[-1]["contribution"] if len(against) == top else 0) - TOL


@pytest.fixture(scope="module")
def server(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    # a budget that a busy machine cannot miss: these tests are about what is explained, not deadlines
    settings = make_settings(
        bundle.path,
        redis_server.url,
        max_explain_top=30,
        max_explain_items=MAX_ITEMS,
        request_timeout_ms=5000,
    )
    with LiveServer(settings) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def old_bundle(bundle: BundleInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle as `din export` wrote it before explain.onnx existed (and before the attention
    output: model.onnx with `ctr` alone)."""
    path = tmp_path_factory.mktemp("old") / "bundle"
    shutil.copytree(bundle.path, path)
    proto = onnx.load(str(path / "model.onnx"))
    kept = [o for o in proto.graph.output if o.name == "ctr"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(path / "model.onnx"))
    (path / EXPLAIN_GRAPH).unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["outputs"] = {"ctr": ["N"]}
    del manifest["files"][EXPLAIN_GRAPH], manifest["explain"]
    manifest["files"]["model.onnx"] = hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


# ------------------------------------------------------------------ the ranker


def test_ranker_explanations_equal_the_reference_in_a_mixed_batch(bundle: BundleInfo) -> None:
    ranker = Ranker(load_bundle(bundle.path), providers=["CPUExecutionProvider"])
    assert ranker.can_explain
    rng = np.random.default_rng(11)
    known = bundle.items[2:]
    rows = [
        ([*rng.choice(known, size=n).tolist(), "unknown"], rng.choice(known, size=h).tolist())
        for n, h in [(5, 0), (1, 1), (40, 7), (10, 20), (3, 35)]  # 35 > T: cut to the newest 20
    ]
    explained = ranker.explain_batch(rows)
    plain = ranker.score_batch(rows)
    for (cands, hist), e, p in zip(rows, explained, plain, strict=True):
        np.testing.assert_allclose(e.scores, p.scores, atol=TOL, rtol=0)  # the same ctr, by the other graph
        assert e.attention.shape == e.contribution.shape == (len(cands), min(len(hist), T))
        att, loo = reference(bundle, cands, hist)
        np.testing.assert_allclose(e.attention, att, atol=TOL, rtol=0)
        np.testing.assert_allclose(e.contribution, loo, atol=TOL, rtol=0)
        np.testing.assert_allclose(p.scores, bundle.reference(cands, hist), atol=TOL, rtol=0)
    assert float(np.abs(explained[3].contribution).max()) > 1e-3  # behaviours do move these scores


def test_a_bundle_without_the_attention_output_serves_but_cannot_explain(
    bundle: BundleInfo, old_bundle: Path
) -> None:
    old = Ranker(load_bundle(old_bundle), providers=["CPUExecutionProvider"])
    assert not old.can_explain
    rows = [(["i2", "i3", "i4"], ["i5", "i6"])]
    np.testing.assert_allclose(old.score_batch(rows)[0].scores, bundle.reference(*rows[0]), atol=TOL, rtol=0)
    with pytest.raises(CannotExplain, match="re-export"):
        old.explain_batch(rows)


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
            assert_explained(bundle, explained, candidates, hist[:T], 5)  # explain_top's default: 5


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
    assert [(i["because"], i["against"]) for i in body["items"]] == [([], []), ([], [])]


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


def test_explained_items_are_bounded_with_a_422_naming_top_k(server: LiveServer) -> None:
    """Each explained item costs a head pass per behaviour: more than DIN_MAX_EXPLAIN_ITEMS returned
    items is refused, naming top_k; top_k within it is explained; without explain nothing changes."""
    candidates = [f"i{k}" for k in range(2, 2 + MAX_ITEMS + 1)]  # one more than the limit
    body = {"user_id": "u", "candidates": candidates, "history": ["i4", "i5"], "explain": True}
    with server.client() as c:
        for extra in ({}, {"top_k": MAX_ITEMS + 1}):
            resp = c.post("/rank", json={**body, **extra})
            assert resp.status_code == 422, resp.text
            err = resp.json()
            assert err["error"] == "validation_error" and [d["field"] for d in err["detail"]] == ["top_k"]
            assert f"set top_k <= {MAX_ITEMS}" in err["detail"][0]["message"]
        ok = c.post("/rank", json={**body, "top_k": MAX_ITEMS})
        assert ok.status_code == 200 and len(ok.json()["items"]) == MAX_ITEMS
        duplicates = c.post("/rank", json={**body, "candidates": candidates[:MAX_ITEMS] * 2})
        assert duplicates.status_code == 200  # scored (and returned) once each
        plain = c.post("/rank", json={**body, "explain": False})
        assert plain.status_code == 200 and len(plain.json()["items"]) == MAX_ITEMS + 1


def test_openapi_documents_explain_and_its_limit(server: LiveServer) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    props = spec["components"]["schemas"]["RankRequest"]["properties"]
    assert props["explain"]["type"] == "boolean" and props["explain"]["default"] is False
    assert props["explain_top"]["maximum"] == 30 and props["explain_top"]["default"] == 5
    assert {"because", "against"} <= set(spec["components"]["schemas"]["ScoredItem"]["properties"])
    because = spec["components"]["schemas"]["Because"]["properties"]
    assert set(because) == {"item_id", "position", "weight", "contribution"}
    assert "less this one behaviour" in because["contribution"]["description"]


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
            assert [(i["because"], i["against"]) for i in body["items"]] == [([], []), ([], [])]
            # an explicit history needs no Redis: explained
            ok = c.post(
                "/rank", json={"user_id": "gone", "candidates": ["i2"], "history": ["i4"], "explain": True}
            ).json()
            assert ok["degraded"] is False and ok["explained"] is True
            assert [b["item_id"] for b in ok["items"][0]["because"] + ok["items"][0]["against"]] == ["i4"]
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
    from contracts.errors import BundleError, ExportError
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


# ------------------------------------------------------------------ what the contributions mean


def test_every_contribution_is_the_score_a_client_loses_by_removing_that_behaviour(
    server: LiveServer, redis_server: EmbeddedRedis
) -> None:
    """The contract, checked as a client would, through the API alone: for every returned item and
    every behaviour listed (explain_top = T lists them all), `/rank` with the history the model saw,
    less that one behaviour, scores the item lower by exactly `contribution` (to 1e-5)."""
    stored = (
        [f"i{k}" for k in (14, 200, 77, 5, 5, 131, 260)] + ["never-seen"] + [f"i{k}" for k in range(40, 55)]
    )
    seed_histories(redis_server.url, {"loo-user": stored})
    candidates = ["i2", "i33", "i90", "i150", "i299", "not-in-the-catalogue"]
    checked = 0
    with server.client() as c:
        body = c.post(
            "/rank",
            json={
                "user_id": "loo-user",
                "candidates": candidates,
                "explain": True,
                "explain_top": T,
                "top_k": 4,
            },
        ).json()
        seen = stored[:T]  # Redis keeps the T newest
        assert body["explained"] is True and body["history_length"] == len(seen) == T
        assert len(body["items"]) == 4
        scores = {i["item_id"]: i["score"] for i in body["items"]}
        returned = list(scores)
        for item in body["items"]:
            listed = item["because"] + item["against"]
            assert len(listed) >= T - 1  # every behaviour that moved the score, up or down
            for b in listed:
                p = b["position"]
                assert b["item_id"] == seen[p]
                without = seen[:p] + seen[p + 1 :]
                again = c.post(
                    "/rank", json={"user_id": "x", "candidates": returned, "history": without}
                ).json()
                lower = {i["item_id"]: i["score"] for i in again["items"]}
                assert abs(b["contribution"] - (scores[item["item_id"]] - lower[item["item_id"]])) <= TOL, b
                checked += 1
    assert checked >= 4 * (T - 1)
    assert max(abs(b["contribution"]) for i in body["items"] for b in i["because"] + i["against"]) > 1e-3


def planted_bundle(path: Path) -> tuple[Path, str, list[str]]:
    """A small DIN built by hand so that one behaviour lowers the score of the candidate and two raise
    it, while the one that lowers it has the largest attention weight of all.

    Embeddings (categories all zero): "bad" = e0, "good" = e1, "fine" = 0.5 e1, "cand" = e2. Attention:
    score = 2 sigmoid(4 k[0]) + 0, so "bad" weighs 2 sigmoid(4) = 1.96 and the others 1. Head (u, q):
    logit = 3 (u[1] - u[0]). So u[0] (what "bad" adds) lowers every score and u[1] raises it."""
    n_items, E = 6, 8
    cfg = DINConfig(
        n_items=n_items,
        n_categories=3,
        item_dim=4,
        cate_dim=4,
        max_history=5,
        att_hidden=(4,),
        head_input="u,q",
        head_hidden=(4,),
        head_activation="prelu",
    )
    model = build_model(cfg, torch.tensor([0, 1, 2, 2, 2, 2]), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.item_emb.weight[2, 0] = 1.0  # bad
        model.item_emb.weight[3, 1] = 1.0  # good
        model.item_emb.weight[4, 1] = 0.5  # fine
        model.item_emb.weight[5, 2] = 1.0  # cand
        model.att_layers[0].weight[0, E + 0] = 4.0  # the k block of [q, k, q-k, q*k]: k[0]
        model.att_out.weight[0, 0] = 2.0
        model.head_layers[0].weight[0, 0] = -3.0  # u[0]
        model.head_layers[0].weight[0, 1] = 3.0  # u[1]
        model.head_acts[0].weight.fill_(1.0)  # PReLU with slope 1: the identity
        model.head_out.weight[0, 0] = 1.0
    items = ["<pad>", "<oov>", "bad", "good", "fine", "cand"]
    export_model(model.eval(), items, path, model_version="planted", categories=["<pad>", "<oov>", "c"])
    return path, "bad", ["good", "bad", "fine"]


def test_a_behaviour_built_to_lower_the_score_is_listed_against_never_because(
    tmp_path: Path, redis_url: str
) -> None:
    path, bad, history = planted_bundle(tmp_path / "planted")
    with LiveServer(make_settings(path, redis_url)) as server, server.client() as c:
        server.wait_ready()
        for hist in (history, [bad, *history[::-1]][:5], [bad]):
            body = c.post(
                "/rank",
                json={"user_id": "p", "candidates": ["cand", "good"], "history": hist, "explain": True},
            ).json()
            assert body["explained"] is True
            for item in body["items"]:
                because = [b["item_id"] for b in item["because"]]
                against = [b["item_id"] for b in item["against"]]
                assert bad not in because, (hist, item)
                assert against[:1] == [bad], (hist, item)  # the one that lowered it most
                assert set(because) == set(hist) - {bad}
                weights = {b["item_id"]: b["weight"] for b in item["because"] + item["against"]}
                assert weights[bad] == max(weights.values())  # the largest weight, yet it lowered the score
