"""ASGI middleware for TGI's cross-cutting rules (reference §1.2), checked in this order: Bearer
auth on the base routes only (compared case-insensitively, as TGI lowercases both sides; 401),
a JSON content type on JSON routes (415), and the request body limit (413), enforced on
Content-Length and on the bytes actually received (the body is read before the app runs)."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.api.errors import ApiError, payload_too_large, unauthorized, unsupported_media_type

PROTECTED_ROUTES = frozenset(("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                              "/vertex", "/invocations", "/tokenize"))
JSON_ROUTES = PROTECTED_ROUTES | {"/chat_tokenize"}


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, payload_limit: int) -> None:
        self.app = app
        self.expected_auth = f"bearer {api_key}".lower() if api_key else None
        self.payload_limit = payload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self._refusal(scope, headers)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(receive)
            if body is _DISCONNECTED:
                return
            if body is None:
                await payload_too_large(self.payload_limit).response()(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive) -> bytes | object | None:
        """The whole body (at most payload_limit bytes, so buffering it is bounded), None when it
        is larger, _DISCONNECTED when the client left while sending it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _DISCONNECTED
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.payload_limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        if (self.expected_auth is not None and scope["method"] == "POST" and scope["path"] in PROTECTED_ROUTES
                and headers.get("authorization", "").lower() != self.expected_auth):
            return unauthorized()
        if scope["method"] == "POST" and scope["path"] in JSON_ROUTES and not _is_json(headers.get("content-type")):
            return unsupported_media_type()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.payload_limit:
            return payload_too_large(self.payload_limit)
        return None



_DISCONNECTED = object()


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the buffered body to the app once, then the real channel (which reports disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(content_type: str | None) -> bool:
    """axum's rule: `application/json` or any `application/*+json`, parameters ignored."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
