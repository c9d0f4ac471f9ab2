"""The ranking explorer (/ui) and the docs (/docs) in a real headless browser: Debian's chromium, driven
by playwright (never `playwright install`: the browser is the system's). Offline: the browser context
refuses every request that leaves the service, and the tests assert none was even attempted. Skipped
where no chromium is installed (CI installs one: .ci/run)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.store.embedded import EmbeddedRedis
from tests.service.conftest import BundleInfo, LiveServer, make_settings, seed_histories

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")


def find_chromium() -> str | None:
    """A system chromium (Debian's package), or DIN_TEST_CHROMIUM."""
    for candidate in (os.environ.get("DIN_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")


@dataclass
class Watched:
    """What a page did that it should not: console errors, uncaught exceptions, failed requests, HTTP
    errors, and any request for a host other than the service's."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        return {k: v for k, v in vars(self).items() if v}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def open_page(browser: Any, base: str) -> tuple[Any, Any, Watched]:
    """A fresh context whose every request outside `base`'s host is refused (and recorded)."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    watched = Watched()
    host = urlsplit(base).hostname

    def gate(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname in (host, "localhost") or url.startswith("data:"):
            route.continue_()
        else:
            watched.outside.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", gate)
    page = context.new_page()
    page.on("console", lambda m: watched.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watched.page_errors.append(str(e)))
    page.on("requestfailed", lambda r: watched.failed.append(f"{r.url} {r.failure}"))
    page.on(
        "response", lambda r: watched.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    return context, page, watched


@pytest.fixture(scope="module")
def server(bundle: BundleInfo, redis_server: EmbeddedRedis) -> Iterator[LiveServer]:
    seed_histories(
        redis_server.url, {"ui-alice": [f"i{k}" for k in range(40, 70)], "ui-bob": ["i5", "i9", "i13"]}
    )
    with LiveServer(make_settings(bundle.path, redis_server.url)) as s:
        s.wait_ready()
        yield s


SHOTS = Path(os.environ.get("DIN_TEST_SCREENSHOTS", tempfile.gettempdir()))  # where the pages are pictured


def hue_of(fill: str) -> int:
    """The hue of an "hsl(h, s%, l%)" colour."""
    return int(fill.removeprefix("hsl(").split(",")[0])


def lightness_of(fill: str) -> float:
    return float(fill.rstrip(")").split(",")[2].strip().rstrip("%"))


def rank_in_page(page: Any) -> int:
    """Press Rank and wait for the heatmap; returns the number of candidates asked for."""
    asked = len(set(page.input_value("#candidates").split()))
    page.click("#rank")
    done = "n => document.querySelectorAll('#heatmap g.row').length === n"
    page.wait_for_function(done + " && !document.querySelector('#rank').disabled", arg=asked)
    return asked


def test_the_explorer_ranks_and_draws_one_heatmap_row_per_candidate(browser: Any, server: LiveServer) -> None:
    context, page, watched = open_page(browser, server.url)
    try:
        page.goto(server.url + "/ui")
        page.wait_for_selector("#user-chips button")  # suggestions came from Redis
        chips = page.eval_on_selector_all("#user-chips button", "els => els.map(e => e.dataset.user)")
        assert {"ui-alice", "ui-bob"} <= set(chips)
        assert "T = 20" in page.inner_text("#model")
        page.click('#user-chips button[data-user="ui-alice"]')
        page.fill("#sample-n", "9")
        page.click("#sample")
        page.wait_for_function("document.querySelector('#candidates').value.split('\\n').length === 9")

        asked = rank_in_page(page)
        assert asked == 9
        assert "test-v1" in page.inner_text("#summary")  # the version that scored it (no arm: no routing)
        assert page.locator("#ranked tbody tr").count() == 9
        # one column per behaviour the model saw (T = 20 of alice's 30), every cell explained
        assert page.locator("#heatmap g.col").count() == 20
        assert page.locator("#heatmap rect.cell[data-contribution]").count() == 9 * 20
        assert page.locator("#heatmap rect.cell.missing").count() == 0
        # by default the colours are the contributions, on a scale centred on zero: raised blue, lowered
        # orange, the stronger the darker; the legend says so in words
        cells = page.eval_on_selector_all(
            "#heatmap rect.cell",
            "els => els.map(e => [Number(e.dataset.contribution), Number(e.dataset.weight),"
            " e.getAttribute('fill')])",
        )
        hues = {round(c, 9): hue_of(fill) for c, _, fill in cells}
        assert any(c > 0 for c in hues) and any(c < 0 for c in hues)
        assert all(h == (215 if c >= 0 else 28) for c, h in hues.items())
        strongest = max(cells, key=lambda x: abs(x[0]))
        weakest = min(cells, key=lambda x: abs(x[0]))
        assert lightness_of(strongest[2]) < lightness_of(weakest[2])
        legend = page.inner_text("#legend")
        assert "raised the score" in legend and "lowered the score" in legend and "no effect" in legend
        assert "removed" in legend
        page.screenshot(path=str(SHOTS / "explorer-contributions.png"), full_page=True)
        scores = [
            float(t.split()[-1]) for t in page.locator("#ranked tbody tr td:last-child").all_inner_texts()
        ]
        assert scores == sorted(scores, reverse=True)
        # categories label the columns, and hovering a cell names both items
        assert (page.locator("#heatmap g.col text").first.text_content() or "").startswith("c")
        page.hover('#heatmap rect.cell[data-row="0"][data-col="0"]')
        details = page.inner_text("#details")
        assert (
            "position 0 (0 = newest)" in details and "weight" in details and "i40" in details
        )  # newest first
        assert "contribution" in details and ("raised its score" in details or "lowered its score" in details)

        # the attention weights are the second view: the same cells, a sequential scale
        page.check('input[name="view"][value="weight"]')
        page.wait_for_function("document.querySelector('#legend').innerText.includes('lowest weight')")
        fills = page.eval_on_selector_all(
            "#heatmap rect.cell", "els => els.map(e => [Number(e.dataset.weight), e.getAttribute('fill')])"
        )
        assert len(fills) == 9 * 20 and {hue_of(f) for _, f in fills} == {222}
        heaviest = max(fills, key=lambda x: x[0])
        lightest = min(fills, key=lambda x: x[0])
        assert lightness_of(heaviest[1]) < lightness_of(lightest[1])
        page.screenshot(path=str(SHOTS / "explorer-weights.png"), full_page=True)
        page.check('input[name="view"][value="contribution"]')
        page.wait_for_function("document.querySelector('#legend').innerText.includes('no effect')")

        # with a routing of versions in force the answer names the user's arm
        with server.client() as c:
            routing = {"arms": [{"name": "control", "model_version": "test-v1", "weight": 1}]}
            assert c.put("/admin/routing", json=routing).status_code == 200
        rank_in_page(page)
        page.wait_for_function("document.querySelector('#summary').innerText.includes('arm control')")
        assert "arm control · test-v1" in page.inner_text("#summary")
        with server.client() as c:
            assert c.delete("/admin/routing").status_code == 200

        # a pasted history replaces the stored one: as many columns as it has behaviours
        page.fill("#history", "i7 i8 i9 i10")
        page.fill("#candidates", "i2\ni3\ni4")
        assert rank_in_page(page) == 3
        assert page.locator("#heatmap g.col").count() == 4
        page.click('#heatmap rect.cell[data-row="2"][data-col="3"]')
        assert "i10" in page.inner_text("#details")
        assert not watched.problems(), watched.problems()
    finally:
        context.close()


def test_docs_render_the_operations_offline(browser: Any, server: LiveServer) -> None:
    context, page, watched = open_page(browser, server.url)
    try:
        page.goto(server.url + "/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=20_000)
        paths = set(page.locator(".opblock-summary-path").all_inner_texts())
        assert {"/rank", "/events", "/ui/suggestions"} <= {p.replace("\u200b", "") for p in paths}
        page.goto(server.url + "/redoc")
        page.wait_for_selector("h2:has-text('Rank candidates for a user')", timeout=20_000)
        assert not watched.outside, watched.outside  # nothing was even asked of another host
        assert not watched.problems(), watched.problems()
    finally:
        context.close()


def test_with_api_keys_the_page_asks_for_one_and_sends_it(
    browser: Any, bundle: BundleInfo, redis_server: EmbeddedRedis
) -> None:
    settings = make_settings(bundle.path, redis_server.url, api_keys="sesame-key-1")
    with LiveServer(settings) as server:
        server.wait_ready()
        context, page, watched = open_page(browser, server.url)
        try:
            page.goto(server.url + "/ui")  # the page itself holds no data: it loads without a key
            page.wait_for_selector("#error:not([hidden])")
            assert "API key" in page.inner_text("#error")
            page.fill("#key", "sesame-key-1")
            page.press("#key", "Enter")
            page.wait_for_selector("#user-chips button")
            page.fill("#candidates", "i2 i3 i4 i5")
            assert rank_in_page(page) == 4
            # the only failure was the keyless first look (a 401, as the page said)
            assert [e.split()[0] for e in watched.http_errors] == ["401"]
            assert not watched.outside and not watched.page_errors
        finally:
            context.close()
