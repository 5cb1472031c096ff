"""Runs validated requests on the engine: admission (TGI's non-blocking semaphore), collection of
token events into a `Generation`, best_of / n as independent seeded requests, streaming, and
aborting on client disconnect.

Invariants: every engine iterator this module opens is closed in a `finally` (closing it before
its final event aborts the request in the engine and frees its KV blocks); a permit taken is
always given back, whatever the outcome.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from starlette.requests import Request

from textgen.api import tracing
from textgen.api.errors import ApiError, ClientDisconnected, generation_error, incomplete_generation, overloaded
from textgen.api.latency_metrics import LatencyMetrics
from textgen.api.validation import ValidRequest
from textgen.core.engine.types import EngineRequest, RequestOutput, TokenInfo

T = TypeVar("T")


@dataclass(slots=True)
class Generation:
    """One finished engine request as the routes report it."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    prefill: list[TokenInfo] = field(default_factory=list)
    finish_reason: str = "length"
    stop_sequence: str | None = None
    seed: int | None = None
    input_length: int = 0
    queue_time: float = 0.0
    inference_time: float = 0.0

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    def mean_logprob(self) -> float:
        """TGI's best_of criterion: the highest mean token logprob wins."""
        lps = [t.logprob for t in self.tokens if t.logprob is not None and math.isfinite(t.logprob)]
        return sum(lps) / len(lps) if lps else -math.inf

    def add(self, event: RequestOutput) -> None:
        if event.prompt_tokens is not None:
            self.prefill = list(event.prompt_tokens)
        if event.token is not None:
            self.tokens.append(event.token)
            self.top_tokens.append(list(event.top_tokens))
        self.text += event.text
        self.input_length = event.num_prompt_tokens or self.input_length
        self.queue_time, self.inference_time = event.queue_time, event.inference_time
        self.seed = event.seed
        if event.finished:
            self.finish_reason = event.finish_reason or "length"
            self.stop_sequence = event.stop_sequence


def check_final(event: RequestOutput, stream: bool = False) -> None:
    """Raise the ApiError an engine failure maps to (none for a normal finish)."""
    if event.finish_reason == "error":
        raise generation_error(event.error or "unknown error")
    if event.finish_reason == "aborted":
        raise incomplete_generation(stream)


class Permits:
    """TGI's `try_acquire_permit`: full means 429 at once, never a wait."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    @contextlib.contextmanager
    def hold(self, n: int = 1) -> Iterator[None]:
        if self.in_use + n > self.capacity:
            raise overloaded()
        self.in_use += n
        try:
            yield
        finally:
            self.in_use -= n


def with_seeds(valid: ValidRequest, n: int) -> list[ValidRequest]:
    """n copies of a request; sampled copies get distinct seeds (derived from the given one)."""
    if n == 1:
        return [valid]
    if not valid.params.do_sample:
        return [valid] * n
    base = valid.params.seed if valid.params.seed is not None else random.getrandbits(63)
    return [replace(valid, params=replace(valid.params, seed=(base + i) % 2**64)) for i in range(n)]


class GenerationService:
    def __init__(self, engine: Any, max_concurrent_requests: int, latency: LatencyMetrics | None = None) -> None:
        self.engine = engine
        self.permits = Permits(max_concurrent_requests)
        self.latency = latency

    def _engine_request(self, valid: ValidRequest) -> EngineRequest:
        return EngineRequest(uuid.uuid4().hex, list(valid.prompt_ids), valid.params,
                             adapter_id=valid.parameters.adapter_id)

    async def generate(self, valid: ValidRequest) -> Generation:
        gen = Generation(input_length=valid.input_length)
        async for event in self._events(valid):
            gen.add(event)
            if event.finished:
                check_final(event)
                return gen
        raise incomplete_generation()

    async def generate_many(self, requests: list[ValidRequest]) -> list[Generation]:
        """All or nothing: the first failure cancels (and so aborts) the others."""
        tasks = [asyncio.ensure_future(self.generate(v)) for v in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stream(self, valid: ValidRequest) -> AsyncIterator[RequestOutput]:
        """Token events; an engine failure raises ApiError after the events before it."""
        events = self._events(valid)
        try:
            async for event in events:
                if event.finished:
                    check_final(event, stream=True)
                yield event
                if event.finished:
                    return
        finally:
            await events.aclose()
        raise incomplete_generation(stream=True)

    async def _events(self, valid: ValidRequest) -> AsyncIterator[RequestOutput]:
        """The engine's events for one request; when the HTTP request is traced, its timeline
        becomes the queue/prefill/decode spans once the request ends (finished or aborted)."""
        request = self._engine_request(valid)
        rt = tracing.current()
        timeline = tracing.EngineTimeline(request.request_id, request.arrival_time, valid.input_length)
        events = self.engine.generate(request)
        since_arrival: float | None = None
        try:
            async for event in events:
                timeline.add(event)
                if self.latency is not None:
                    since_arrival = self.latency.observe(event, since_arrival)
                yield event
        finally:
            await events.aclose()
            if rt is not None:
                rt.engine_done(timeline)


async def abort_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client goes away first; then cancel it (aborting its engine
    requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
