"""The built book in a real browser: every page of ``_build/html``, offline.

Serves the built HTML on 127.0.0.1 and opens each page in Debian's headless Chromium through
Playwright. On every page: no console errors, no failed requests, no request to another host
(the site must work offline), math typeset by MathJax without errors, every image loaded,
exercise solutions collapsed until clicked, every internal link answered with HTTP 200, and no
code block (package code, cell input or output) wider than its box at a 1280-px-wide window, and
no figure scaled below ``MIN_IMAGE_SCALE`` of its natural width (its labels would be too small
to read; ``KNOWN_SMALL_IMAGES`` would list a page that still falls short, with its numbers).
A full-page screenshot of each chapter goes to ``_build/screenshots/`` for review.

Waiting for the network to go quiet: the test does not use Playwright's ``networkidle`` load
state. That state hung (timeout after 120 s) on the chapters visited after another page in the
same browser context, because of how Playwright (1.65, with Debian's Chromium 156) computes it:
with the profile's disk cache warm, every asset of a chapter arrives within ~0.3 s, so
``networkidle`` fires while the page's scripts are still running (MathJax typesets a chapter for
seconds before DOMContentLoaded); MathJax then fetches its fonts, and the request resets the
frame's idle flag without clearing the fired event, so no idle timer is restarted when it ends;
the DOMContentLoaded that follows recomputes the state, finds the frame not idle and removes
``networkidle``, and nothing ever fires it again (seen in the CDP log: every request finished,
Chromium reported its own networkIdle, Playwright never did). A cold cache (the first page, or a
page run alone) loads slowly enough that the race is not hit, hence "passes alone, fails after
other pages". ``PageLog.wait_until_quiet`` waits on the requests the page itself reports instead.

Needs ``make book`` first (``make test`` does it) and /usr/bin/chromium (``make test`` installs
it when it runs as root on Debian; see the ``chromium_options`` fixture in conftest.py); skips
with the reason otherwise.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
HTML = REPO / "_build" / "html"
SCREENSHOTS = REPO / "_build" / "screenshots"
HOST = "127.0.0.1"
# Folders of the build that hold assets and sources, not pages.
NOT_PAGES = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}
# Generous: under `make test` the browser shares 2 cores with training runs, and a page that
# loads in 2-3 s alone was seen to need over 30 s. A wait limit, not a tolerance.
WAIT_MS = 120_000
# The narrowest common laptop window: the book's code must fit its code column at this width.
VIEWPORT = {"width": 1280, "height": 900}
# The network counts as quiet when no request has been in flight for this long.
QUIET_MS = 500

pytestmark = pytest.mark.browser


def built_pages() -> list[str]:
    """Every HTML page of the built book, as a path relative to _build/html."""
    if not HTML.is_dir():
        return []
    return sorted(
        p.relative_to(HTML).as_posix()
        for p in HTML.rglob("*.html")
        if not NOT_PAGES.intersection(p.relative_to(HTML).parts)
    )


def is_chapter(page: str) -> bool:
    return Path(page).name[:1].isdigit()


PAGES = built_pages()


if not (HTML / "index.html").is_file():
    pytest.skip(f"the book is not built ({HTML} has no index.html): run `make book` first",
                allow_module_level=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def base_url():
    """http://127.0.0.1:<random port>/ serving _build/html from a background thread."""
    handler = functools.partial(QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory, chromium_options):
    """One Chromium with a fresh profile (no cache, no stored theme) for all pages."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium-profile")),
            **chromium_options,
            viewport=VIEWPORT,
        )
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


class PageLog:
    """What a page did while it loaded: console errors, failed and foreign requests, and the
    requests still in flight (for ``wait_until_quiet``)."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.foreign: list[str] = []
        self.in_flight: set = set()
        self.last_activity = time.monotonic()
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught exception: {exc}"))
        page.on("request", self._request)
        page.on("requestfinished", self._done)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, message):
        if message.type == "error":
            self.errors.append(f"console error: {message.text} at {message.location}")

    def _request(self, request):
        self.in_flight.add(request)
        self.last_activity = time.monotonic()
        parts = urlsplit(request.url)
        if parts.scheme not in ("data", "blob", "about") and parts.hostname != HOST:
            self.foreign.append(request.url)

    def _done(self, request):
        self.in_flight.discard(request)
        self.last_activity = time.monotonic()

    def _failed(self, request):
        self._done(request)
        self.failed.append(f"{request.url} ({request.failure})")

    def _response(self, response):
        if response.status >= 400:
            self.failed.append(f"{response.url} (HTTP {response.status})")

    def wait_until_quiet(self, timeout_ms: float) -> None:
        """Return once no request of this page has been in flight for QUIET_MS.

        Playwright delivers the page's request events while it waits, so poll with its clock.
        Raises TimeoutError naming the requests still open (none can be open for long on this
        local server unless something is wrong).
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while self.in_flight or time.monotonic() - self.last_activity < QUIET_MS / 1000:
            if time.monotonic() > deadline:
                open_requests = sorted(r.url for r in self.in_flight)
                raise TimeoutError(f"the network never went quiet; in flight: {open_requests}")
            self.page.wait_for_timeout(100)


# Waits for MathJax's first typesetting pass, then lists math that did not become mjx-container.
UNTYPESET_MATH_JS = """
async () => {
  const math = [...document.querySelectorAll('.math')];
  if (math.length === 0) return {count: 0, untypeset: [], errors: []};
  const deadline = Date.now() + 20000;
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() < deadline) {
    await new Promise(r => setTimeout(r, 100));
  }
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    return {count: math.length, untypeset: ['MathJax never loaded'], errors: []};
  }
  await MathJax.startup.promise;
  return {
    count: math.length,
    untypeset: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80)),
  };
}
"""

# Loads every image eagerly, waits for all of them, and lists those that did not decode.
BROKEN_IMAGES_JS = """
async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done);
  })));
  return images.filter(img => !(img.naturalWidth > 0)).map(img => img.currentSrc || img.src);
}
"""


# Opens every <details> (hidden code cells, dropdowns) so that all code blocks are laid out, then
# lists the blocks whose content is wider than their box (they would show a horizontal scroll
# bar): their kind, width in excess, and their longest line.
WIDE_CODE_JS = """
() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  return [...document.querySelectorAll('pre')]
    .filter(pre => pre.scrollWidth > pre.clientWidth)
    .map(pre => {
      const kind = pre.closest('.cell_output') ? 'cell output'
                 : pre.closest('.cell_input') ? 'cell input' : 'code block';
      const longest = pre.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      return `${kind} ${pre.scrollWidth - pre.clientWidth}px too wide: ${longest.trim().slice(0, 90)}`;
    });
}
"""


# Every laid-out image (width > 0; run after WIDE_CODE_JS has opened every <details>): its
# natural width and the width the page gives it. The images are the chapters' figures, saved by
# matplotlib at 100 dpi, so a figure shown at its natural width has its tick labels (10 pt) about
# 14 px tall, and one shown at a fraction f of it, 14 f px.
IMAGE_SCALES_JS = """
() => [...document.images]
  .filter(img => img.naturalWidth > 0 && img.getBoundingClientRect().width > 0)
  .map(img => ({
    figure: (img.closest('figure') || {}).id || img.currentSrc.split('/').pop(),
    natural: img.naturalWidth,
    shown: img.getBoundingClientRect().width,
  }))
