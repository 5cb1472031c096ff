"""POST /v1/completions (OpenAI legacy completions) as TGI serves it: up to max_client_batch_size
prompts run concurrently; the non-streaming body sums usage over prompts; a stream interleaves
the prompts' tokens (`finish_reason: ""` until each prompt's last event, which carries its usage)
and ends with `data: [DONE]`. Choice index = prompt index * n + choice number.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.errors import ApiError
from textgen.api.generation import Generation, abort_on_disconnect, with_seeds
from textgen.api.openai_format import Envelope, StopTrimmer, finish_reason, trimmed_text, usage
from textgen.api.openai_params import check_n, completion_parameters, validate_openai
from textgen.api.routes_tgi import ERRORS
from textgen.api.schemas_openai import CompletionRequest
from textgen.api.state import AppState, app_state
from textgen.api.streaming import DONE, EventStreamResponse, merge, sse_data
from textgen.api.timing import RequestClock, stream_headers, summed_headers
from textgen.api.validation import ValidRequest

router = APIRouter()


def check_prompts(state: AppState, body: CompletionRequest) -> list[str]:
    if body.suffix is not None:
        raise ApiError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                       "suffix not supported", "validation")
    prompts = body.prompts()
    limit = state.settings.max_client_batch_size
    if len(prompts) > limit:
        raise ApiError(422, f"Number of prompts exceeds the maximum allowed batch size of {limit}",
                       "batch size exceeded", "validation")
    return prompts


async def _validate_all(state: AppState, body: CompletionRequest, prompts: list[str], n: int) -> list[ValidRequest]:
    valids = []
    for prompt in prompts:
        valid = await validate_openai(state, prompt, completion_parameters(body), presence_penalty=body.presence_penalty,
                                      bias=None, add_special_tokens=True)
        state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
        valids.extend(with_seeds(valid, n))
    return valids


@router.post("/v1/completions", responses=ERRORS)
async def completions(request: Request, body: CompletionRequest) -> Response:
    state, clock = app_state(request), RequestClock()
    env = Envelope(state.model_id, int(time.time()), state.system_fingerprint)
    with state.tracked():
        prompts = check_prompts(state, body)
        n = check_n(body.n, state.limits)
        characters = sum(len(p) for p in prompts)
        if body.stream:
            return EventStreamResponse(_completion_events(state, body, prompts, n, env, clock),
                                       headers=stream_headers(state.settings.compute_type, characters),
                                       keep_alive=state.settings.keep_alive_s)
        with state.service.permits.hold(len(prompts) * n):
            valids = await _validate_all(state, body, prompts, n)
            clock.mark_validated()
            gens = await abort_on_disconnect(request, state.service.generate_many(valids))
    timings = [clock.timings(g, v.params.max_new_tokens) for g, v in zip(gens, valids)]
    state.metrics.success(timings[0])
    choices = [env.completion_choice(k, trimmed_text(g), finish_reason(g.finish_reason)) for k, g in enumerate(gens)]
    prompt_tokens = sum(v.input_length for v in valids[::n])
    body_json = env.completion(choices, usage(prompt_tokens, sum(g.generated_tokens for g in gens)))
    return JSONResponse(body_json, headers=summed_headers(timings, state.settings.compute_type, characters))


async def _completion_events(state: AppState, body: CompletionRequest, prompts: list[str], n: int, env: Envelope,
                             clock: RequestClock) -> AsyncIterator[bytes]:
    try:
        with state.tracked(count=False), state.service.permits.hold(len(prompts) * n):
            valids = await _validate_all(state, body, prompts, n)
            clock.mark_validated()
            gens = [Generation(input_length=v.input_length) for v in valids]
            trimmers = [StopTrimmer(v.params.stop) for v in valids]
            async for k, event in merge([state.service.stream(v) for v in valids]):
                gens[k].add(event)
                text = trimmers[k].feed(event.text, event.stop_sequence, event.finished)
                if not event.finished:
                    yield sse_data(env.completion([env.completion_choice(k, text, "")], None))
                    continue
                choice = env.completion_choice(k, text, finish_reason(event.finish_reason))
                yield sse_data(env.completion([choice], usage(valids[k].input_length, gens[k].generated_tokens)))
        state.metrics.success(clock.timings(gens[0], valids[0].params.max_new_tokens))
    except ApiError as exc:
        yield sse_data(exc.openai_event())
    yield DONE
