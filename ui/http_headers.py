"""Security headers on every response of the Gradio server (issue #18 point 10).

The app reads and writes files on this machine, so its page must not be framed by another site (clickjacking),
must not load scripts or images from elsewhere (an injected `<img src="http://...">` would leak that the page
was opened, or carry data out in its URL), and the browser must not guess content types (nosniff).

Gradio 6.31 has no option for response headers; `Blocks.launch(app_kwargs=...)` hands its keywords to the FastAPI
constructor, whose `middleware=` list is the one way in before the server starts (Starlette refuses
`add_middleware` once it runs). Middleware given there sits inside Gradio's CORS and Brotli middleware, so the
page it sees is not yet compressed.

What Gradio's page needs beyond `'self'`, found by reading its template and bundle and checked in chromium
(tests/browser/test_security_headers.py):
- its index.html carries inline `<script>` blocks, one holding the app's config (different for every app and
  page), so each HTML response gets the sha256 hashes of exactly its own inline scripts: no `'unsafe-inline'`;
- `gr.HTML` renders `html_template` and runs `js_on_load` with `Function(...)` (the Monitor tab's live panel uses
  both), which only `'unsafe-eval'` allows: without it chromium reports an EvalError and the panel stays empty;
- Svelte sets `style=` attributes and Gradio injects theme and `css=` `<style>` elements at run time, hence
  `style-src 'unsafe-inline'` (styles cannot run code);
- thumbnails and previews are `blob:` and `data:` URLs.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCRIPT_SOURCES = "'self' 'unsafe-eval'"
DIRECTIVES = (
    "default-src 'self'",
    "script-src {scripts}",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "frame-src 'self'",
    "frame-ancestors 'none'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
)
FIXED_HEADERS = {
    "x-frame-options": "DENY",  # for browsers that predate `frame-ancestors`
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_OURS = {"content-security-policy", *FIXED_HEADERS}  # dropped from a route's own headers, so each is sent once
# An inline script: a <script> tag without src=, and its text. Gradio's template escapes "<" inside the config
# JSON, so "</script>" only ever ends a script.
INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>", re.DOTALL | re.IGNORECASE)


def content_security_policy(html: bytes = b"") -> str:
    """The policy for one response: `'self'` sources, plus the hashes of the inline scripts of `html`."""
    hashes = [
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in dict.fromkeys(INLINE_SCRIPT.findall(html))
        if script
    ]
    scripts = " ".join([SCRIPT_SOURCES, *hashes])
    return "; ".join(DIRECTIVES).format(scripts=scripts)


def security_middleware() -> list[Middleware]:
    """The `middleware=` list for `Blocks.launch(app_kwargs=...)`."""
    return [Middleware(SecurityHeaders)]


class SecurityHeaders:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would buffer Gradio's event streams): adds the headers
    to every HTTP response, holding back only uncompressed HTML until its body is complete to hash its scripts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in _OURS]
                message = {**message, "headers": headers}
                if _is_plain_html(headers):
                    start = message  # sent with the whole body below
                    return
                await send(_with_policy(message, b""))
            elif message["type"] == "http.response.body" and start is not None:
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                html = b"".join(body)
                await send(_with_policy(start, html))
                await send({"type": "http.response.body", "body": html})
            else:
                await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_plain_html(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {k.lower(): v for k, v in headers}
    return names.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in names


def _with_policy(start: Message, html: bytes) -> Message:
    extra = [("content-security-policy", content_security_policy(html)), *FIXED_HEADERS.items()]
    headers = [*start["headers"], *((k.encode(), v.encode()) for k, v in extra)]
    return {**start, "headers": headers}
