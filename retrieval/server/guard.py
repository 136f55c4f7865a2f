"""Who may talk to the web app: Host-header checks against DNS rebinding, request body caps, HEAD as GET."""

from __future__ import annotations

import ipaddress
from typing import Optional

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


TEST_HOST = "testserver"  # the Host header of Starlette's TestClient: accepted only by create_app(for_tests=True)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host part of a Host header: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """Pure ASGI middleware: Host allow-list (DNS rebinding) and a hard cap on request bodies.

    The body cap is checked on Content-Length before anything is read, and again while the body streams in
    (chunked uploads have no Content-Length), so an oversized upload is never spooled to disk whole.
    """

    def __init__(self, app, allowed_hosts: Optional[list[str]], max_body: int):
        self.app = app
        self.allowed = (
            None if allowed_hosts is None or "*" in allowed_hosts else {h.lower().strip("[]") for h in allowed_hosts}
        )
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed is not None and _host_name(headers.get("host", "")) not in self.allowed:
            return await _error(400, "invalid Host header")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await _error(400, "invalid Content-Length")(scope, receive, send)
            if too_big:
                return await _error(413, f"request body over the {self.max_body} byte limit")(scope, receive, send)
        seen = 0
        limit = self.max_body

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises HTTPException from body parsing, so this becomes a 413 JSON response
                    raise StarletteHTTPException(413, f"request body over the {limit} byte limit")
            return message

        return await self.app(scope, capped_receive, send)


class _HeadAsGet:
    """HEAD answers exactly like GET, without the body: the request is routed as a GET (scope key
    `retrieval.head` tells an endpoint it may skip producing the body) and body bytes are dropped."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def no_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET", "retrieval.head": True}, receive, no_body)
