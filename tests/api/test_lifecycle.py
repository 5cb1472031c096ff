"""Disconnects abort and free KV blocks, metrics under TGI's names, health/info/docs, and the
gRPC service streaming the same tokens as /generate_stream."""
from __future__ import annotations

import json
import re
import socket
import time

import grpc
import httpx
import pytest

from tests.api.conftest import sse_events

LONG = {"inputs": "def f():", "parameters": {"max_new_tokens": 1000}}  # ~2.5 s of generation when not aborted


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing"
    return float(match.group(1))


def scrape(server) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=60).text


def wait_idle(engine, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def wait_running(engine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats().num_running == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)


def test_stream_disconnect_aborts_and_frees_blocks(server):
    wait_idle(server.engine, 10)
    dropped = metric(scrape(server), 'tgi_request_failure{err="dropped"}')
    with httpx.stream("POST", server.base_url + "/generate_stream", json=LONG, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_running(server.engine)  # stats are a snapshot taken after each engine step
        assert server.engine.stats().kv_cache_usage > 0
    assert wait_idle(server.engine, 1.0) < 1.0  # far sooner than the 1000 tokens would take
    assert metric(scrape(server), 'tgi_request_failure{err="dropped"}') == dropped + 1


def test_blocking_request_disconnect_aborts(server):
    wait_idle(server.engine, 10)
    dropped = metric(scrape(server), 'tgi_request_failure{err="dropped"}')
    body = json.dumps(LONG).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        wait_running(server.engine)
    assert wait_idle(server.engine, 1.0) < 1.0
    deadline = time.monotonic() + 5
    while metric(scrape(server), 'tgi_request_failure{err="dropped"}') != dropped + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_metrics_names_and_counts(server):
    before = scrape(server)
    prompt = "class Cache(object):\n    def __init__(self, size):\n        self.size = size\n"
    for _ in range(2):  # the second request finds the prompt's full blocks in the prefix cache
        r = httpx.post(server.base_url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3}},
                       timeout=60)
        assert r.status_code == 200
    httpx.post(server.base_url + "/generate", json={"inputs": "x", "parameters": {"top_k": 0}}, timeout=60)
    after = scrape(server)
    assert metric(after, "tgi_request_count") == metric(before, "tgi_request_count") + 3
    assert metric(after, "tgi_request_success") == metric(before, "tgi_request_success") + 2
    assert metric(after, 'tgi_request_failure{err="validation"}') == \
        metric(before, 'tgi_request_failure{err="validation"}') + 1
    assert metric(after, "tgi_request_generated_tokens_count") == metric(before, "tgi_request_generated_tokens_count") + 2
    assert metric(after, "tgi_request_generated_tokens_sum") == metric(before, "tgi_request_generated_tokens_sum") + 6
    for name in ("tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_input_length", "tgi_request_max_new_tokens"):
        assert metric(after, f"{name}_count") == metric(before, f"{name}_count") + 2, name
    assert len(re.findall(r"^tgi_request_duration_bucket", after, re.MULTILINE)) == 36  # TGI's 35 + Inf
    assert len(re.findall(r"^tgi_request_input_length_bucket", after, re.MULTILINE)) == 101
    for gauge in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens",
                  "tgi_batch_max_total_tokens", "textgen_kv_cache_usage"):
        metric(after, gauge)
    assert metric(after, "textgen_prefix_cache_hit_rate") > 0
    # per engine step: one prefill then two decodes for each request (they ran one after the other)
    steps = {"prefill": 2, "decode": 4}
    for method, n in steps.items():
        for name in ("tgi_batch_inference_count", "tgi_batch_inference_success"):
            key = f'{name}{{method="{method}"}}'
            assert metric(after, key) == metric(before, key) + n, key
        for name in ("tgi_batch_inference_duration", "tgi_batch_forward_duration", "tgi_batch_decode_duration",
                     "tgi_batch_filter_duration"):
            key = f'{name}_count{{method="{method}"}}'
            assert metric(after, key) == metric(before, key) + n, key
    assert metric(after, "tgi_batch_next_size_count") == metric(before, "tgi_batch_next_size_count") + 6
    assert metric(after, 'tgi_batch_next_size_bucket{le="1.0"}') == \
        metric(before, 'tgi_batch_next_size_bucket{le="1.0"}') + 6
    assert len(re.findall(r"^tgi_batch_next_size_bucket", after, re.MULTILINE)) == 1025  # TGI's 1..1024 + Inf
    assert metric(after, 'tgi_batch_inference_failure{method="decode"}') == 0
    assert metric(after, 'tgi_batch_concat{reason="chunking"}') == metric(before, 'tgi_batch_concat{reason="chunking"}')
    assert metric(after, "tgi_request_skipped_tokens_count") == 0
    assert not re.search(r"_total[ {]", after) and "_created" not in after
    assert "# TYPE tgi_request_count counter" in after


