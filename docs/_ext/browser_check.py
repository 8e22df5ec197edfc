"""Open every page of the built site in headless Chromium and fail on what a reader would see
broken: console errors (a script error, a missing stylesheet, font or script), images that
did not load, and maths that KaTeX did not typeset. A screenshot of each page is saved.

``make docs-check`` runs it (not part of CI: it needs a browser). It serves the site from
``127.0.0.1`` on a free port, drives ``/usr/bin/chromium`` through ``/usr/bin/chromedriver``
with Selenium (Debian: ``apt-get install chromium chromium-driver``; ``pip install
selenium``), and prints one line per page::

    python docs/_ext/browser_check.py site --screenshots site/_browser_check
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)
MAX_SCREENSHOT_HEIGHT = 6000
PAGE_STATE = """
const maths = [...document.querySelectorAll('.arithmatex')];
return {
  missingImages: [...document.images]
      .filter(img => !img.complete || img.naturalWidth === 0).map(img => img.src),
  maths: maths.length,
  unrenderedMaths: maths.filter(el => !el.querySelector('.katex'))
      .map(el => el.textContent.slice(0, 80)),
  katexErrors: [...document.querySelectorAll('.katex-error')]
      .map(el => el.getAttribute('title') || el.textContent.slice(0, 80)),
  images: document.images.length,
  height: document.documentElement.scrollHeight,
};
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``site`` on a free local port in a daemon thread; returns the server and URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser(chromium: str, driver: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def check_page(chrome: webdriver.Chrome, url: str, screenshot: Path | None) -> list[str]:
    """Problems found on the page at ``url`` (empty when it renders fully)."""
    chrome.get(url)
    state = chrome.execute_script(PAGE_STATE)
    problems = [f"missing image {src}" for src in state["missingImages"]]
    problems += [f"unrendered maths: {text!r}" for text in state["unrenderedMaths"]]
    problems += [f"KaTeX error: {text}" for text in state["katexErrors"]]
    problems += [
        f"console {entry['level']}: {entry['message']}"
        for entry in chrome.get_log("browser")
        if entry["level"] in ("SEVERE", "WARNING")
    ]
    if screenshot is not None:
        chrome.set_window_size(1280, min(state["height"], MAX_SCREENSHOT_HEIGHT))
        chrome.save_screenshot(str(screenshot))
        chrome.set_window_size(1280, 1000)
    print(
        f"{'FAIL' if problems else 'ok  '} {url}: {state['images']} images, "
        f"{state['maths']} formulas"
    )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="a built mkdocs site (mkdocs build)")
    parser.add_argument("--screenshots", type=Path, help="directory for one PNG per page")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    pages = sorted(
        page.relative_to(args.site)
        for page in args.site.rglob("index.html")
        if not page.relative_to(args.site).parts[0].startswith("_")
    )
    if not pages:
        print(f"{args.site} holds no page: build the site first (mkdocs build)")
        return 2
    for tool in (args.chromium, args.chromedriver):
        if not Path(tool).exists():
            print(f"{tool} not found: apt-get install chromium chromium-driver (or pass its path)")
            return 2
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    server, root = serve(args.site)
    chrome = browser(args.chromium, args.chromedriver)
    failures = 0
    try:
        for page in pages:
            name = "-".join(page.parent.parts) or "home"
            shot = args.screenshots / f"{name}.png" if args.screenshots else None
            path = "" if page.parent == Path(".") else page.parent.as_posix() + "/"
            problems = check_page(chrome, root + path, shot)
            for problem in problems:
                print(f"    {problem}")
            failures += bool(problems)
    finally:
        chrome.quit()
        server.shutdown()
    print(f"{len(pages) - failures} of {len(pages)} pages render fully")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
