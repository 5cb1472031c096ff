"""TGI routes end to end through a real server: the `text_generation` client (sync and async),
raw JSON checked key by key and against TGI's OpenAPI schemas, greedy text against transformers."""
from __future__ import annotations

import json
import warnings

import httpx
import pytest

from tests.api.conftest import sse_events

PROMPT = "def add(a, b):"


def prompt_len(server, prompt: str = PROMPT) -> int:
    return len(server.engine.tokenizer.encode(prompt))


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60, **kw)


def test_generate_greedy_matches_transformers_with_exact_details(server, hf_greedy, openapi):
    ids = hf_greedy(server.engine.tokenizer.encode(PROMPT), 8)
    text = server.engine.tokenizer.decode(ids, skip_special_tokens=True)
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200
    body = r.json()
    openapi(body, "GenerateResponse")
    assert list(body) == ["generated_text", "details"]
    assert body["generated_text"] == text
    d = body["details"]
    assert list(d) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]  # no top_tokens/best_of
    assert [t["id"] for t in d["tokens"]] == ids
    assert d["seed"] is None and d["prefill"] == [] and d["generated_tokens"] == len(ids)
    assert all(t["logprob"] < 0 and t["special"] is False for t in d["tokens"])


def test_generate_without_details_omits_the_key(server):
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json()
    assert list(body) == ["generated_text"]


def test_timing_headers(server):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    h = r.headers
    assert h["x-compute-type"] == "gpu+optimized"
    assert float(h["x-compute-time"]) > 0
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert h[name].isdigit(), name
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])
    assert h["x-compute-characters"] == str(len(PROMPT))
    assert h["x-prompt-tokens"] == str(prompt_len(server)) and h["x-generated-tokens"] == "4"


def test_decoder_input_details_top_n_tokens_and_full_text(server, openapi):
    params = {"max_new_tokens": 3, "decoder_input_details": True, "top_n_tokens": 2, "return_full_text": True}
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    openapi(body, "GenerateResponse")
    d = body["details"]
    assert body["generated_text"].startswith(PROMPT)
    assert [t["text"] for t in d["prefill"]][:2] == ["<s>", "def"]
    assert d["prefill"][0]["logprob"] is None and all(t["logprob"] < 0 for t in d["prefill"][1:])
    assert len(d["prefill"]) == prompt_len(server) and set(d["prefill"][0]) == {"id", "text", "logprob"}
    assert len(d["top_tokens"]) == 3 and all(len(step) == 2 for step in d["top_tokens"])
    # greedy: the chosen token is the most likely alternative
    assert [step[0]["id"] for step in d["top_tokens"]] == [t["id"] for t in d["tokens"]]


def test_stop_sequence_is_kept_in_generated_text(server):
    first = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}).json()
    stop = first["details"]["tokens"][3]["text"]
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True,
                                                                        "stop": [stop]}}).json()
    prefix = "".join(t["text"] for t in first["details"]["tokens"][:4])
    assert body["generated_text"] == prefix
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["details"]["generated_tokens"] == 4


def test_best_of_returns_the_highest_mean_logprob(server, openapi):
    params = {"max_new_tokens": 4, "best_of": 2, "do_sample": True, "details": True}
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    openapi(body, "GenerateResponse")
    d = body["details"]
    (other,) = d["best_of_sequences"]
    mean = lambda seq: sum(t["logprob"] for t in seq["tokens"]) / len(seq["tokens"])  # noqa: E731
    assert mean(d) >= mean(other)
    assert d["seed"] is not None and other["seed"] is not None and d["seed"] != other["seed"]
    assert other["generated_text"] == "".join(t["text"] for t in other["tokens"])


def test_sampling_with_a_seed_is_reproducible_and_reports_it(server):
    params = {"max_new_tokens": 6, "do_sample": True, "seed": 1234, "details": True}
    a = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    b = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    assert a == b and a["details"]["seed"] == 1234


def test_compat_route_is_a_list_and_defaults_to_full_text(server, openapi):
    r = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    openapi(body[0], "GenerateResponse")
    assert body[0]["generated_text"].startswith(PROMPT)  # no pipeline tag: TGI returns the full text


def test_generate_stream_framing_events_and_final_text(server, openapi):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}}
    with httpx.stream("POST", server.base_url + "/generate_stream", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        assert "x-compute-time" not in r.headers
        raw = r.read().decode()
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = [json.loads(e) for e in sse_events(raw.split("\n"))]
    for e in events:
        openapi(e, "StreamResponse")
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert list(events[0]) == ["index", "token", "generated_text", "details"]
    final = events[-1]
    assert final["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert final["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None,
                                "input_length": prompt_len(server)}
    blocking = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}).json()
    assert blocking["generated_text"] == final["generated_text"]


def test_tokenize_gives_byte_offsets(server, openapi):
    text = "héllo wörld"
    body = post(server, "/tokenize", {"inputs": text}).json()
    openapi(body, "TokenizeResponse")
    raw = text.encode()
    assert body[0] == {"id": 1, "text": "", "start": 0, "stop": 0}  # BOS
    for tok in body[1:]:
        assert raw[tok["start"]:tok["stop"]].decode() == tok["text"]
    assert body[-1]["stop"] == len(raw)


def test_text_generation_client_generate_and_stream(server):
    from text_generation import Client

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = Client(server.base_url, timeout=60)
        resp = client.generate(PROMPT, max_new_tokens=6, decoder_input_details=True, top_n_tokens=2)
        streamed = list(client.generate_stream(PROMPT, max_new_tokens=6))
    assert resp.details.generated_tokens == 6 and resp.details.finish_reason.value == "length"
    assert len(resp.details.prefill) == prompt_len(server) and len(resp.details.top_tokens) == 6
    assert [s.token.id for s in streamed] == [t.id for t in resp.details.tokens]
    assert streamed[-1].generated_text == resp.generated_text
    assert streamed[-1].details.generated_tokens == 6


@pytest.mark.asyncio
async def test_text_generation_async_client(server):
    from text_generation import AsyncClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = AsyncClient(server.base_url, timeout=60)
        resp = await client.generate(PROMPT, max_new_tokens=4)
        tokens = [s async for s in client.generate_stream(PROMPT, max_new_tokens=4)]
    assert resp.details.generated_tokens == 4
    assert "".join(s.token.text for s in tokens) == resp.generated_text


def test_text_generation_client_maps_validation_errors(server):
    from text_generation import Client
    from text_generation.errors import ValidationError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValidationError, match="`inputs` tokens \\+ `max_new_tokens` must be <= 1024"):
            Client(server.base_url, timeout=60).generate(PROMPT, max_new_tokens=1023)


def test_huggingface_hub_text_generation(inference_client):
    client = inference_client
    out = client.text_generation(PROMPT, max_new_tokens=5, details=True, return_full_text=False)
    assert out.details.generated_tokens == 5
    tokens = list(client.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True))
    assert "".join(t.token.text for t in tokens) == out.generated_text
    assert tokens[-1].details.finish_reason == "length"
    assert client.text_generation(PROMPT, max_new_tokens=5) == PROMPT + out.generated_text  # `/` defaults to full text
