"""POST /v1/completions (OpenAI legacy completions) as TGI serves it: up to max_client_batch_size
prompts run concurrently; the non-streaming body sums usage over prompts; a stream interleaves
the prompts' tokens (`finish_reason: ""` until each prompt's last event, which carries its usage)
and ends with `data: [DONE]`. Choice index = prompt index * n + choice number.

OpenAI extensions over TGI: `echo` prepends the prompt to the text (a stream sends it in the
choice's first chunk); `logprobs: k` returns OpenAI's legacy object `{tokens, token_logprobs,
top_logprobs, text_offset}` (the k most likely alternatives plus the chosen token per step; with
`echo`, the prompt tokens first, the first one with a null logprob); `text_offset` indexes the
choice's `text`, special tokens (BOS, EOS) take no characters.
"""
from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from textgen.api.errors import ApiError
from textgen.api.generation import Generation, abort_on_disconnect, with_seeds
from textgen.api.openai_format import Envelope, StopTrimmer, finish_reason, trimmed_text, usage
from textgen.api.openai_params import check_n, completion_parameters, validate_openai
from textgen.api.openapi_doc import GENERATION, stream_ok
from textgen.api.schemas_openai import CompletionRequest
from textgen.api.state import AppState, app_state
from textgen.api.streaming import DONE, EventStreamResponse, merge, sse_data
from textgen.api.timing import RequestClock, stream_headers, summed_headers
from textgen.api.validation import ValidRequest
from textgen.core.engine.types import RequestOutput, TokenInfo

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
                                      bias=body.logit_bias, add_special_tokens=True,
                                      prompt_logprobs=body.echo and body.logprobs is not None)
        state.metrics.validated(valid.input_length, valid.params.max_new_tokens)
        valids.extend(with_seeds(valid, n))
    return valids


@dataclass(slots=True)
class LegacyLogprobs:
    """OpenAI's completions `logprobs` object, built event by event. Invariant: `offset` is the
    length of the choice text written so far, so each token's `text_offset` indexes that text."""

    offset: int = 0

    def prompt(self, tokens: list[TokenInfo], prompt_text: str) -> dict[str, list[Any]]:
        out = self._entries([(t, None) for t in tokens])
        out["top_logprobs"] = [None if t.logprob is None else {t.text: t.logprob} for t in tokens]
        self.offset = len(prompt_text)
        return out

    def generated(self, tokens: list[TokenInfo], tops: list[list[TokenInfo]]) -> dict[str, list[Any]]:
        return self._entries(list(zip(tokens, tops)))

    def _entries(self, steps: list[tuple[TokenInfo, list[TokenInfo] | None]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, top in steps:
            out["tokens"].append(token.text)
            out["token_logprobs"].append(_finite(token.logprob))
            out["top_logprobs"].append(None if top is None else _top_dict(token, top))
            out["text_offset"].append(self.offset)
            self.offset += 0 if token.special else len(token.text)
        return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _top_dict(token: TokenInfo, top: list[TokenInfo]) -> dict[str, float | None]:
    """The alternatives, most likely first, and the chosen token (OpenAI returns up to k + 1)."""
    out = {t.text: _finite(t.logprob) for t in top}
    out.setdefault(token.text, _finite(token.logprob))
    return out


def _join(*parts: dict[str, list[Any]] | None) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in (part or {}).items():
            out[key] += values
    return out


def _choice_logprobs(body: CompletionRequest, gen: Generation, prompt: str) -> dict[str, list[Any]] | None:
    if body.logprobs is None:
        return None
    builder = LegacyLogprobs()
    echoed = builder.prompt(gen.prefill, prompt) if body.echo else None
    return _join(echoed, builder.generated(gen.tokens, gen.top_tokens))


@router.post("/v1/completions", responses={**GENERATION, **stream_ok(json_too=True)})
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
    choices = []
    for k, g in enumerate(gens):
        prompt = prompts[k // n]
        choice = env.completion_choice(k, (prompt if body.echo else "") + trimmed_text(g), finish_reason(g.finish_reason))
        choice["logprobs"] = _choice_logprobs(body, g, prompt)
        choices.append(choice)
    prompt_tokens = sum(v.input_length for v in valids[::n])
    body_json = env.completion(choices, usage(prompt_tokens, sum(g.generated_tokens for g in gens)))
    return JSONResponse(body_json, headers=summed_headers(timings, state.settings.compute_type, characters))


@dataclass(slots=True)
class _ChoiceStream:
    """One streamed choice: its stop trimming, its echo (sent once, with the first chunk) and its
    logprobs offsets."""

    body: CompletionRequest
    prompt: str
    trimmer: StopTrimmer
    logprobs: LegacyLogprobs
    echoed: bool = False

    def chunk(self, event: RequestOutput) -> tuple[str, dict[str, list[Any]] | None]:
        text = self.trimmer.feed(event.text, event.stop_sequence, event.finished)
        echo, prompt_logprobs = "", None
        if self.body.echo and not self.echoed:
            self.echoed, echo = True, self.prompt
            if self.body.logprobs is not None:
                prompt_logprobs = self.logprobs.prompt(event.prompt_tokens or [], self.prompt)
        if self.body.logprobs is None:
            return echo + text, None
        tokens = [event.token] if event.token is not None else []
        return echo + text, _join(prompt_logprobs, self.logprobs.generated(tokens, [event.top_tokens] * len(tokens)))


async def _completion_events(state: AppState, body: CompletionRequest, prompts: list[str], n: int, env: Envelope,
                             clock: RequestClock) -> AsyncIterator[bytes]:
    try:
        with state.tracked(count=False), state.service.permits.hold(len(prompts) * n):
            valids = await _validate_all(state, body, prompts, n)
            clock.mark_validated()
            gens = [Generation(input_length=v.input_length) for v in valids]
            choices = [_ChoiceStream(body, prompts[k // n], StopTrimmer(v.params.stop), LegacyLogprobs())
                       for k, v in enumerate(valids)]
            async for k, event in merge([state.service.stream(v) for v in valids]):
                gens[k].add(event)
                text, logprobs = choices[k].chunk(event)
                finish = finish_reason(event.finish_reason) if event.finished else ""
                choice = env.completion_choice(k, text, finish)
                choice["logprobs"] = logprobs
                done = usage(valids[k].input_length, gens[k].generated_tokens) if event.finished else None
                yield sse_data(env.completion([choice], done))
        state.metrics.success(clock.timings(gens[0], valids[0].params.max_new_tokens))
    except ApiError as exc:
        yield sse_data(exc.openai_event())
    yield DONE
