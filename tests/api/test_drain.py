"""SIGTERM/SIGINT drain of a real `textgen serve` process: new requests get 503 and /health 503
while the streams in flight run to their last token, then the process exits 0."""
from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.api.conftest import sse_events
from tests.api.serve_process import start_serve

TOKENS = 300


def stream_to_end(base_url: str, started: threading.Event, out: list) -> None:
    body = {"inputs": "def f():", "parameters": {"max_new_tokens": TOKENS, "details": True}}
    with httpx.stream("POST", base_url + "/generate_stream", json=body, timeout=120) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            started.set()
    out.append([json.loads(e) for e in sse_events(lines)])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_streams_then_exits_0(tiny_llama, sig):
    served = start_serve(tiny_llama, "--shutdown-timeout", "120")
    results: list = []
    started = [threading.Event() for _ in range(2)]
    threads = [threading.Thread(target=stream_to_end, args=(served.base_url, s, results)) for s in started]
    try:
        for t in threads:
            t.start()
        for s in started:
            assert s.wait(60), "no stream started"
        served.proc.send_signal(sig)
        refused = _wait_for_draining(served.base_url)
        assert refused.json() == {"error": "The server is shutting down and accepts no new requests",
                                  "error_type": "draining"}
        health = httpx.get(served.base_url + "/health", timeout=30)
        assert health.status_code == 503 and health.json() == {
            "error": "unhealthy", "error_type": "healthcheck", "reason": "draining: the server is shutting down"}
        assert httpx.get(served.base_url + "/metrics", timeout=30).status_code == 200  # still observable
        for t in threads:
            t.join(120)
        assert served.proc.wait(60) == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    assert len(results) == 2
    for events in results:  # every stream ran to its last token and got TGI's final event
        assert len(events) == TOKENS and events[-1]["details"]["generated_tokens"] == TOKENS
        assert events[-1]["details"]["finish_reason"] == "length"
    log = served.output()
    assert "draining: 2 requests in flight" in log and "drained: no request in flight" in log, log


def _wait_for_draining(base_url: str) -> httpx.Response:
    """The signal is handled asynchronously: poll until a new request is refused (503)."""
    for _ in range(600):
        r = httpx.post(base_url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}, timeout=30)
        if r.status_code == 503:
            return r
        assert r.status_code == 200, r.text
    raise AssertionError("the server never started draining")