def test_health_ping_info_docs(server, openapi):
    for path in ("/health", "/ping", "/"):
        r = httpx.get(server.base_url + path, timeout=60)
        assert (r.status_code, r.content) == (200, b""), path
    info = httpx.get(server.base_url + "/info", timeout=60).json()
    openapi(info, "Info")
    assert {k: info[k] for k in ("model_id", "max_input_tokens", "max_total_tokens", "max_best_of",
                                 "max_stop_sequences", "max_concurrent_requests", "router")} == {
        "model_id": server.engine.model_id, "max_input_tokens": 1023, "max_total_tokens": 1024, "max_best_of": 2,
        "max_stop_sequences": 4, "max_concurrent_requests": 128, "router": "text-generation-router"}
    assert info["model_device_type"] == "cpu" and info["backend"] == "cpu"
    assert httpx.get(server.base_url + "/docs", timeout=60).status_code == 200
    doc = httpx.get(server.base_url + "/api-doc/openapi.json", timeout=60).json()
    for path in ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize",
                 "/chat_tokenize", "/invocations", "/health", "/info", "/metrics", "/v1/models"):
        assert path in doc["paths"], path
    assert "GenerateParameters" in doc["components"]["schemas"]


@pytest.fixture(scope="module")
def grpc_stub(server):
    from textgen.api.proto import textgen_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield textgen_pb2_grpc.TextGenerationStub(channel)
    channel.close()


def test_grpc_stream_equals_generate_stream(server, grpc_stub):
    from textgen.api.proto import textgen_pb2 as pb

    request = pb.GenerateRequest(inputs="def add(a, b):", parameters=pb.Parameters(max_new_tokens=6, details=True))
    messages = list(grpc_stub.GenerateStream(request, timeout=60))
    with httpx.stream("POST", server.base_url + "/generate_stream", timeout=60,
                      json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 6, "details": True}}) as r:
        events = [json.loads(e) for e in sse_events(r.read().decode().split("\n"))]
    assert [(m.index, m.token.id, m.token.text) for m in messages] == \
        [(e["index"], e["token"]["id"], e["token"]["text"]) for e in events]
    assert [m.token.logprob for m in messages] == pytest.approx([e["token"]["logprob"] for e in events])
    assert messages[-1].generated_text == events[-1]["generated_text"]
    assert not messages[0].HasField("generated_text")
    assert messages[-1].details.generated_tokens == 6 and messages[-1].details.finish_reason == pb.FINISH_REASON_LENGTH
    unary = grpc_stub.Generate(request, timeout=60)
    assert unary.generated_text == events[-1]["generated_text"]
    assert [t.id for t in unary.details.tokens] == [e["token"]["id"] for e in events]
    assert not unary.details.HasField("seed")


def test_grpc_errors_and_cancel(server, grpc_stub):
    from textgen.api.proto import textgen_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        grpc_stub.Generate(pb.GenerateRequest(inputs="x", parameters=pb.Parameters(temperature=0)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "Input validation error: `temperature` must be strictly positive"
    assert dict(err.value.trailing_metadata())["error-type"] == "validation"
    wait_idle(server.engine, 10)
    call = grpc_stub.GenerateStream(pb.GenerateRequest(inputs="def f():", parameters=pb.Parameters(max_new_tokens=1000)))
    next(call)
    call.cancel()
    assert wait_idle(server.engine, 1.0) < 1.0
    assert grpc_stub.Info(pb.InfoRequest(), timeout=60).max_total_tokens == 1024
    grpc_stub.Health(pb.HealthRequest(), timeout=60)
