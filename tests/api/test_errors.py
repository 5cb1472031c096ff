"""Every error a client can get, through raw HTTP: TGI's status codes, `{"error", "error_type"}`
bodies with TGI's texts in TGI's validation order, in-stream errors, auth, limits, overload."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import API_KEY, sse_events

V = "Input validation error: "
CASES = [  # (parameters, message) — each body breaks the rule under test and every later one
    ({"best_of": 2, "temperature": 0, "max_new_tokens": 0}, V + "`temperature` must be strictly positive"),
    ({"best_of": 2}, V + "you must use sampling when `best_of` is > 1"),
    ({"temperature": -1, "repetition_penalty": 0}, V + "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0, "frequency_penalty": 3}, V + "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": -2.5, "top_p": 1.0}, V + "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0, "typical_p": 0}, V + "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0, "top_k": 0}, V + "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0, "max_new_tokens": 0}, V + "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0, "stop": ["a"] * 5}, V + "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a"] * 5, "top_n_tokens": 9}, V + "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6, "truncate": 0}, V + "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, V + "`truncate` must be strictly positive and less than 1023. Given: 0"),
    ({"truncate": 2000}, V + "`truncate` must be strictly positive and less than 1023. Given: 2000"),
    ({"max_new_tokens": 1020}, V + "`inputs` tokens + `max_new_tokens` must be <= 1024. Given: 8 `inputs` tokens "
                                   "and 1020 `max_new_tokens`"),
    ({"grammar": {"type": "json", "value": {"type": "object"}}},
     V + "grammar is not valid: Grammar must have a 'properties' field"),
    ({"grammar": {"type": "json", "value": "{not json"}}, V + "grammar is not valid: Expecting property name "
                                                            "enclosed in double quotes: line 1 column 2 (char 1)"),
    ({"grammar": {"type": "json", "value": 3}}, V + "grammar is not supported"),
]


def post(base: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=60, **kw)


@pytest.mark.parametrize(("params", "message"), CASES)
def test_validation_messages_in_tgi_order(server, openapi, params, message):
    r = post(server.base_url, "/generate", {"inputs": "def add(a, b):", "parameters": params})
    assert (r.status_code, r.json()) == (422, {"error": message, "error_type": "validation"})
    openapi(r.json(), "ErrorResponse")
    assert not any(h.startswith("x-") for h in r.headers)


def test_input_length_and_empty_inputs(server):
    """TGI checks inputs + the first max_new_tokens chunk before the input length, so the input
    length message only shows for an input of exactly max_total_tokens with no max_new_tokens."""
    long_text = " x" * 1023  # BOS + 1023 tokens = max_total_tokens
    n = len(server.engine.tokenizer.encode(long_text))
    assert n == 1024
    r = post(server.base_url, "/generate", {"inputs": long_text, "parameters": {}})
    assert r.json()["error"] == V + "`inputs` must have less than 1023 tokens. Given: 1024"
    r = post(server.base_url, "/generate", {"inputs": long_text, "parameters": {"max_new_tokens": 1}})
    assert r.json()["error"] == V + "`inputs` tokens + `max_new_tokens` must be <= 1024. Given: 1024 `inputs` " \
                                    "tokens and 1 `max_new_tokens`"
    r = post(server.base_url, "/generate", {"inputs": long_text + " x", "parameters": {}})
    assert r.json()["error"] == V + "`inputs` tokens + `max_new_tokens` must be <= 1024. Given: 1025 `inputs` " \
                                    "tokens and 0 `max_new_tokens`"
    r = post(server.base_url, "/generate", {"inputs": "", "parameters": {"temperature": 0.5}})
    assert r.json()["error"] == V + "`inputs` cannot be empty"


def test_truncate_keeps_the_last_tokens(server):
    long_text = "x" * 3000
    r = post(server.base_url, "/generate", {"inputs": long_text, "parameters": {"truncate": 10, "max_new_tokens": 2}})
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "10"


def test_best_of_limits(server):
    body = lambda best_of, **p: {"inputs": "x", "parameters": {"best_of": best_of, "do_sample": True, **p}}  # noqa: E731
    assert post(server.base_url, "/generate", body(3)).json()["error"] == V + "`best_of` must be > 0 and <= 2. Given: 3"
    assert post(server.base_url, "/generate", body(2, seed=1)).json()["error"] == \
        V + "`seed` must not be set when `best_of` > 1"
    assert post(server.base_url, "/generate", body(0, max_new_tokens=1)).status_code == 200  # 0 counts as 1


@pytest.mark.parametrize(("body", "text"), [
    ({"parameters": {}}, "inputs: Field required"),
    ({"inputs": 3}, "inputs: Input should be a valid string"),
    ({"inputs": "x", "parameters": {"max_new_tokens": -1}}, "parameters.max_new_tokens: Input should be greater than "
                                                            "or equal to 0"),
    ({"inputs": "x", "parameters": {"do_sample": None}}, "parameters.do_sample: Input should be a valid boolean"),
    ({"inputs": "x", "parameters": {"stop": None}}, "parameters.stop: Input should be a valid list"),
    ({"inputs": "x", "parameters": {"temperature": "0.5"}}, "parameters.temperature: Input should be a valid number"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": 1}}}, "parameters.grammar.type: Input should "
                                                                             "be 'json', 'json_object', 'regex', "
                                                                             "'json_schema' or 'text'"),
])
def test_wrong_shapes_are_422_deserialize_errors(server, body, text):
    r = post(server.base_url, "/generate", body)
    assert r.status_code == 422
    assert r.json() == {"error": f"Failed to deserialize the JSON body into the target type: {text}",
                        "error_type": "validation"}


def test_bad_json_wrong_content_type_unknown_route_wrong_method(server):
    r = httpx.post(server.base_url + "/generate", content=b'{"inputs": ', timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("Failed to parse the request body as JSON: ")
    r = httpx.post(server.base_url + "/generate", content=b'{"inputs": "x"}', timeout=60,
                   headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["error"] == "Expected request with `Content-Type: application/json`"
    assert httpx.get(server.base_url + "/nope", timeout=60).status_code == 404
    assert httpx.get(server.base_url + "/generate", timeout=60).status_code == 405


def test_stream_errors_are_events_with_status_200(server):
    cases = [({"best_of": 2, "do_sample": True}, V + "`best_of` != 1 is not supported when streaming tokens"),
             ({"decoder_input_details": True}, V + "`decoder_input_details` == true is not supported when streaming "
                                                   "tokens"),
             ({"temperature": 0}, V + "`temperature` must be strictly positive")]
    for params, message in cases:
        with httpx.stream("POST", server.base_url + "/generate_stream", timeout=60,
                          json={"inputs": "x", "parameters": params}) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode().split("\n"))
        assert [json.loads(e) for e in events] == [{"error": message, "error_type": "validation"}]


def test_openai_errors(server):
    url = server.base_url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    with httpx.stream("POST", url, json={"messages": messages, "top_p": 1.0, "stream": True}, timeout=60) as r:
        events = sse_events(r.read().decode().split("\n"))
    assert r.status_code == 200
    assert events == [json.dumps({"error": {"message": V + "`top_p` must be > 0.0 and < 1.0",
                                            "http_status_code": 422}}, separators=(",", ":")), "[DONE]"]
    r = httpx.post(url, json={"messages": messages, "top_p": 1.0}, timeout=60)
    assert (r.status_code, r.json()["error_type"]) == (422, "validation")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(url, json={"messages": messages, "tools": tools, "tool_choice": "g", "stream": True}, timeout=60)
    assert (r.status_code, r.json()) == (422, {"error": "Tool error: Tool with name g not found",
                                               "error_type": "tool_error"})
    r = httpx.post(url, json={"messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200
    r = httpx.post(url, json={"messages": messages, "n": 3}, timeout=60)
    assert r.json()["error"] == V + "`n` must be > 0 and <= 2. Given: 3"
    comp = server.base_url + "/v1/completions"
    r = httpx.post(comp, json={"prompt": "x", "suffix": "y"}, timeout=60)
    assert (r.status_code, r.json()) == (422, {"error": "Suffix is not supported and can be achieved by "
                                               "preprocessing the prompt.", "error_type": "suffix not supported"})
    r = httpx.post(comp, json={"prompt": ["x"] * 5}, timeout=60)
    assert r.json() == {"error": "Number of prompts exceeds the maximum allowed batch size of 4",
                        "error_type": "batch size exceeded"}
    r = httpx.post(comp, json={"prompt": []}, timeout=60)
    assert r.json()["error"].endswith("prompt: Empty array detected. Do not use an empty array for the prompt.")


def test_api_key_only_on_generation_routes(strict_server):
    base = strict_server.base_url
    body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
    assert post(base, "/generate", body).status_code == 401
    assert post(base, "/generate", body, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert post(base, "/generate", body, headers={"authorization": f"bearer {API_KEY.upper()}"}).status_code == 200
    assert post(base, "/v1/chat/completions", {"messages": []}).status_code == 401
    assert post(base, "/tokenize", {"inputs": "x"}).status_code == 401
    assert post(base, "/chat_tokenize", {"messages": [{"role": "user", "content": "x"}]}).status_code == 200
    for path in ("/health", "/info", "/metrics", "/v1/models"):
        assert httpx.get(base + path, timeout=60).status_code == 200, path


def test_payload_limit_is_413(strict_server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    r = post(strict_server.base_url, "/generate", {"inputs": "x" * 5000}, headers=auth)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is enforced on the bytes received
        yield b'{"inputs": "'
        yield b"x" * 5000
        yield b'"}'

    r = httpx.post(strict_server.base_url + "/generate", content=chunks(), timeout=60,
                   headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413


def test_cors_origin_list(strict_server):
    preflight = {"origin": "http://allowed.example", "access-control-request-method": "POST"}
    r = httpx.options(strict_server.base_url + "/generate", headers=preflight, timeout=60)
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    r = httpx.options(strict_server.base_url + "/generate", headers={**preflight, "origin": "http://evil.example"},
                      timeout=60)
    assert "access-control-allow-origin" not in r.headers


def test_overloaded_is_429_and_an_event_on_streams(strict_server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    base = strict_server.base_url
    long = {"inputs": "def f():", "parameters": {"max_new_tokens": 1000}}
    with httpx.stream("POST", base + "/generate_stream", json=long, headers=auth, timeout=60) as holder:
        lines = holder.iter_lines()  # kept: dropping the iterator closes the connection (and aborts)
        assert next(lines).startswith("data: ")  # the only permit is taken
        r = post(base, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}}, headers=auth)
        assert (r.status_code, r.json()) == (429, {"error": "Model is overloaded", "error_type": "overloaded"})
        with httpx.stream("POST", base + "/generate_stream", json=long, headers=auth, timeout=60) as second:
            assert second.status_code == 200
            events = sse_events(second.read().decode().split("\n"))
        assert [json.loads(e) for e in events] == [{"error": "Model is overloaded", "error_type": "overloaded"}]
    metrics = httpx.get(base + "/metrics", timeout=60).text
    assert 'tgi_request_failure{err="overloaded"} 2.0' in metrics


def test_adapter_id_is_refused_until_lora_lands(server):
    """`adapter_id` was accepted and silently ignored: a request for an adapter got the base model."""
    r = post(server.base_url, "/generate", {"inputs": "x", "parameters": {"adapter_id": "my-lora", "max_new_tokens": 2}})
    assert r.status_code == 422
    assert r.json() == {"error": V + "LoRA adapters are not enabled: `adapter_id` 'my-lora' cannot be served",
                        "error_type": "validation"}
