"""TGI's error model: `{"error": str, "error_type": str}` with TGI's status codes and texts.

Every failure a client can see is an `ApiError`; handlers raise it, the server turns it into a
JSON response, and streaming routes turn it into an in-stream event (TGI keeps status 200 once the
stream has started; OpenAI streams carry `{"error": {"message", "http_status_code": 422}}`).
`metric_label` is the `err` label of `tgi_request_failure` (None: not counted).
"""
from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str, metric_label: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.metric_label = metric_label

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def openai_event(self) -> dict[str, object]:
        """TGI's `into_openai_event`: always 422 whatever the cause."""
        return {"error": {"message": self.message, "http_status_code": 422}}


def validation_error(message: str) -> ApiError:
    return ApiError(422, f"Input validation error: {message}", "validation", "validation")


def overloaded() -> ApiError:
    return ApiError(429, "Model is overloaded", "overloaded", "overloaded")


def generation_error(message: str) -> ApiError:
    return ApiError(424, f"Request failed during generation: Server error: {message}", "generation", "generation")


def incomplete_generation(stream: bool = False) -> ApiError:
    if stream:
        return ApiError(500, "Incomplete generation stream", "incomplete_generation_stream", "incomplete")
    return ApiError(500, "Incomplete generation", "incomplete_generation", "incomplete")


def template_error(message: str) -> ApiError:
    return ApiError(422, f"Template error: {message}", "template_error", "template")


def tool_error(message: str) -> ApiError:
    return ApiError(422, f"Tool error: {message}", "tool_error", "validation")


def deserialize_error(message: str) -> ApiError:
    """axum's Json extractor rejection for a body of the wrong shape (TGI answers it in plain
    text; textgen keeps TGI's status and text inside the usual JSON error object)."""
    return ApiError(422, f"Failed to deserialize the JSON body into the target type: {message}", "validation",
                    "validation")


def invalid_json(message: str) -> ApiError:
    return ApiError(400, f"Failed to parse the request body as JSON: {message}", "invalid_json")


def unsupported_media_type() -> ApiError:
    return ApiError(415, "Expected request with `Content-Type: application/json`", "unsupported_media_type")


def payload_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Payload too large: the request body exceeds {limit} bytes", "payload_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized: missing or invalid API key", "unauthorized")


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """serde-style text for a body's first problem: `parameters.max_new_tokens: <message>`."""
    if not errors:
        return "invalid body"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its request has been aborted."""
