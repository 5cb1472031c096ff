"""create_app(engine, settings) -> the FastAPI app with TGI's and OpenAI's routes.

Bodies are parsed by pydantic models (so /docs documents them); a malformed body becomes TGI's
400 (bad JSON) or 422 (wrong shape) with TGI's texts, inside the usual JSON error object.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from textgen.api import openapi_doc, routes_completions, routes_info, routes_openai, routes_tgi
from textgen.api.errors import (ApiError, ClientDisconnected, describe_validation_errors, deserialize_error,
                                invalid_json)
from textgen.api.lifecycle import DrainMiddleware
from textgen.api.middleware import GuardMiddleware
from textgen.api.routes_ui import add_ui_routes
from textgen.api.tracing import TracingMiddleware
from textgen.api.schemas_openai import ChatRequest, CompletionRequest
from textgen.api.schemas_tgi import CompatGenerateRequest
from textgen.api.state import AppState, ServerSettings, app_state

log = logging.getLogger("textgen.api")


def _request_error(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return invalid_json(str(first.get("ctx", {}).get("error", first.get("msg", ""))))
    return deserialize_error(describe_validation_errors(errors))


async def _on_request_error(request: Request, exc: RequestValidationError) -> Response:
    return _request_error(list(exc.errors())).response()


async def _on_api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # never read: the client is gone


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"Internal server error: {type(exc).__name__}", "internal").response()


async def _on_http_error(request: Request, exc: HTTPException) -> Response:
    """404/405 in TGI's error format; a 405 keeps Starlette's `Allow` header (RFC 9110 requires it)."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    response = ApiError(exc.status_code, str(exc.detail), kind).response()
    response.headers.update(exc.headers or {})
    return response


def _parse(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise deserialize_error(describe_validation_errors(list(exc.errors()))) from None


async def invocations(request: Request) -> Response:
    """SageMaker: the body decides the route (TGI's untagged SagemakerRequest, tried in order)."""
    try:
        payload = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_json(str(exc)) from None
    state = app_state(request)
    if isinstance(payload, dict) and "inputs" in payload:
        return await routes_tgi.compat_response(state, request, _parse(CompatGenerateRequest, payload))
    if isinstance(payload, dict) and "messages" in payload:
        return await routes_openai.chat_completions(request, _parse(ChatRequest, payload))
    if isinstance(payload, dict) and "prompt" in payload:
        return await routes_completions.completions(request, _parse(CompletionRequest, payload))
    raise deserialize_error("data did not match any variant of untagged enum SagemakerRequest")


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = AppState.build(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        if settings.grpc_port is not None:
            from textgen.api.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(state, settings.hostname, settings.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)

    app = FastAPI(title="textgen", version=state.version, docs_url=None, openapi_url="/api-doc/openapi.json",
                  redoc_url=None, lifespan=lifespan,
                  description="Text generation server compatible with text-generation-inference and OpenAI clients")
    app.state.textgen = state
    for router in (routes_tgi.router, routes_openai.router, routes_completions.router, routes_info.router):
        app.include_router(router)
    if settings.allow_runtime_lora_updating:
        from textgen.api import routes_lora

        app.include_router(routes_lora.router)
    add_ui_routes(app, "/api-doc/openapi.json")
    openapi_doc.install(app, stream_only_paths=("/generate_stream",))
    app.add_api_route("/invocations", invocations, methods=["POST"],
                      responses={**openapi_doc.GENERATION, **openapi_doc.stream_ok(json_too=True)})
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_request_error)
    app.add_exception_handler(ClientDisconnected, _on_disconnect)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, payload_limit=settings.payload_limit)
    app.add_middleware(DrainMiddleware, drain=state.drain)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origin or ["*"],
                       allow_methods=["GET", "POST"], allow_headers=["content-type"])
    if settings.tracing:  # outermost: the root span covers the other middlewares' answers too
        app.add_middleware(TracingMiddleware, model=state.model_id)
    return app
