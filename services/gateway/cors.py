"""Cross-origin calls to the HTTP API from web pages (CORS), for the origins the operator names
(`--http-cors-origins`): preflights answered here, answers marked readable by those pages. Other origins get no CORS
headers, so browsers keep the API's answers from their pages; clients that are not browsers never send `Origin`
and are not affected. Keys travel in `Authorization`, never in cookies, so credentials are not allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.gateway.asgi import App, Receive, Scope, Send

METHODS = b"GET, POST"
# What a page's script may read of an answer beyond the CORS-safelisted headers: the retry delays OpenAI's SDKs
# honour, the trace id (also as the request id the SDKs show), the response-cache result and the key's rate limits.
EXPOSED = b", ".join([b"retry-after", b"retry-after-ms", b"x-lmesh-trace-id", b"x-request-id", b"x-lmesh-cache",
                      *(f"x-ratelimit-{what}-{kind}".encode() for kind in ("requests", "tokens")
                        for what in ("limit", "remaining", "reset"))])
PREFLIGHT_MAX_AGE_S = b"600"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


class Cors:
    """ASGI middleware in front of `app` letting pages from `origins` (`*`: any) call it."""

    def __init__(self, app: App, origins: Sequence[str]) -> None:
        self.app = app
        self._any = "*" in origins
        self._origins = frozenset(origin.encode() for origin in origins)

    def allows(self, origin: bytes) -> bool:
        return self._any or origin in self._origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or not self.allows(origin):
            await self.app(scope, receive, send)
            return
        allowed = [(b"access-control-allow-origin", b"*" if self._any else origin), (b"vary", b"origin")]
        requested = _header(scope, b"access-control-request-method")
        if scope["method"] == "OPTIONS" and requested is not None:  # a preflight: answered here, never by the app
            headers = [*allowed, (b"access-control-allow-methods", METHODS),
                       (b"access-control-max-age", PREFLIGHT_MAX_AGE_S), (b"content-length", b"0")]
            if (asked := _header(scope, b"access-control-request-headers")) is not None:
                headers.append((b"access-control-allow-headers", asked))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *allowed,
                                      (b"access-control-expose-headers", EXPOSED)]
            await send(message)

        await self.app(scope, receive, marked)
