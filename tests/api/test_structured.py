"""Structured output end to end through the real server and the tiny random-weight Llama: TGI's
`grammar` on the generation routes, `response_format` (TGI's and OpenAI's shapes) and tools on
chat, through raw HTTP and the openai SDK. Every constrained output is parsed and validated; tool
calls are validated against the tool's own parameters schema."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import jsonschema
import pytest
import torch

from tests.api.conftest import sse_events

PROMPT = "def handler(request):"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
PER_SCHEMA = 8


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


SCHEMAS = [
    obj({"user": obj({"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 18, "maximum": 99}}),
         "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3}}),
    obj({"id": {"type": "integer", "minimum": 1, "maximum": 5}, "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
         "note": {"type": "string", "maxLength": 5}}, required=["id", "code"]),
]
REGEXES = [r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)", r"(yes|no|maybe)!?"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": obj({"location": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}}, required=["location", "unit"])}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Recherche Web — résultats",
    "parameters": obj({"query": {"type": "string", "maxLength": 10}, "limit": {"type": "integer", "minimum": 1, "maximum": 3}})}}
TOOLS = [WEATHER, SEARCH]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=60)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60)


async def post_all(server, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        return await asyncio.gather(*(http.post(path, json=b) for b in bodies))


def grammar_body(grammar: dict, seed: int, **params) -> dict:
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": 150, "do_sample": True, "seed": seed,
                                             "grammar": grammar, "details": True, **params}}


# -- TGI generation routes -------------------------------------------------------------------


def test_sampled_json_schema_and_regex_generations_through_generate(server):
    bodies = [grammar_body({"type": "json", "value": s}, seed) for s in SCHEMAS for seed in range(PER_SCHEMA)]
    bodies += [grammar_body({"type": "regex", "value": p}, seed) for p in REGEXES for seed in range(PER_SCHEMA)]
    responses = asyncio.run(post_all(server, "/generate", bodies))
    texts = [r.json()["generated_text"] for r in responses]
    for i, (r, out) in enumerate(zip(responses, texts)):
        assert r.status_code == 200 and r.json()["details"]["finish_reason"] == "eos_token", out
        k = i // PER_SCHEMA
        if k < len(SCHEMAS):
            jsonschema.validate(json.loads(out), SCHEMAS[k])
        else:
            assert re.fullmatch(REGEXES[k - len(SCHEMAS)], out), out
    assert len(set(texts[:PER_SCHEMA])) > PER_SCHEMA // 2  # seeds really sample
    again = post(server, "/generate", bodies[3]).json()["generated_text"]
    assert again == texts[3]  # same seed, same output


def test_grammar_with_sampling_knobs_compat_route_and_json_string_schema(server):
    knobs = dict(temperature=0.8, top_k=30, top_p=0.9, typical_p=0.95, repetition_penalty=1.2, watermark=True)
    body = grammar_body({"type": "json", "value": json.dumps(SCHEMAS[1])}, 11, **knobs)
    r = post(server, "/", {**body, "stream": False})
    assert r.status_code == 200
    (out,) = r.json()
    jsonschema.validate(json.loads(out["generated_text"].removeprefix(PROMPT)), SCHEMAS[1])


def test_generate_stream_with_grammar(server):
    body = grammar_body({"type": "json", "value": SCHEMAS[0]}, 5)
    with httpx.stream("POST", server.base_url + "/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r.read().decode().split("\n"))]
    final = events[-1]
    assert final["details"]["finish_reason"] == "eos_token"
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == final["generated_text"]
    jsonschema.validate(json.loads(final["generated_text"]), SCHEMAS[0])
    assert final["generated_text"] == post(server, "/generate", body).json()["generated_text"]


def test_grammar_and_stop_sequence(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "stop": ["@"],
                                             "grammar": {"type": "regex", "value": REGEXES[0]}, "details": True}}
    out = post(server, "/generate", body).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert re.fullmatch(r"[a-z]{2,8}@", out["generated_text"])


@pytest.mark.parametrize(("grammar", "message"), [
    ({"type": "regex", "value": "a(b"}, "unclosed group"),
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
     "does not exist"),
])
def test_a_grammar_that_does_not_compile_is_a_422_with_the_compilers_message(server, grammar, message):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"grammar": grammar}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    error = r.json()["error"]
    assert error.startswith("Input validation error: grammar is not valid: ") and message in error
    with httpx.stream("POST", server.base_url + "/generate_stream", json={"inputs": PROMPT, "parameters":
                                                                          {"grammar": grammar}}, timeout=60) as r:
        events = sse_events(r.read().decode().split("\n"))
    assert r.status_code == 200 and [json.loads(e) for e in events] == [{"error": error, "error_type": "validation"}]


def test_other_streams_keep_flowing_while_a_300_property_schema_compiles(server):
    """The compile of a fresh 300-property schema (~0.2 s) runs in a worker thread: a running
    stream keeps receiving tokens between the grammar request's submission and its first token."""
    schema = obj({f"field_{i}": {"type": "integer", "minimum": -i * 1234567 - time.time_ns() % 997,
                                 "maximum": 1000 + i * 3777777} for i in range(300)})
    assert len(schema["properties"]) == 300

    async def scenario() -> tuple[list[float], float, float, str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            plain_times: list[float] = []
            started = asyncio.Event()

            async def plain() -> None:
                body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}
                async with http.stream("POST", "/generate_stream", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            plain_times.append(time.monotonic())
                            started.set()
                        if len(plain_times) > 1 and big_first.done():
                            return

            big_first: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(plain())
            await started.wait()
            submitted = time.monotonic()
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "grammar": {"type": "json", "value": schema}}}
            first = ""
            async with http.stream("POST", "/generate_stream", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        first = json.loads(line[6:])["token"]["text"]
                        big_first.set_result(time.monotonic())
                        break
            await task
            return plain_times, submitted, big_first.result(), first

    plain_times, submitted, big_first, first = asyncio.run(scenario())
    during = [t for t in plain_times if submitted < t < big_first]
    assert first == "{" or first.startswith('{"')
    assert big_first - submitted > 0.05  # the compile really took a while
    assert len(during) >= 5, (len(during), big_first - submitted)


# -- chat: response_format -------------------------------------------------------------------


@pytest.mark.parametrize("response_format", [
    {"type": "json", "value": SCHEMAS[0]},
    {"type": "json_object", "value": SCHEMAS[0]},
    {"type": "json_schema", "value": {"name": "user", "schema": SCHEMAS[0]}},
    {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMAS[0], "strict": True}},
], ids=["tgi-json", "tgi-json_object-alias", "tgi-json_schema", "openai-json_schema"])
def test_response_format_shapes(server, response_format):
    body = {"messages": MESSAGES, "response_format": response_format, "max_tokens": 150, "seed": 3}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[0])


