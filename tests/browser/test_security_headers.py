"""Issue #18 point 10: every response carries the CSP and friends, and the real page works under them."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import AppServer, running_app

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Page

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=30_000)  # two shared cores

pytestmark = pytest.mark.browser

REMOTE = "http://198.51.100.7"  # TEST-NET-2: never routed; page.route below stops it in the browser anyway
# Every securitypolicyviolation event the page sees, whether or not chromium also logs it.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", event => window.__violations.push(
    {directive: event.effectiveDirective, blocked: event.blockedURI}));
"""


def _headers(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
        return {name.lower(): value for name, value in response.headers.items()}


def _policy(headers: dict[str, str]) -> dict[str, list[str]]:
    directives = (part.split() for part in headers["content-security-policy"].split(";"))
    return {words[0]: words[1:] for words in directives if words}


def test_the_page_an_asset_and_an_api_route_carry_the_headers(app_server: AppServer) -> None:
    page = urllib.request.urlopen(app_server.url, timeout=30).read().decode()
    asset = re.search(r'src="\./(assets/index-[^"]+\.js)"', page)
    assert asset, "the page's main script"
    urls = [app_server.url, app_server.url + asset[1], app_server.url + "gradio_api/info"]
    for url in urls:
        headers = _headers(url)
        assert headers["x-frame-options"] == "DENY", url
        assert headers["x-content-type-options"] == "nosniff", url
        assert headers["referrer-policy"] == "no-referrer", url
        policy = _policy(headers)
        assert policy["default-src"] == ["'self'"], url
        assert policy["script-src"][:2] == ["'self'", "'unsafe-eval'"], url
        assert "'unsafe-inline'" not in policy["script-src"], url
        assert all(source.startswith("'sha256-") for source in policy["script-src"][2:]), url
        assert policy["img-src"] == ["'self'", "data:", "blob:"], url
        assert policy["connect-src"] == ["'self'"], url
        assert policy["frame-src"] == ["'self'"], url
        assert policy["frame-ancestors"] == ["'none'"], url
        assert policy["object-src"] == ["'none'"], url
        assert policy["base-uri"] == ["'self'"], url
        assert policy["form-action"] == ["'self'"], url
    # Only the HTML page has inline scripts to allow: its own, by hash.
    assert len(_policy(_headers(app_server.url))["script-src"]) > 2
    assert len(_policy(_headers(urls[2]))["script-src"]) == 2


@pytest.fixture
def watched_page(browser, app_server: AppServer) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A tab on the app that records CSP console messages and any request to the remote test address."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(RECORD_VIOLATIONS)
    remote_requests: list[str] = []

    def refuse(route) -> None:
        remote_requests.append(route.request.url)
        route.abort()

    context.route(f"{REMOTE}/**", refuse)
    tab = context.new_page()
    messages: list[str] = []
    tab.on("console", lambda message: messages.append(message.text))
    tab.goto(app_server.url)
    tab.get_by_role("tab").first.wait_for()
    yield tab, messages, remote_requests
    context.close()


def _csp_messages(messages: list[str]) -> list[str]:
    return [text for text in messages if "Content Security Policy" in text]


def test_the_app_works_under_the_policy_and_remote_images_are_blocked(
    watched_page: tuple[Page, list[str], list[str]], app_server: AppServer
) -> None:
    page, messages, remote_requests = watched_page
    tabs = page.get_by_role("tab")
    for index in range(tabs.count()):  # every tab renders: the monitor's gr.HTML panel needs 'unsafe-eval'
        tabs.nth(index).click()
        page.wait_for_timeout(1000)
    tabs.first.click()
    page.locator("#dataset-folder textarea, #dataset-folder input").first.fill(str(app_server.demo_dataset))
    page.locator("#dataset-load").click()
    expect(page.locator("#dataset-gallery .thumbnail-item")).to_have_count(16)
    expect(page.locator("#dataset-summary")).to_contain_text("16 images found")
    assert _csp_messages(messages) == []
    assert page.evaluate("window.__violations") == []

    page.evaluate(
        """url => { const img = document.createElement("img"); img.src = url; document.body.appendChild(img); }""",
        f"{REMOTE}/x.png",
    )
    page.wait_for_function("window.__violations.length > 0")
    assert page.evaluate("window.__violations") == [{"directive": "img-src", "blocked": f"{REMOTE}/x.png"}]
    assert remote_requests == []  # the browser never even asked
    assert any(REMOTE in text for text in _csp_messages(messages))


def test_another_page_cannot_frame_the_app(browser, app_server: AppServer) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        messages: list[str] = []
        page.on("console", lambda message: messages.append(message.text))
        page.set_content(f'<iframe src="{app_server.url}" width="800" height="600"></iframe>')
        page.wait_for_timeout(3000)
        assert any("frame-ancestors" in text or "X-Frame-Options" in text for text in messages), messages
        assert page.frames[1].evaluate("document.querySelector('gradio-app')") is None
    finally:
        context.close()


@pytest.fixture(scope="module")
def auth_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with running_app(demo_model, tmp_path_factory, "--auth", "alice:s3cret") as server:
        yield server


def test_the_login_page_of_auth_carries_the_headers_and_logs_in_under_the_policy(
    browser, auth_server: AppServer
) -> None:
    headers = _headers(auth_server.url)
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    policy = _policy(headers)
    assert policy["frame-ancestors"] == ["'none'"] and policy["img-src"] == ["'self'", "data:", "blob:"]
    assert "'unsafe-inline'" not in policy["script-src"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(RECORD_VIOLATIONS)
    try:
        page = context.new_page()
        messages: list[str] = []
        page.on("console", lambda message: messages.append(message.text))
        page.goto(auth_server.url)
        page.get_by_label("username").fill("alice")  # the login form, not the app: the tabs are not there yet
        assert page.get_by_role("tab", name="Dataset").count() == 0
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_role("tab", name="Dataset")).to_be_visible()
        assert _csp_messages(messages) == []
        assert page.evaluate("window.__violations") == []
    finally:
        context.close()