"""

# A figure may be shown at no less than this fraction of its natural width: tick labels stay
# about 11 px tall or more. Matplotlib figures wider than the page's column (944 px at a
# 1280-px window) get scaled down to fit it; size them to fit instead (figsize width <= ~9.4 in).
MIN_IMAGE_SCALE = 0.8
# Pages known to fall short, with the measured fraction (issue 21 review, 1280-px window): the
# check still holds them to what they show now, so it catches them getting worse.
# Pages allowed a smaller minimum, with the measured figure and why; none at present.
KNOWN_SMALL_IMAGES: dict[str, float] = {}


def too_small_images(page, page_path: str) -> list[str]:
    """The figures shown at less than this page's minimum fraction of their natural width."""
    least = min(MIN_IMAGE_SCALE, KNOWN_SMALL_IMAGES.get(page_path, MIN_IMAGE_SCALE))
    return [f"{image['figure']}: {image['natural']} px shown at {image['shown']:.0f} px "
            f"({image['shown'] / image['natural']:.2f} < {least})"
            for image in page.evaluate(IMAGE_SCALES_JS)
            if image["shown"] < least * image["natural"] - 0.5]


def internal_links(page) -> set[str]:
    """Every link on the page that stays on this site, without its #fragment."""
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    return {urldefrag(h)[0] for h in hrefs if urlsplit(h).hostname == HOST}


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def check_solutions(page) -> list[str]:
    """Each solution starts collapsed and opens when its toggle button is clicked."""
    problems = []
    solutions = page.locator(".solution.admonition")
    for i in range(solutions.count()):
        solution = solutions.nth(i)
        body = solution.locator(":scope > :not(.admonition-title)").first
        name = solution.get_attribute("id")
        if body.is_visible():
            problems.append(f"solution {name} is open before any click")
            continue
        solution.locator("button.toggle-button").first.click()
        try:
            body.wait_for(state="visible", timeout=5_000)
        except Exception:  # playwright's TimeoutError
            problems.append(f"solution {name} did not open on click")
    return problems


