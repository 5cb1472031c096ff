"""What each route can answer, for the OpenAPI spec at /api-doc/openapi.json.

The spec documents every status and content type a route really produces (schemathesis checks
it in CI): the middleware's 400/401/413/415 and the drain's 503 are as much a route's answers as
its own 422 or 424. Routes pick their entries from here so one status is described one way.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    """TGI's error object (reference §1.2)."""

    error: str
    error_type: str


class HealthError(ErrorResponse):
    """/health's 503: TGI's `{"error": "unhealthy", "error_type": "healthcheck"}` plus why."""

    reason: str


DESCRIPTIONS = {
    400: "Malformed JSON body",
    401: "Missing or wrong API key (only when the server has --api-key)",
    413: "Request body larger than --payload-limit",
    415: "Content-Type is not application/json",
    422: "Input validation error",
    424: "Generation error",
    429: "Model is overloaded",
    500: "Incomplete generation",
    503: "The server is draining (shutting down) and admits no new request",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


def stream_ok(json_too: bool) -> dict[int | str, dict[str, Any]]:
    """200 as server-sent events (and as JSON where `stream: false` is possible)."""
    event = {"type": "object", "description": "one server-sent event: `data` is a JSON object (or `[DONE]`)",
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    content: dict[str, Any] = {"text/event-stream": {"schema": event}}
    if json_too:
        content["application/json"] = {"schema": {}}
    return {200: {"description": "Generated text (server-sent events when streaming)", "content": content}}


def only_event_stream(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """FastAPI adds `application/json` to every 200; a route that only streams drops it (in place)."""
    content = schema["paths"][path]["post"]["responses"]["200"]["content"]
    content.pop("application/json", None)
    return schema


def install(app: Any, stream_only_paths: tuple[str, ...]) -> None:
    """Wraps `app.openapi` so the generated spec says what the stream-only routes answer."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for path in stream_only_paths:
            only_event_stream(schema, path)
        return schema

    app.openapi = openapi


GENERATION = errors(400, 401, 413, 415, 422, 424, 429, 500, 503)  # POST routes that generate
TOKENIZE = errors(400, 401, 413, 415, 422, 503)  # POST routes that only tokenize or render
PLAIN_TEXT = {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
