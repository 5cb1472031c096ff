"""/health turns 503 with a JSON reason when the engine thread is stuck or dead.

The stuck or dead engine is real, produced off the request path through the engine's step
observer hook (`AsyncEngine.add_step_observer`, which runs on the engine thread after every step,
as the metrics do): an observer that blocks stalls the step loop, one that raises SystemExit ends
the thread. Each test has its own engine and server, since it breaks them.
"""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.api.conftest import make_engine, start_server


@pytest.fixture
def fresh(tiny_llama):
    engine = make_engine(tiny_llama)
    running = start_server(engine, watchdog_timeout_s=0.5)
    yield running
    running.stop()
    engine.shutdown()


def wait_health(base_url: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(base_url + "/health", timeout=30)
        if r.status_code == status:
            return r
        assert time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.05)


def generate_in_thread(base_url: str, out: list) -> threading.Thread:
    def run() -> None:
        out.append(httpx.post(base_url + "/generate", json={"inputs": "def f():", "parameters": {"max_new_tokens": 8}},
                              timeout=120))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_stuck_step_turns_health_503_until_it_moves_again(fresh):
    stalled, release = threading.Event(), threading.Event()

    def stall(record) -> None:
        stalled.set()
        release.wait()

    fresh.engine.add_step_observer(stall)
    out: list = []
    worker = generate_in_thread(fresh.base_url, out)
    try:
        assert stalled.wait(30)
        body = wait_health(fresh.base_url, 503).json()
    finally:
        fresh.engine.core.step_observers.remove(stall)
        release.set()
    assert (body["error"], body["error_type"]) == ("unhealthy", "healthcheck")
    assert re.fullmatch(r"no engine step completed in the last \d+\.\d s \(watchdog 0\.5 s\) while [12] requests are open",
                        body["reason"]), body["reason"]
    worker.join(60)
    assert out[0].status_code == 200 and out[0].json()["generated_text"]
    assert wait_health(fresh.base_url, 200).content == b""


def test_a_dead_engine_thread_fails_requests_and_health(fresh):
    def die(record) -> None:
        raise SystemExit("killed by the test")

    fresh.engine.add_step_observer(die)
    out: list = []
    generate_in_thread(fresh.base_url, out).join(60)
    reason = "the engine thread is not running (SystemExit: killed by the test)"
    assert (out[0].status_code, out[0].json()) == (424, {
        "error": f"Request failed during generation: Server error: {reason}", "error_type": "generation"})
    r = wait_health(fresh.base_url, 503)
    assert r.json() == {"error": "unhealthy", "error_type": "healthcheck", "reason": reason}
    later = httpx.post(fresh.base_url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                       timeout=30)
    assert later.status_code == 424 and reason in later.json()["error"]