def test_the_book_has_pages():
    """Guards the parametrized test below against silently running on nothing."""
    assert "book/intro.html" in PAGES
    assert any(is_chapter(p) for p in PAGES), "no chapter page was built"


@pytest.mark.parametrize("page_path", PAGES)
def test_page_works_offline(page_path, base_url, browser_context):
    page = browser_context.new_page()
    log = PageLog(page)
    try:
        page.goto(base_url + page_path, wait_until="load")
        if "http-equiv=\"refresh\"" in (HTML / page_path).read_text(encoding="utf-8").lower():
            # index.html forwards to the landing page; check where it lands.
            page.wait_for_url("**/book/intro.html")
            page.wait_for_load_state("load")
        log.wait_until_quiet(timeout_ms=WAIT_MS)

        math = page.evaluate(UNTYPESET_MATH_JS)
        assert not math["untypeset"], f"math not typeset: {math['untypeset']}"
        assert not math["errors"], f"MathJax errors: {math['errors']}"
        if math["count"]:
            assert page.locator("mjx-container").count() > 0

        broken = page.evaluate(BROKEN_IMAGES_JS)
        assert not broken, f"images that did not load: {broken}"

        problems = check_solutions(page)
        assert not problems, "; ".join(problems)

        dead = {u: s for u in sorted(internal_links(page)) if (s := http_status(u)) != 200}
        assert not dead, f"internal links that do not answer 200: {dead}"

        if is_chapter(page_path):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"{Path(page_path).stem}.png"), full_page=True)
        wide = page.evaluate(WIDE_CODE_JS)  # after the screenshot: it opens hidden code cells
        small = too_small_images(page, page_path)  # with every hidden cell laid out

        log.wait_until_quiet(timeout_ms=WAIT_MS)
        assert not log.foreign, f"requests to other hosts (the site must work offline): {log.foreign}"
        assert not log.failed, f"failed requests: {log.failed}"
        assert not log.errors, "\n".join(log.errors)
        assert not wide, f"code wider than its column at {VIEWPORT['width']} px: {wide}"
        assert not small, (f"figures scaled down below a readable size at "
                           f"{VIEWPORT['width']} px: {small}")
    finally:
        page.close()
