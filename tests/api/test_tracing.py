"""OpenTelemetry spans of a real `textgen serve --otlp-endpoint ...` process, received by a real
OTLP/gRPC receiver started here (grpcio + the TraceService of `opentelemetry-proto`): the parent
and child structure, the GenAI attributes, and the trace continued from the caller's
`traceparent`."""
from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import httpx
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from tests.api.conftest import free_port  # noqa: E402
from tests.api.serve_process import start_serve  # noqa: E402

pytestmark = pytest.mark.slow
SERVICE = "textgen-under-test"
ENGINE_SPANS = ("queue", "prefill", "decode")


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start: int
    end: int
    attributes: dict
    service: str


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the proto's name
        with self.lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name")
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(ReceivedSpan(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                                       s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                                                       _attributes(s.attributes), service))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, names: set[str]) -> dict[str, list[ReceivedSpan]]:
        deadline = time.monotonic() + 60
        while True:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            by_name: dict[str, list[ReceivedSpan]] = {}
            for s in found:
                by_name.setdefault(s.name, []).append(s)
            if names <= set(by_name):
                return by_name
            assert time.monotonic() < deadline, f"spans received for the trace: {sorted(by_name)}"
            time.sleep(0.1)


def _attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    sink.endpoint = f"http://127.0.0.1:{port}"
    yield sink
    server.stop(None)


@pytest.fixture(scope="module")
def traced(receiver, tiny_llama):
    served = start_serve(tiny_llama, "--otlp-endpoint", receiver.endpoint, "--otlp-service-name", SERVICE,
                         env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield served
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0


def traceparent(trace_id: str, parent: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{parent}-01"}


def test_generate_spans_continue_the_callers_trace(traced, receiver, tiny_llama):
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9,
                                                          "seed": 3, "details": True}}
    r = httpx.post(traced.base_url + "/generate", json=body, headers=traceparent(trace_id, caller), timeout=60)
    assert r.status_code == 200
    spans = receiver.trace(trace_id, {f"text_completion {tiny_llama}", "receive", "validate", *ENGINE_SPANS})
    (root,) = spans[f"text_completion {tiny_llama}"]
    assert (root.parent_id, root.kind, root.service) == (caller, 2, SERVICE)  # SPAN_KIND_SERVER
    for name in ("receive", "validate", *ENGINE_SPANS):
        (child,) = spans[name]
        assert child.parent_id == root.span_id, name
        assert root.start <= child.start <= child.end <= root.end, name
    queue, prefill, decode = (spans[n][0] for n in ENGINE_SPANS)
    assert queue.end == prefill.start and prefill.end == decode.start  # one timeline, from the engine's events
    details = r.json()["details"]
    assert {k: root.attributes[k] for k in (
        "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.request.max_tokens", "gen_ai.request.temperature",
        "gen_ai.request.top_p", "gen_ai.request.seed", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons", "http.response.status_code")} == {
        "gen_ai.operation.name": "text_completion", "gen_ai.request.model": tiny_llama,
        "gen_ai.request.max_tokens": 5, "gen_ai.request.temperature": 0.7, "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 3, "gen_ai.usage.input_tokens": 8,  # "def add(a, b):" is 8 tokens with BOS (test_errors)
        "gen_ai.usage.output_tokens": details["generated_tokens"], "gen_ai.response.finish_reasons": ["length"],
        "http.response.status_code": 200}
    assert prefill.attributes["gen_ai.usage.input_tokens"] == root.attributes["gen_ai.usage.input_tokens"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == 5


def test_a_chat_stream_has_a_stream_span_and_n_engine_timelines(traced, receiver, tiny_llama):
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    body = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2, "seed": 1,
            "stream": True}
    with httpx.stream("POST", traced.base_url + "/v1/chat/completions", json=body,
                      headers=traceparent(trace_id, caller), timeout=60) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    assert "data: [DONE]" in lines
    spans = receiver.trace(trace_id, {f"chat {tiny_llama}", "stream", *ENGINE_SPANS})
    (root,) = spans[f"chat {tiny_llama}"]
    assert root.parent_id == caller and root.attributes["gen_ai.operation.name"] == "chat"
    (stream,) = spans["stream"]
    assert stream.parent_id == root.span_id and stream.end <= root.end
    for name in ENGINE_SPANS:  # n=2: two engine requests, each with its own timeline
        assert len(spans[name]) == 2 and all(s.parent_id == root.span_id for s in spans[name])
    assert {s.attributes["textgen.request_id"] for s in spans["decode"]} == {
        s.attributes["textgen.request_id"] for s in spans["queue"]}
    assert root.attributes["gen_ai.usage.output_tokens"] == 8
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length", "length"]


def test_a_refused_request_is_traced_with_its_status(traced, receiver, tiny_llama):
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    r = httpx.post(traced.base_url + "/generate", json={"inputs": "x", "parameters": {"top_p": 1.0}},
                   headers=traceparent(trace_id, "00f067aa0ba902b8"), timeout=60)
    assert r.status_code == 422
    spans = receiver.trace(trace_id, {f"text_completion {tiny_llama}", "validate"})
    (root,) = spans[f"text_completion {tiny_llama}"]
    assert (root.attributes["http.response.status_code"], root.attributes["error.type"]) == (422, "422")
    assert not set(ENGINE_SPANS) & set(spans)  # nothing reached the engine
