"""OpenAI chat routes as TGI serves them: POST /v1/chat/completions, POST /chat_tokenize, GET /v1/models.

Prompt problems (template, tools) are HTTP 422 before any stream starts; once streaming, errors
are `data: {"error": {...}}` events and the stream still ends with `data: [DONE]`.

With tools (api/tools.py) each choice is generated under the tool-call grammar; a choice whose
call is `no_tool` is generated again from the plain conversation (no tools, no grammar) and
returned as content, as TGI does. Each streamed choice is its own event source (`_content_choice`,
`_tool_choice`), merged in arrival order.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.chat_template import render_chat
from textgen.api.errors import ApiError
from textgen.api.generation import Generation, abort_on_disconnect, with_seeds
from textgen.api.openai_format import Envelope, StopTrimmer, finish_reason, logprob_entry, trimmed_text, usage
from textgen.api.openai_params import chat_parameters, check_n, validate_openai
from textgen.api.openapi_doc import GENERATION, TOKENIZE, stream_ok
from textgen.api.routes_tgi import simple_tokens
from textgen.api.schemas_openai import ChatRequest
from textgen.api.schemas_tgi import GrammarType
from textgen.api.state import AppState, app_state
from textgen.api.streaming import DONE, EventStreamResponse, merge, sse_data
from textgen.api.timing import RequestClock, stream_headers, timing_headers
from textgen.api.tools import (
    ToolCallStream, ToolPlan, arguments_delta, first_delta, next_call_id, parse_failure, plan_tools, tool_call,
)
from textgen.api.validation import ValidRequest
from textgen.core.engine.types import RequestOutput
from textgen.core.grammar import NO_TOOL_NAME

router = APIRouter()


async def render_prompt(state: AppState, body: ChatRequest, plan: ToolPlan | None) -> str:
    tools, tool_prompt = (plan.tools, plan.prompt) if plan is not None else (None, "")
    return await state.validator.run_blocking(render_chat, state.engine.tokenizer, body.messages, tools, tool_prompt)


def envelope(state: AppState, model: str | None) -> Envelope:
    served = state.model_id if model in (None, "tgi") else model
    return Envelope(served, int(time.time()), state.system_fingerprint)


class ChatJob:
    """One chat request once its prompt is rendered: validation of the tool (or plain) run."""

    def __init__(self, state: AppState, body: ChatRequest, plan: ToolPlan | None, prompt: str, n: int) -> None:
        self.state, self.body, self.plan, self.prompt, self.n = state, body, plan, prompt, n
        self.call_id = next_call_id(body.messages) if plan is not None else ""
        self._plain: asyncio.Future[list[ValidRequest]] | None = None

    async def validate(self, prompt: str, grammar: GrammarType | None) -> ValidRequest:
        params = chat_parameters(self.body)
        if grammar is not None:  # the tool grammar (response_format is refused together with tools)
            params.grammar = grammar
        valid = await validate_openai(self.state, prompt, params, presence_penalty=self.body.presence_penalty,
                                      bias=self.body.logit_bias, add_special_tokens=False)
        self.state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
        return valid

    async def first_run(self) -> list[ValidRequest]:
        return with_seeds(await self.validate(self.prompt, self.plan.grammar if self.plan else None), self.n)

    async def plain_run(self, index: int) -> ValidRequest:
        """Choice `index` of the run without tools (rendered and validated once, on first need)."""
        if self._plain is None:
            self._plain = asyncio.ensure_future(self._validate_plain())
        return (await self._plain)[index]

    async def _validate_plain(self) -> list[ValidRequest]:
        prompt = await render_prompt(self.state, self.body, None)
        return with_seeds(await self.validate(prompt, None), self.n)


@router.post("/v1/chat/completions", responses={**GENERATION, **stream_ok(json_too=True)})
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    state, clock = app_state(request), RequestClock()
    env = envelope(state, body.model)
    with state.tracked():
        plan = plan_tools(body)
        prompt = await render_prompt(state, body, plan)
        job = ChatJob(state, body, plan, prompt, check_n(body.n, state.limits))
        if body.stream:
            return EventStreamResponse(_chat_events(job, env, clock),
                                       headers=stream_headers(state.settings.compute_type, len(prompt)),
                                       keep_alive=state.settings.keep_alive_s)
        with state.service.permits.hold(job.n):
            runs = await job.first_run()
            clock.mark_validated()
            gens = await abort_on_disconnect(request, state.service.generate_many(runs))
            tool_messages = None
            if plan is not None:
                tool_messages = await abort_on_disconnect(request, _resolve_tool_calls(job, gens))
    timings = clock.timings(gens[0], runs[0].params.max_new_tokens)
    state.metrics.success(timings)
    return JSONResponse(env.chat_completion(gens, bool(body.logprobs), tool_messages),
                        headers=timing_headers(timings, state.settings.compute_type, len(prompt)))


async def _resolve_tool_calls(job: ChatJob, gens: list[Generation]) -> list[dict[str, Any] | None]:
    """Tool-call messages per choice; `no_tool` choices are generated again without tools and
    their Generation replaced in `gens` (their message is then None: plain content)."""
    calls = [tool_call(trimmed_text(g), job.plan, job.call_id) for g in gens]
    redo = [i for i, call in enumerate(calls) if call.is_no_tool]
    if redo:
        again = await job.state.service.generate_many([await job.plain_run(i) for i in redo])
        for i, gen in zip(redo, again):
            gens[i] = gen
    return [None if call.is_no_tool else call.message() for call in calls]


async def _chat_events(job: ChatJob, env: Envelope, clock: RequestClock) -> AsyncIterator[bytes]:
    state = job.state
    try:
        with state.tracked(count=False), state.service.permits.hold(job.n):
            runs = await job.first_run()
            clock.mark_validated()
            gens = [Generation(input_length=runs[0].input_length) for _ in runs]
            choice = _tool_choice if job.plan is not None else _content_choice
            async for _, chunk in merge([choice(job, env, i, valid, gens) for i, valid in enumerate(runs)]):
                yield sse_data(chunk)
            if job.body.stream_options is not None and job.body.stream_options.include_usage:
                completion_tokens = sum(g.generated_tokens for g in gens)
                yield sse_data(env.chat("chat.completion.chunk", [], usage(gens[0].input_length, completion_tokens)))
        state.metrics.success(clock.timings(gens[0], runs[0].params.max_new_tokens))
    except ApiError as exc:
        yield sse_data(exc.openai_event())
    yield DONE


def _logprobs(job: ChatJob, event: RequestOutput) -> list[dict[str, Any]]:
    return [logprob_entry(event.token, event.top_tokens)] if job.body.logprobs and event.token is not None else []


async def _content_choice(job: ChatJob, env: Envelope, i: int, valid: ValidRequest,
                          gens: list[Generation]) -> AsyncIterator[dict[str, Any]]:
    gen = gens[i] = Generation(input_length=valid.input_length)
    trimmer = StopTrimmer(valid.params.stop)
    async for event in job.state.service.stream(valid):
        gen.add(event)
        text = trimmer.feed(event.text, event.stop_sequence, event.finished)
        entries = _logprobs(job, event)
        finish = finish_reason(event.finish_reason) if event.finished else None
        yield env.chat_chunk(i, text, {"content": entries} if entries else None, finish)


async def _tool_choice(job: ChatJob, env: Envelope, i: int, valid: ValidRequest,
                       gens: list[Generation]) -> AsyncIterator[dict[str, Any]]:
    """Tokens are held until the function's name is known, then one delta per token that adds
    argument text; the logprobs of held tokens go out with the next delta."""
    gen = gens[i] = Generation(input_length=valid.input_length)
    trimmer, call, entries, started = StopTrimmer(valid.params.stop), ToolCallStream(), [], False
    events = job.state.service.stream(valid)
    try:
        async for event in events:
            gen.add(event)
            complete = event.finish_reason == "eos_token"
            piece = call.feed(trimmer.feed(event.text, event.stop_sequence, event.finished), event.finished, complete)
            entries += _logprobs(job, event)
            if call.name == NO_TOOL_NAME:
                break
            if piece is None and event.finished:
                raise parse_failure(call.text)
            if not piece and not event.finished:  # nothing to send yet; logprobs wait for the next delta
                continue
            delta = arguments_delta(piece) if started else first_delta(job.call_id, call.name, piece)
            finish = ("tool_calls" if complete else finish_reason(event.finish_reason)) if event.finished else None
            yield env.chat_delta(i, delta, {"content": entries} if job.body.logprobs else None, finish)
            started, entries = True, []
    finally:
        await events.aclose()
    if call.name == NO_TOOL_NAME:  # TGI's restart: the plain conversation, streamed as content
        async for chunk in _content_choice(job, env, i, await job.plain_run(i), gens):
            yield chunk


@router.post("/chat_tokenize", responses=TOKENIZE)
async def chat_tokenize(request: Request, body: ChatRequest) -> Response:
    state = app_state(request)
    prompt = await render_prompt(state, body, plan_tools(body))
    tokens = await simple_tokens(state, prompt, add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": prompt})


@router.get("/v1/models")
async def models(request: Request) -> Response:
    state = app_state(request)
    model_id, lora = state.model_id, state.validator.lora
    adapters = [{"id": name, "object": "model", "created": 0, "owned_by": model_id, "parent": model_id}
                for name in (lora.names() if lora is not None else [])]
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}, *adapters]})
