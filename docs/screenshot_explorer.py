"""Take the README's picture of the ranking explorer: a running `din serve` (e.g. on `make demo`'s data),
Debian's chromium through playwright (as tests/service/test_browser.py drives it).

    python docs/screenshot_explorer.py http://127.0.0.1:8000 docs/explorer.png --user A002FO0JB5BDD
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--user", help="a user id (default: the first one suggested)")
    ap.add_argument("--candidates", type=int, default=12, help="catalogue items to sample")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium)
        page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
        page.goto(args.url.rstrip("/") + "/ui")
        page.wait_for_selector("#user-chips button")
        if args.user:
            page.fill("#user", args.user)
        page.fill("#sample-n", str(args.candidates))
        page.click("#sample")
        page.wait_for_function(
            "n => document.querySelector('#candidates').value.split('\\n').length === n", arg=args.candidates
        )
        page.click("#rank")
        page.wait_for_function(
            "n => document.querySelectorAll('#heatmap g.row').length === n", arg=args.candidates
        )
        page.click('#heatmap rect.cell[data-row="0"][data-col="2"]')
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
