"""TGI's generation routes: POST /generate, POST / (compat), POST /generate_stream, POST /tokenize."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.errors import ApiError, validation_error
from textgen.api.generation import Generation, abort_on_disconnect, with_seeds
from textgen.api.openapi_doc import GENERATION, TOKENIZE, stream_ok
from textgen.api.schemas_tgi import CompatGenerateRequest, GenerateRequest
from textgen.api.state import AppState, app_state
from textgen.api.streaming import EventStreamResponse, sse_data
from textgen.api.tgi_format import best_of, generate_response, stream_event
from textgen.api.timing import RequestClock, stream_headers, timing_headers
from textgen.api.validation import check_best_of

router = APIRouter()


async def generate_json(state: AppState, request: Request | None, body: GenerateRequest,
                        full_text: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The non-streaming path shared by /generate, /, /invocations and gRPC. With an HTTP
    request, a client disconnect aborts the generation."""
    clock = RequestClock()
    p = body.parameters
    with state.tracked():
        n = check_best_of(p.best_of, state.limits) if (p.best_of or 1) > 1 else 1
        with state.service.permits.hold(n):
            valid = await state.validator.validate(body.inputs, p)
            clock.mark_validated()
            state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
            work = state.service.generate_many(with_seeds(valid, n))
            gens = await (abort_on_disconnect(request, work) if request is not None else work)
    best, others = best_of(gens)
    timings = clock.timings(best, valid.params.max_new_tokens)
    state.metrics.success(timings)
    headers = timing_headers(timings, state.settings.compute_type, len(body.inputs))
    return generate_response(best, valid, others, body.inputs if full_text else ""), headers


async def tgi_stream(state: AppState, body: GenerateRequest, full_text: bool) -> AsyncIterator[dict[str, Any]]:
    """StreamResponse bodies, shared by the SSE routes and gRPC; failures raise ApiError."""
    clock, p = RequestClock(), body.parameters
    prefix = body.inputs if full_text else ""
    with state.tracked():
        if (p.best_of or 1) != 1:
            raise validation_error("`best_of` != 1 is not supported when streaming tokens")
        if p.decoder_input_details:
            raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
        with state.service.permits.hold():
            valid = await state.validator.validate(body.inputs, p)
            clock.mark_validated()
            state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
            gen, index = Generation(input_length=valid.input_length), 0
            async for event in state.service.stream(valid):
                gen.add(event)
                index += 1
                yield stream_event(index, event, gen, valid, prefix)
    state.metrics.success(clock.timings(gen, valid.params.max_new_tokens))


def generate_stream_response(state: AppState, body: GenerateRequest, full_text: bool) -> EventStreamResponse:
    """Errors after this point (overloaded, validation, generation) are `data: {error}` events."""
    return EventStreamResponse(_sse(tgi_stream(state, body, full_text)),
                               headers=stream_headers(state.settings.compute_type, len(body.inputs)),
                               keep_alive=state.settings.keep_alive_s)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield sse_data(event)
    except ApiError as exc:
        yield sse_data(exc.body())
    finally:
        await events.aclose()


@router.post("/generate", responses=GENERATION)
async def generate(request: Request, body: GenerateRequest) -> Response:
    state = app_state(request)
    payload, headers = await generate_json(state, request, body, bool(body.parameters.return_full_text))
    return JSONResponse(payload, headers=headers)


@router.post("/generate_stream", responses={**GENERATION, **stream_ok(json_too=False)})
async def generate_stream(request: Request, body: GenerateRequest) -> Response:
    state = app_state(request)
    return generate_stream_response(state, body, bool(body.parameters.return_full_text))


async def compat_response(state: AppState, request: Request, body: CompatGenerateRequest) -> Response:
    full_text = body.parameters.return_full_text
    if full_text is None:
        full_text = state.settings.compat_return_full_text
    if body.stream:
        return generate_stream_response(state, body, full_text)
    payload, headers = await generate_json(state, request, body, full_text)
    return JSONResponse([payload], headers=headers)


@router.post("/", responses={**GENERATION, **stream_ok(json_too=True)})
async def compat_generate(request: Request, body: CompatGenerateRequest) -> Response:
    return await compat_response(app_state(request), request, body)


@router.post("/tokenize", responses=TOKENIZE)
async def tokenize(request: Request, body: GenerateRequest) -> Response:
    state = app_state(request)
    return JSONResponse(await simple_tokens(state, body.inputs, add_special_tokens=True))


async def simple_tokens(state: AppState, text: str, add_special_tokens: bool) -> list[dict[str, Any]]:
    """TGI's SimpleToken list: offsets are UTF-8 byte offsets into `text` (Rust string indices)."""
    return await state.validator.run_blocking(_simple_tokens, state.engine.tokenizer, text, add_special_tokens)


def _simple_tokens(tokenizer: Any, text: str, add_special_tokens: bool) -> list[dict[str, Any]]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, ValueError):  # slow tokenizer: no offsets
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [{"id": i, "text": "", "start": 0, "stop": 0} for i in ids]
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
    return [{"id": int(i), "text": text[s:e], "start": byte_at[s], "stop": byte_at[e]}
            for i, (s, e) in zip(enc["input_ids"], offsets)]