def test_response_format_through_the_openai_sdk(client, server):
    for seed in range(4):
        out = client.chat.completions.create(
            model="tgi", messages=MESSAGES, max_tokens=150, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1], "strict": True}})
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMAS[1])
    # Any JSON object: free-form keys never end for a random model unless `"` is favoured.
    quote = server.engine.tokenizer.convert_tokens_to_ids('"')
    for seed in range(3):
        anything = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=60, seed=seed,
                                                  response_format={"type": "json_object"}, logit_bias={str(quote): 100})
        assert anything.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    chunks = list(client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=150, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}}))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content for c in chunks)), SCHEMAS[1])
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_invalid_response_format_is_a_422_before_or_inside_the_stream(server):
    bad = {"type": "regex", "value": "(("}
    r = post(server, "/v1/chat/completions", {"messages": MESSAGES, "response_format": bad})
    assert r.status_code == 422 and "unclosed group" in r.json()["error"]
    with httpx.stream("POST", server.base_url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "response_format": bad, "stream": True}, timeout=60) as s:
        events = sse_events(s.read().decode().split("\n"))
    assert json.loads(events[0]) == {"error": {"message": r.json()["error"], "http_status_code": 422}}
    assert events[1:] == ["[DONE]"]


# -- chat: tools ----------------------------------------------------------------------------


