"""OpenTelemetry spans per generation request, with the GenAI semantic conventions.

One trace per HTTP request on a generation route, continued from an incoming W3C `traceparent`:

    text_completion <model> | chat <model>   SERVER span, the whole request (TracingMiddleware)
      receive     reading the request body
      validate    TGI's validation, tokenization, grammar compile check
      queue       engine: arrival -> first scheduled          (one set per engine request:
      prefill     engine: first scheduled -> first token       n / best_of > 1 give several)
      decode      engine: first token -> finish
      stream      writing a text/event-stream response, first byte -> last byte

The engine thread creates no span: queue/prefill/decode are built on the API side, after the
request finished, from the timings its events carry (queue_time, and inference_time at the first
and the last event), so the engine's step loop pays nothing for tracing. Spans exist only while
a tracer provider is installed (`--otlp-endpoint`); without one every helper here is a no-op.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from textgen.core.engine.types import RequestOutput
    from textgen.core.sampling_params import SamplingParams

TRACER_NAME = "textgen"
OPERATIONS = {"/v1/chat/completions": "chat", "/generate": "text_completion", "/generate_stream": "text_completion",
              "/": "text_completion", "/v1/completions": "text_completion", "/invocations": "text_completion"}
TRACED_ROUTES = frozenset(OPERATIONS) | {"/tokenize", "/chat_tokenize"}

_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("textgen_request_trace", default=None)


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def _epoch_offset_ns() -> int:
    """Add to time.monotonic() nanoseconds to get the epoch nanoseconds OpenTelemetry wants; taken
    once per timeline, so that adjacent spans share their boundaries exactly."""
    return time.time_ns() - time.monotonic_ns()


@dataclass(slots=True)
class RequestTrace:
    """The root span of one HTTP request and the usage summed over its engine requests."""

    span: Span
    output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def child(self, name: str, start_ns: int | None = None) -> Span:
        from opentelemetry import trace

        return _tracer().start_span(name, context=trace.set_span_in_context(self.span), start_time=start_ns)

    def engine_done(self, timeline: EngineTimeline) -> None:
        """queue/prefill/decode children from the engine's timings, and the usage attributes."""
        timeline.record(self)
        self.output_tokens += timeline.output_tokens
        self.finish_reasons.append(timeline.finish_reason or "unknown")
        self.span.set_attributes({"gen_ai.usage.input_tokens": timeline.input_tokens,
                                  "gen_ai.usage.output_tokens": self.output_tokens,
                                  "gen_ai.response.finish_reasons": list(self.finish_reasons)})


def current() -> RequestTrace | None:
    return _current.get()


@contextlib.contextmanager
def span(name: str) -> Iterator[Span | None]:
    """A child span of the current request's root span (nothing when the request is not traced)."""
    rt = current()
    if rt is None:
        yield None
        return
    child = rt.child(name)
    try:
        yield child
    except BaseException as exc:
        child.record_exception(exc)
        raise
    finally:
        child.end()


