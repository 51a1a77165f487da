"""ui/http_headers.py without a browser: hashes of exactly a page's own inline scripts, headers on every kind of
response, streamed responses left streaming."""

from __future__ import annotations

import base64
import hashlib

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ui.http_headers import content_security_policy, security_middleware

PAGE = (
    "<html><head><script>window.a = 1;</script><script src='./assets/x.js'></script>"
    '<script type="module">\nwindow.b = 2;\n</script></head><body><script>window.a = 1;</script></body></html>'
)


def _sha(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def _script_src(policy: str) -> list[str]:
    return next(part.split()[1:] for part in policy.split("; ") if part.startswith("script-src "))


def test_inline_scripts_are_allowed_by_their_hash_and_nothing_else() -> None:
    assert _script_src(content_security_policy(PAGE.encode())) == [
        "'self'",
        "'unsafe-eval'",
        _sha("window.a = 1;"),  # once, though the page has it twice
        _sha("\nwindow.b = 2;\n"),
    ]
    assert _script_src(content_security_policy()) == ["'self'", "'unsafe-eval'"]


def _client() -> TestClient:
    async def stream():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    routes = [
        Route("/", lambda request: HTMLResponse(PAGE, headers={"X-Frame-Options": "SAMEORIGIN"})),
        Route("/api", lambda request: JSONResponse({"ok": True})),
        Route("/events", lambda request: StreamingResponse(stream(), media_type="text/event-stream")),
    ]
    return TestClient(Starlette(routes=routes, middleware=security_middleware()))


def test_every_response_gets_the_headers_once() -> None:
    client = _client()
    for path in ("/", "/api", "/events"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers.get_list("x-frame-options") == ["DENY"]  # ours replaces the route's
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page = client.get("/")
    assert page.text == PAGE
    assert int(page.headers["content-length"]) == len(PAGE.encode())
    assert _sha("window.a = 1;") in page.headers["content-security-policy"]
    assert client.get("/events").text == "data: 1\n\ndata: 2\n\n"
