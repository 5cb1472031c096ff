"""What an inference gateway reads from a real `textgen` server on 127.0.0.1: the vLLM-named
gauges on /metrics moving under load, and the KV-cache events a prefix-aware router receives on
a real ZMQ SUB socket for a known request.

The engine runs one request per step (max_batch_size=1), so concurrent requests queue and the
waiting gauge must rise; block_size 16 and 64 KV blocks."""
from __future__ import annotations

import threading
import time

import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import free_port, start_server
from textgen.core.kv_cache import hash_block_tokens

BLOCK = 16
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def gateway(tiny_llama):
    from textgen.api.kv_events import attach_kv_events
    from textgen.core.config import EngineConfig
    from textgen.core.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_config(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32",
                                                  num_kv_blocks=NUM_BLOCKS, block_size=BLOCK, max_batch_size=1))
    port = free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{port}")
    publisher = attach_kv_events(engine, f"tcp://127.0.0.1:{port}", topic="kv@test@tiny")
    running = start_server(engine)
    _wait_for_subscription(running.base_url, sub)
    yield running, sub
    running.stop()
    engine.shutdown()
    publisher.close()
    sub.close(0)


def _wait_for_subscription(base_url: str, sub: zmq.Socket) -> None:
    """A connecting PUB drops batches sent before the subscription reaches it: publish blocks
    (prompts of distinct first words, so they share no block) until one batch arrives."""
    for i in range(50):
        generate(base_url, f"warm{i} " + "import os, sys, json " * 6, 1)
        if sub.poll(500):
            while sub.poll(200):
                sub.recv_multipart()
            return
    raise AssertionError("no KV event batch reached the subscriber")


def generate(base_url: str, prompt: str, max_new_tokens: int) -> dict:
    r = httpx.post(f"{base_url}/generate", timeout=120, json={
        "inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}})
    assert r.status_code == 200, r.text
    return r.json()


def expected_stored(tokens: list[int], num_computed: int, num_prompt: int) -> list[tuple]:
    """(hashes, parent, token_ids) per event: the prompt's full blocks at prefill, then one event
    per block that fills while decoding (the last sampled token never has its KV computed)."""
    hashes: list[bytes] = []
    for start in range(0, num_computed - BLOCK + 1, BLOCK):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else b"", tokens[start:start + BLOCK]))
    first = num_prompt // BLOCK
    runs = ([(0, first)] if first else []) + [(i, i + 1) for i in range(first, len(hashes))]
    return [(hashes[a:b], hashes[a - 1] if a else None, tokens[a * BLOCK:b * BLOCK]) for a, b in runs]


def test_kv_events_of_a_known_request(gateway):
    server, sub = gateway
    prompt = "class Fibonacci:\n    def compute(self, n):\n        return self.compute(n - 1) + self.compute(n - 2)"
    prompt_ids = list(server.engine.tokenizer.encode(prompt, add_special_tokens=True))
    out = generate(server.base_url, prompt, 40)
    generated = [t["id"] for t in out["details"]["tokens"]]
    tokens = prompt_ids + generated
    want = expected_stored(tokens, len(tokens) - 1, len(prompt_ids))
    assert len(want) >= 2, "the request must fill blocks at prefill and while decoding"
    frames = [sub.recv_multipart() for _ in want]  # one engine step, one batch, per expected event
    assert not sub.poll(300), "no other event may follow"
    seqs = [int.from_bytes(f[1], "big") for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(want))) and {f[0] for f in frames} == {b"kv@test@tiny"}
    got = []
    for f in frames:
        ts, events, dp_rank = msgspec.msgpack.decode(f[2])
        assert dp_rank == 0 and len(events) == 1
        tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = events[0]
        assert (tag, block_size, lora_id, medium, lora_name) == ("BlockStored", BLOCK, None, "GPU", None)
        got.append((hashes, parent, token_ids))
    assert got == want
    published = {h for hashes, _, _ in got for h in hashes}
    assert published <= set(server.engine.core.scheduler.kv_manager.pool.cached)


def scrape(base_url: str) -> dict[str, list]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: dict[str, list], name: str) -> float:
    (sample,) = samples[name]
    return sample.value


def test_vllm_gauges_move_under_load_and_rest_at_zero(gateway):
    server, sub = gateway
    prompts = [f"def handler_{i}(request):\n    " for i in range(4)]
    threads = [threading.Thread(target=generate, args=(server.base_url, p, 120)) for p in prompts]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        m = scrape(server.base_url)
        seen.append((value(m, "vllm:num_requests_running"), value(m, "vllm:num_requests_waiting"),
                     value(m, "vllm:kv_cache_usage_perc")))
    for t in threads:
        t.join()
    assert max(r for r, _, _ in seen) == 1 and all(r <= 1 for r, _, _ in seen)  # max_batch_size=1
    assert max(w for _, w, _ in seen) >= 1
    assert max(u for _, _, u in seen) > 0 and all(0 <= u <= 1 for _, _, u in seen)
    before = time.time()
    m = scrape(server.base_url)
    after = time.time()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        (sample,) = m[name]
        assert sample.labels == {"model_name": server.engine.model_id, "engine": "0"} and sample.value == 0.0
    assert value(m, "tgi_queue_size") == value(m, "vllm:num_requests_waiting")
    assert value(m, "textgen_kv_cache_usage") == value(m, "vllm:kv_cache_usage_perc")
    (info,) = m["vllm:cache_config_info"]
    assert info.labels == {"block_size": "16", "cache_dtype": "float32", "enable_prefix_caching": "True",
                           "num_gpu_blocks": str(NUM_BLOCKS), "engine": "0"} and info.value == 1.0
    (lora,) = m["vllm:lora_requests_info"]
    assert lora.labels == {"max_lora": "0", "waiting_lora_adapters": "", "running_lora_adapters": ""}
    assert before <= lora.value <= after
    while sub.poll(200):  # the load's events are not this test's subject
        sub.recv_multipart()


def test_metrics_types_are_vllms(gateway):
    server, _ = gateway
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info", "vllm:lora_requests_info"):
        assert f"# TYPE {name} gauge" in text