def request_params(params: SamplingParams) -> None:
    """The GenAI `gen_ai.request.*` attributes of the validated request, on the root span."""
    rt = current()
    if rt is None:
        return
    attributes: dict[str, Any] = {
        "gen_ai.request.max_tokens": params.max_new_tokens, "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p, "textgen.request.do_sample": params.do_sample}
    if params.top_k:
        attributes["gen_ai.request.top_k"] = params.top_k
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = list(params.stop)
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(params, name):
            attributes[f"gen_ai.request.{name}"] = getattr(params, name)
    if params.repetition_penalty != 1.0:
        attributes["textgen.request.repetition_penalty"] = params.repetition_penalty
    rt.span.set_attributes(attributes)


@dataclass(slots=True)
class EngineTimeline:
    """What one engine request's events tell about its time: queue = arrival -> first scheduled,
    prefill = scheduled -> first token, decode = first token -> finish (monotonic seconds)."""

    request_id: str
    arrival: float
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    queue_s: float | None = None
    first_token_s: float | None = None  # inference time when the first token came
    inference_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None

    def add(self, event: RequestOutput) -> None:
        self.input_tokens = event.num_prompt_tokens or self.input_tokens
        self.cached_tokens = max(self.cached_tokens, event.num_cached_tokens)
        self.queue_s, self.inference_s = event.queue_time, event.inference_time
        if event.token is not None:
            self.output_tokens += 1
            if self.first_token_s is None:
                self.first_token_s = event.inference_time
        if event.finished:
            self.finish_reason, self.error = event.finish_reason, event.error

    def record(self, rt: RequestTrace) -> None:
        now, offset = time.monotonic(), _epoch_offset_ns()
        scheduled = self.arrival + self.queue_s if self.queue_s is not None else now
        attributes = {"textgen.request_id": self.request_id}
        self._span(rt, offset, "queue", self.arrival, scheduled, attributes)
        if self.queue_s is None or self.first_token_s is None:
            return
        first = scheduled + self.first_token_s
        self._span(rt, offset, "prefill", scheduled, first, {**attributes, "gen_ai.usage.input_tokens": self.input_tokens,
                                                      "textgen.cached_tokens": self.cached_tokens})
        self._span(rt, offset, "decode", first, scheduled + self.inference_s,
                   {**attributes, "gen_ai.usage.output_tokens": self.output_tokens,
                    "gen_ai.response.finish_reasons": [self.finish_reason or "unknown"]})

    def _span(self, rt: RequestTrace, offset: int, name: str, start: float, end: float,
              attributes: dict[str, Any]) -> None:
        child = rt.child(name, offset + round(start * 1e9))
        child.set_attributes(attributes)
        if self.error and name != "queue":
            from opentelemetry.trace import Status, StatusCode

            child.set_status(Status(StatusCode.ERROR, self.error))
        child.end(offset + round(max(start, end) * 1e9))


class TracingMiddleware:
    """Root span per request on the traced routes, continued from `traceparent`; its `receive`
    and `stream` children are timed here, at the ASGI boundary."""

    def __init__(self, app: ASGIApp, model: str) -> None:
        self.app = app
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in TRACED_ROUTES:
            await self.app(scope, receive, send)
            return
        rt = self._start(scope)
        exchange = _Exchange(rt)
        token = _current.set(rt)
        try:
            await self.app(scope, exchange.wrap_receive(receive), exchange.wrap_send(send))
        except BaseException as exc:
            rt.span.record_exception(exc)
            raise
        finally:
            _current.reset(token)
            exchange.close()

    def _start(self, scope: Scope) -> RequestTrace:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        operation = OPERATIONS.get(path)
        name = f"{operation} {self.model}" if operation else f"POST {path}"
        attributes = {"http.request.method": "POST", "http.route": path, "url.path": path,
                      "gen_ai.request.model": self.model, "gen_ai.response.model": self.model}
        if operation:
            attributes["gen_ai.operation.name"] = operation
        root = _tracer().start_span(name, context=extract(headers), kind=SpanKind.SERVER, attributes=attributes)
        return RequestTrace(root)


class _Exchange:
    """Times the body read (`receive`) and an event-stream response (`stream`) of one request."""

    def __init__(self, rt: RequestTrace) -> None:
        self.rt = rt
        self.receiving: Span | None = rt.child("receive")
        self.streaming: Span | None = None
        self.status: int | None = None

    def wrap_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if self.receiving is not None and not message.get("more_body", False):
                self.receiving.set_attribute("http.request.body.size", len(message.get("body", b"")))
                self.receiving.end()
                self.receiving = None
            return message

        return wrapped

    def wrap_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._response_started(message)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._end_stream()

        return wrapped

    def _response_started(self, message: Message) -> None:
        self.status = int(message["status"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        if headers.get("content-type", "").startswith("text/event-stream"):
            self.streaming = self.rt.child("stream")

    def _end_stream(self) -> None:
        if self.streaming is not None:
            self.streaming.end()
            self.streaming = None

    def close(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        for open_span in (self.receiving, self.streaming):
            if open_span is not None:
                open_span.end()
        span = self.rt.span
        if self.status is not None:
            span.set_attribute("http.response.status_code", self.status)
            if self.status >= 400:
                span.set_attribute("error.type", str(self.status))
            if self.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()
