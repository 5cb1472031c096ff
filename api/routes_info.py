"""Service routes: GET /info, GET /health (also /ping and GET /), GET /metrics."""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.errors import ApiError
from textgen.api.state import AppState, app_state

router = APIRouter()
log = logging.getLogger("textgen.api")


def info(state: AppState) -> dict[str, object]:
    """TGI's Info in serde order, then textgen's additions (older TGI had model_dtype and
    model_device_type here too)."""
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
        "prefix_caching": c.enable_prefix_caching,
    }


@router.get("/info")
async def get_info(request: Request) -> Response:
    return JSONResponse(info(app_state(request)))


async def healthy(state: AppState) -> bool:
    """TGI's /health runs a real generation step; a dead engine thread fails at once."""
    if not state.engine.is_healthy():
        return False
    try:
        await asyncio.wait_for(state.engine.health_check(), state.settings.health_timeout_s)
    except Exception:  # noqa: BLE001 - any failure means unhealthy
        log.exception("health check failed")
        return False
    return True


@router.get("/health", responses={503: {"description": "unhealthy"}})
@router.get("/ping", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def health(request: Request) -> Response:
    if await healthy(app_state(request)):
        return Response(status_code=200)
    return ApiError(503, "unhealthy", "healthcheck").response()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(app_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
