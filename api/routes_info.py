"""Service routes: GET /info, GET /health (also /ping and GET /), GET /metrics."""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from textgen.api.openapi_doc import PLAIN_TEXT, HealthError
from textgen.api.state import AppState, app_state

router = APIRouter()
log = logging.getLogger("textgen.api")


def info(state: AppState) -> dict[str, object]:
    """TGI's Info in serde order, then textgen's additions (older TGI had model_dtype and
    model_device_type here too; `quantize` is the method by its --quantize name, null for plain
    weights, `quantization` its description and `weight_bytes` the loaded weights' size)."""
    c, s, e = state.engine.config, state.settings, state.engine
    return {
        "model_id": state.model_id, "model_sha": s.model_sha, "model_pipeline_tag": s.model_pipeline_tag,
        "max_concurrent_requests": c.max_concurrent_requests, "max_best_of": c.max_best_of,
        "max_stop_sequences": c.max_stop_sequences, "max_input_tokens": c.max_input_tokens,
        "max_total_tokens": c.max_total_tokens, "validation_workers": s.validation_workers,
        "max_client_batch_size": s.max_client_batch_size, "router": "text-generation-router",
        "version": state.version, "sha": None, "docker_label": s.docker_label,
        "model_dtype": e.dtype, "model_device_type": e.device, "backend": e.backend_name,
        "max_batch_total_tokens": c.max_batch_total_tokens, "max_batch_prefill_tokens": c.max_batch_prefill_tokens,
        "max_batch_size": c.max_batch_size, "max_top_n_tokens": c.max_top_n_tokens,
        "waiting_served_ratio": c.waiting_served_ratio, "block_size": c.block_size,
        "prefix_caching": c.enable_prefix_caching, "speculate": c.speculate,
        "quantize": e.quantize, "quantization": e.quantization, "weight_bytes": e.weight_bytes,
        "lora_adapters": state.validator.lora.names() if state.validator.lora is not None else [],
    }


@router.get("/info")
async def get_info(request: Request) -> Response:
    return JSONResponse(info(app_state(request)))


async def unhealthy_reason(state: AppState) -> str | None:
    """None when healthy. TGI's /health runs a real generation step; a drain, a dead engine
    thread or a stuck step (the watchdog) fail at once, without queueing a generation."""
    if state.drain.draining:
        return "draining: the server is shutting down"
    watchdog = state.settings.watchdog_timeout_s
    problem = state.engine.health_problem(watchdog)
    if problem is not None:
        return problem
    try:
        await asyncio.wait_for(state.engine.health_check(), min(state.settings.health_timeout_s, watchdog))
    except TimeoutError:
        # it waited `watchdog` seconds: a loop stuck all along is past the watchdog by now
        return state.engine.health_problem(watchdog) or f"the health generation took longer than {watchdog:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        log.exception("health check failed")
        return f"the health generation failed: {exc}"
    return None


@router.get("/health", response_class=Response, responses={
    200: {"description": "Healthy: empty body (TGI's answer)"},
    503: {"description": "Unhealthy, draining, or the engine is dead or stuck; `reason` says which",
          "model": HealthError}})
@router.get("/ping", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def health(request: Request) -> Response:
    reason = await unhealthy_reason(app_state(request))
    if reason is None:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck", "reason": reason}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, responses=PLAIN_TEXT)
async def metrics(request: Request) -> Response:
    return Response(app_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
