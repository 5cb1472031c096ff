"""Runtime LoRA adapter loading, vLLM's routes and bodies: POST /v1/load_lora_adapter
{"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}.

Mounted only with `--allow-runtime-lora-updating` (vLLM gates them with the env var
VLLM_ALLOW_RUNTIME_LORA_UPDATING; without it the paths do not exist: 404). Success answers vLLM's
plain-text line; failures TGI's error object. Reading and checking an adapter runs in a worker
thread; its weights reach the model on the engine thread when a request first needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.responses import PlainTextResponse, Response

from textgen.api.errors import ApiError
from textgen.api.state import app_state
from textgen.core.lora import AdapterSpec, LoraError

if TYPE_CHECKING:
    from textgen.core.lora.manager import LoraManager

router = APIRouter()
_ERRORS = {400: {"description": "The adapter cannot be loaded"}, 404: {"description": "No such adapter"}}


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_int_id: int | None = None  # vLLM accepts it; the name decides


def _manager(request: Request) -> LoraManager:
    manager = app_state(request).engine.lora
    if manager is None:  # the engine was started without LoRA support
        raise ApiError(400, "LoRA adapters are not enabled", "lora_error")
    return manager


@router.post("/v1/load_lora_adapter", responses=_ERRORS)
async def load_lora_adapter(request: Request, body: LoadLoraAdapterRequest) -> Response:
    manager = _manager(request)
    try:
        spec = AdapterSpec.parse(f"{body.lora_name}={body.lora_path}")
        await anyio.to_thread.run_sync(manager.register, spec)
    except LoraError as exc:
        raise ApiError(400, str(exc), "lora_error") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses=_ERRORS)
async def unload_lora_adapter(request: Request, body: UnloadLoraAdapterRequest) -> Response:
    try:
        _manager(request).unregister(body.lora_name)
    except LoraError as exc:
        raise ApiError(404, str(exc), "not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