def test_tool_prompt_is_injected_like_tgi(server):
    from textgen.api.tools import DEFAULT_TOOL_PROMPT, NO_TOOL

    def templated(body: dict) -> str:
        return post(server, "/chat_tokenize", {"messages": MESSAGES, **body}).json()["templated_text"]

    def expected(tools: list, prompt: str) -> str:
        tools_json = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))  # serde keeps non-ASCII
        content = MESSAGES[0]["content"] + "\n---\n" + tools_json + "\n" + prompt
        return f"<s>user\n{content}</s>\n<s>assistant\n"

    assert templated({"tools": TOOLS}) == expected([*TOOLS, NO_TOOL], DEFAULT_TOOL_PROMPT)
    assert templated({"tools": TOOLS, "tool_choice": "required", "tool_prompt": "Pick one."}) == expected(TOOLS, "Pick one.")
    assert templated({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}}) == \
        expected([SEARCH], DEFAULT_TOOL_PROMPT)
    assert templated({"tools": TOOLS, "tool_choice": "none"}) == templated({})


def test_template_that_renders_tools_gets_them_and_only_the_tool_prompt(server):
    from textgen.api.chat_template import render_chat
    from textgen.api.schemas_openai import ChatMessage
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.engine.model_path)
    tok.chat_template = ("{% if tools %}TOOLS{{ tools | map(attribute='function') | map(attribute='name') | list }}"
                         "{% endif %}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    out = render_chat(tok, [ChatMessage(role="user", content="hi")], TOOLS, "Use a tool.")
    assert out == "TOOLS['get_weather', 'search'][user] hi\n---\nUse a tool.\n"


def check_call(call, id_: str = "0") -> dict:
    assert call.type == "function" and call.id == id_
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMS[call.function.name])
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "search"}}, "search"])
def test_tool_calls_through_the_openai_sdk(client, tool_choice):
    names = set()
    for seed in range(3):
        out = client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                             max_tokens=120, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        check_call(call)
        names.add(call.function.name)
    if tool_choice != "required":
        assert names == {"search"}


def test_streamed_tool_call_deltas_match_the_non_stream_call(client, server):
    kw = dict(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120, seed=4)
    full = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.id, first.type, first.function.name) == (0, "0", "function", full.function.name)
    assert first.function.arguments.startswith("{")
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments for d in deltas)
    assert json.loads(arguments) == json.loads(full.function.arguments)
    jsonschema.validate(json.loads(arguments), PARAMS[full.function.name])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices) == chunks[-1].usage.completion_tokens
    with client.chat.completions.stream(**{k: v for k, v in kw.items()}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert final.message.tool_calls[0].function.arguments == arguments


def test_auto_returns_tool_calls_or_the_plain_answer_for_no_tool(client, server):
    """Under "auto" the model may choose `no_tool`; TGI then answers the conversation without
    tools, so the content equals a plain chat with the same seed."""
    kinds = set()
    for seed in range(10):
        out = client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=80, seed=seed)
        choice = out.choices[0]
        if choice.message.tool_calls:
            check_call(choice.message.tool_calls[0])
            kinds.add("call")
            continue
        plain = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=80, seed=seed).choices[0]
        assert choice.message.content == plain.message.content and choice.finish_reason == plain.finish_reason
        streamed = client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                                  seed=seed, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.message.content
        kinds.add("no_tool")
        if kinds == {"call", "no_tool"}:
            break
    assert kinds == {"call", "no_tool"}


