"""/docs, /redoc and Swagger's OAuth2 redirect page under the dashboard's security headers.

The pages come from fastapi-offline, which sets no headers; Swagger UI starts from an inline script, so the
policy admits each inline script of the page by its hash (never 'unsafe-inline'), and ReDoc's search worker
starts from a blob: URL.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.dashboard.routes import SECURITY_HEADERS

DOCS_PAGES = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def docs_headers(page: bytes) -> dict[str, str]:
    """The dashboard's headers, with the page's own inline scripts allowed by their sha256."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(page)
    )
    policy = SECURITY_HEADERS["Content-Security-Policy"].replace("script-src 'self'", f"script-src 'self'{hashes}")
    return {**SECURITY_HEADERS, "Content-Security-Policy": f"{policy}; worker-src blob:"}


class DocsSecurityHeaders:
    """Every other response passes through untouched; a docs page (a few KiB) is held until its last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PAGES:
            return await self.app(scope, receive, send)
        start: Message = {}
        chunks: list[bytes] = []

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(chunks)
            headers = MutableHeaders(raw=list(start["headers"]))
            headers.update(docs_headers(page))
            await send({**start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, with_headers)
