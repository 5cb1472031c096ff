"""OpenAI chat routes as TGI serves them: POST /v1/chat/completions, POST /chat_tokenize, GET /v1/models.

Prompt problems (template, tools) are HTTP 422 before any stream starts; once streaming, errors
are `data: {"error": {...}}` events and the stream still ends with `data: [DONE]`.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.chat_template import render_chat
from textgen.api.errors import ApiError
from textgen.api.generation import Generation, abort_on_disconnect, with_seeds
from textgen.api.openai_format import Envelope, StopTrimmer, finish_reason, logprob_entry, usage
from textgen.api.openai_params import chat_parameters, check_n, check_tools, validate_openai
from textgen.api.routes_tgi import ERRORS, simple_tokens
from textgen.api.schemas_openai import ChatRequest
from textgen.api.state import AppState, app_state
from textgen.api.streaming import DONE, EventStreamResponse, merge, sse_data
from textgen.api.timing import RequestClock, stream_headers, timing_headers

router = APIRouter()


async def render_prompt(state: AppState, body: ChatRequest) -> str:
    check_tools(body)
    return await state.validator.run_blocking(render_chat, state.engine.tokenizer, body.messages)


def envelope(state: AppState, model: str | None) -> Envelope:
    served = state.model_id if model in (None, "tgi") else model
    return Envelope(served, int(time.time()), state.system_fingerprint)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    state, clock = app_state(request), RequestClock()
    env = envelope(state, body.model)
    with state.tracked():
        prompt = await render_prompt(state, body)
        n = check_n(body.n, state.limits)
        if body.stream:
            return EventStreamResponse(_chat_events(state, body, prompt, n, env, clock),
                                       headers=stream_headers(state.settings.compute_type, len(prompt)),
                                       keep_alive=state.settings.keep_alive_s)
        with state.service.permits.hold(n):
            valid = await validate_openai(state, prompt, chat_parameters(body), presence_penalty=body.presence_penalty,
                                          bias=body.logit_bias, add_special_tokens=False)
            clock.mark_validated()
            state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
            gens = await abort_on_disconnect(request, state.service.generate_many(with_seeds(valid, n)))
    timings = clock.timings(gens[0], valid.params.max_new_tokens)
    state.metrics.success(timings)
    return JSONResponse(env.chat_completion(gens, bool(body.logprobs)),
                        headers=timing_headers(timings, state.settings.compute_type, len(prompt)))


async def _chat_events(state: AppState, body: ChatRequest, prompt: str, n: int, env: Envelope,
                       clock: RequestClock) -> AsyncIterator[bytes]:
    try:
        with state.tracked(count=False), state.service.permits.hold(n):
            valid = await validate_openai(state, prompt, chat_parameters(body), presence_penalty=body.presence_penalty,
                                          bias=body.logit_bias, add_special_tokens=False)
            clock.mark_validated()
            state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
            gens = [Generation(input_length=valid.input_length) for _ in range(n)]
            trimmers = [StopTrimmer(valid.params.stop) for _ in range(n)]
            streams = [state.service.stream(v) for v in with_seeds(valid, n)]
            async for i, event in merge(streams):
                gens[i].add(event)
                text = trimmers[i].feed(event.text, event.stop_sequence, event.finished)
                logprobs = None
                if body.logprobs and event.token is not None:
                    logprobs = {"content": [logprob_entry(event.token, event.top_tokens)]}
                finish = finish_reason(event.finish_reason) if event.finished else None
                yield sse_data(env.chat_chunk(i, text, logprobs, finish))
            if body.stream_options is not None and body.stream_options.include_usage:
                completion_tokens = sum(g.generated_tokens for g in gens)
                yield sse_data(env.chat("chat.completion.chunk", [], usage(valid.input_length, completion_tokens)))
        state.metrics.success(clock.timings(gens[0], valid.params.max_new_tokens))
    except ApiError as exc:
        yield sse_data(exc.openai_event())
    yield DONE


@router.post("/chat_tokenize")
async def chat_tokenize(request: Request, body: ChatRequest) -> Response:
    state = app_state(request)
    prompt = await render_prompt(state, body)
    tokens = await simple_tokens(state, prompt, add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": prompt})


@router.get("/v1/models")
async def models(request: Request) -> Response:
    model_id = app_state(request).model_id
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]})