def test_tool_choice_none_n_choices_and_call_ids(server, client):
    plain = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, seed=1)
    ignored = client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                             max_tokens=5, seed=1)
    assert ignored.choices[0].message.content == plain.choices[0].message.content
    history = [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "4", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "4", "content": "sunny"}, {"role": "user", "content": "And in Rome?"}]
    out = client.chat.completions.create(model="tgi", messages=history, tools=TOOLS, tool_choice="required",
                                         max_tokens=120, n=2, seed=9)
    assert [c.index for c in out.choices] == [0, 1]
    calls = [check_call(c.message.tool_calls[0], id_="5") for c in out.choices]
    assert calls[0] != calls[1]  # distinct seeds per choice
    chunks = list(client.chat.completions.create(model="tgi", messages=history, tools=TOOLS, tool_choice="required",
                                                 max_tokens=120, n=2, seed=9, stream=True))
    for index in (0, 1):
        deltas = [c.choices[0].delta.tool_calls[0] for c in chunks
                  if c.choices and c.choices[0].index == index and c.choices[0].delta.tool_calls]
        assert deltas[0].id == "5"
        assert json.loads("".join(d.function.arguments for d in deltas)) == calls[index]


@pytest.mark.parametrize(("extra", "message"), [
    ({"response_format": {"type": "json_object"}}, "Tool error: Grammar and tools are mutually exclusive"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "Tool error: Tool with name nope not found"),
    ({"tool_choice": 7}, "Tool error: tool_choice must be"),
])
def test_tool_errors_are_422_before_any_stream(server, extra, message):
    for stream in (False, True):
        r = post(server, "/v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS, "stream": stream, **extra})
        assert r.status_code == 422 and r.json()["error_type"] == "tool_error"
        assert r.json()["error"].startswith(message)


def tool_stream(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as s:
        events = sse_events(s.read().decode().split("\n"))
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_a_tool_call_cut_by_max_tokens(server, openapi):
    """Non-stream: TGI's parse error. Streaming: an error event while the name is incomplete; once
    the call has started, the partial arguments and finish_reason "length"."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "seed": 1}
    full = post(server, "/v1/chat/completions", {**body, "max_tokens": 120}).json()
    openapi(full, "ChatCompletion")  # TGI's ToolCallMessage (plus OpenAI's content: null)
    assert full["choices"][0]["message"]["tool_calls"][0]["function"]["description"] is None
    n = full["usage"]["completion_tokens"]
    for max_tokens in (6, n - 6):
        r = post(server, "/v1/chat/completions", {**body, "max_tokens": max_tokens})
        assert r.status_code == 422 and r.json()["error"].startswith("Tool error: Failed to parse generated text")
        events = tool_stream(server, {**body, "max_tokens": max_tokens})
        if max_tokens == 6:
            assert events == [{"error": {"message": r.json()["error"], "http_status_code": 422}}]
            continue
        choices = [e["choices"][0] for e in events]
        assert choices[-1]["finish_reason"] == "length"
        arguments = "".join(c["delta"]["tool_calls"][0]["function"]["arguments"] for c in choices)
        expected = full["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        assert len(arguments) < len(expected) and expected.startswith(arguments)


@pytest.mark.parametrize(("text", "name", "arguments"), [
    ('{"function":{"_name":"get_weather","location":"Pa\\"ris}","unit":"celsius"}}', "get_weather",
     '{"location":"Pa\\"ris}","unit":"celsius"}'),
    ('{"function":{"_name":"f"}}', "f", "{}"),
    ('{"function":{"_name":"s","q":{"a":[1,{}]}}}', "s", '{"q":{"a":[1,{}]}}'),
])
@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_tool_call_stream_pieces_concatenate_to_the_arguments(text, name, arguments, size):
    from textgen.api.tools import ToolCallStream

    stream, pieces = ToolCallStream(), []
    chunks = [text[i:i + size] for i in range(0, len(text), size)] + [""]  # the EOS token adds no text
    for k, chunk in enumerate(chunks):
        piece = stream.feed(chunk, finished=k == len(chunks) - 1, complete=True)
        if piece is not None:
            pieces.append(piece)
    assert stream.name == name and pieces[0].startswith("{")
    assert "".join(pieces) == arguments


def test_tool_call_stream_cut_short_sends_everything_and_waits_for_the_name():
    from textgen.api.tools import ToolCallStream

    stream = ToolCallStream()
    assert stream.feed('{"function":{"_na') is None and stream.feed('me":"f"') == "{"
    assert stream.feed(',"a":{"b":1}') == '"a":{"b":1' and stream.feed("", finished=True) == "}"
