"""OpenAI routes through the `openai` SDK and huggingface_hub's chat_completion, plus raw bodies
checked key by key and against TGI's OpenAPI schemas."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import sse_events

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=60)


def chat(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


def stream_payloads(server, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", server.base_url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        return sse_events(r.read().decode().split("\n"))


def templated(server, messages=MESSAGES) -> str:
    return server.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_greedy_matches_transformers_on_the_templated_prompt(server, openapi, hf_greedy):
    r = chat(server, {"model": "tgi", "messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    body = r.json()
    openapi(body, "ChatCompletion")
    assert list(body) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["object"] == "chat.completion" and body["id"] == "" and body["model"] == server.engine.model_id
    assert body["system_fingerprint"].endswith("-native")
    (choice,) = body["choices"]
    prompt = templated(server)
    ids = server.engine.tokenizer.encode(prompt, add_special_tokens=False)
    expected = server.engine.tokenizer.decode(hf_greedy(ids, 6), skip_special_tokens=True)
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    assert r.headers["x-prompt-tokens"] == str(len(ids)) and r.headers["x-compute-characters"] == str(len(prompt))


def test_chat_tokenize_matches_the_template(server, openapi):
    body = httpx.post(server.base_url + "/chat_tokenize", json={"messages": MESSAGES}, timeout=60).json()
    openapi(body, "ChatTokenizeResponse")
    prompt = templated(server)
    assert body["templated_text"] == prompt
    assert [t["id"] for t in body["tokenize_response"]] == server.engine.tokenizer.encode(prompt, add_special_tokens=False)


def test_openai_sdk_chat_and_stream_agree(openai_client, server):
    full = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=2)
    choice = full.choices[0]
    assert full.model == server.engine.model_id and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 8 and all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)
    chunks = list(openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text == choice.message.content
    assert all(c.choices[0].delta.role == "assistant" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_raw_chunks(server, openapi):
    payloads = stream_payloads(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3,
                                                                "temperature": 0, "stream": True})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 3
    for c in chunks:
        openapi(c, "ChatCompletionChunk")
        assert c["usage"] is None and c["object"] == "chat.completion.chunk"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


def test_chat_model_is_echoed_unless_tgi(server):
    body = chat(server, {"model": "my-model", "messages": MESSAGES, "max_tokens": 1}).json()
    assert body["model"] == "my-model"


def test_chat_n_gives_independent_seeded_choices(server):
    body = chat(server, {"messages": MESSAGES, "max_tokens": 5, "n": 2, "seed": 7}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    again = chat(server, {"messages": MESSAGES, "max_tokens": 5, "n": 2, "seed": 7}).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]
    assert body["usage"]["completion_tokens"] == 10


def test_stop_sequence_is_trimmed_and_reported_as_stop(server):
    first = chat(server, {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True}).json()
    tokens = [e["token"] for e in first["choices"][0]["logprobs"]["content"]]
    stop = tokens[2] + tokens[3]
    body = chat(server, {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stop": stop}).json()
    assert body["choices"][0]["message"]["content"] == "".join(tokens[:2])
    assert body["choices"][0]["finish_reason"] == "stop"
    payloads = stream_payloads(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8,
                                                                "temperature": 0, "stop": [stop], "stream": True})
    deltas = [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1]]
    assert "".join(deltas) == "".join(tokens[:2])


def test_openai_sdk_completions(openai_client, server, openapi):
    out = openai_client.completions.create(model="tgi", prompt="def add(a, b):", max_tokens=5, temperature=0)
    assert out.model == server.engine.model_id and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    generate = httpx.post(server.base_url + "/generate", timeout=60, json={
        "inputs": "def add(a, b):", "parameters": {"max_new_tokens": 5}}).json()
    assert out.choices[0].text == generate["generated_text"]
    streamed = list(openai_client.completions.create(model="tgi", prompt="def add(a, b):", max_tokens=5,
                                                     temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_completions_several_prompts(server, openapi):
    body = {"prompt": ["import os", "class A:"], "max_tokens": 3, "temperature": 0}
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    full = r.json()
    openapi(full, "CompletionFinal")
    assert [c["index"] for c in full["choices"]] == [0, 1]
    prompt_tokens = sum(len(server.engine.tokenizer.encode(p)) for p in body["prompt"])
    assert full["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}
    assert "x-compute-time" not in r.headers and r.headers["x-generated-tokens"] == "6"
    payloads = stream_payloads(server, "/v1/completions", {**body, "stream": True})
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    finals = [e for e in events if "usage" in e]
    for e in events:
        openapi(e, "CompletionFinal" if "usage" in e else "Chunk")
    assert sorted(e["choices"][0]["index"] for e in finals) == [0, 1]
    assert all(e["choices"][0]["finish_reason"] == "" for e in events if "usage" not in e)
    for i in (0, 1):
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
        assert text == full["choices"][i]["text"]


def test_huggingface_hub_chat_completion(inference_client):
    out = inference_client.chat_completion(MESSAGES, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    chunks = list(inference_client.chat_completion(MESSAGES, max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == out.choices[0].message.content


def test_models_route(server, openapi):
    body = httpx.get(server.base_url + "/v1/models", timeout=60).json()
    assert body == {"object": "list", "data": [{"id": server.engine.model_id, "object": "model", "created": 0,
                                                "owned_by": server.engine.model_id}]}
    openapi(body["data"][0], "ModelInfo")


def test_invocations_dispatch_on_the_body(server):
    url = server.base_url + "/invocations"
    gen = httpx.post(url, json={"inputs": "x = 1", "parameters": {"max_new_tokens": 2}}, timeout=60).json()
    assert isinstance(gen, list) and gen[0]["generated_text"].startswith("x = 1")
    chat_body = httpx.post(url, json={"messages": MESSAGES, "max_tokens": 2}, timeout=60).json()
    assert chat_body["object"] == "chat.completion"
    comp = httpx.post(url, json={"prompt": "x = 1", "max_tokens": 2}, timeout=60).json()
    assert comp["object"] == "text_completion"


def test_text_generation_client_chat(server):
    """The deprecated TGI client's non-streaming chat (its stream parser cannot read TGI's deltas
    or `[DONE]`, against TGI itself too)."""
    import warnings

    from text_generation import Client

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = Client(server.base_url, timeout=60).chat(messages=MESSAGES, max_tokens=3, temperature=0.0)
    assert out.choices[0].finish_reason == "length" and out.usage["completion_tokens"] == 3
