"""core/grammar: compile cache, batched masks, EOS handling, tool grammar (tiny BPE tokenizer).

Generations are driven by random logits through the manager's masks: sampled from the masked
softmax with a seeded generator, 50 rows in one batch, stopped at EOS. Every output must parse
and validate; a row that reaches the token cap fails the test.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time

import jsonschema
import pytest
import torch

from textgen.core.grammar import (
    NO_TOOL_NAME, GrammarError, GrammarManager, ToolCall, ToolError, apply_token_mask, parse_tool_call,
    tool_call_grammar, unpack_bitmask,
)
from textgen.core.sampling_params import GrammarSpec

VOCAB = 1010  # logits width: wider than the tokenizer's 1000 ids, not a multiple of 32
EOS = 2
N_SAMPLES = 50
TOKEN_CAP = 120


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from textgen.testing.tiny_models import make_tokenizer

    path = tmp_path_factory.mktemp("grammar-tokenizer")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def gm(tokenizer):
    manager = GrammarManager(tokenizer, VOCAB, max_threads=2)
    yield manager
    manager.close()


def sample_step(gm, states, gen):
    """One batched step: mask, random logits, masked softmax sample, advance; returns the tokens."""
    mask = gm.fill_bitmask(states)
    logits = apply_token_mask(torch.randn(len(states), VOCAB, generator=gen), mask)
    tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1).tolist()
    for state, token in zip(states, tokens):
        assert gm.advance(state, token), f"the grammar rejected masked token {token}"
    return tokens


def generate(gm, tokenizer, spec, n=N_SAMPLES, seed=0, cap=TOKEN_CAP) -> list[str]:
    compiled = gm.compile(spec).result(timeout=30)
    gen = torch.Generator().manual_seed(seed)
    states = [gm.new_state(compiled) for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))
    for _ in range(cap):
        tokens = sample_step(gm, [states[i] for i in active], gen)
        for i, token in zip(list(active), tokens):
            if token == EOS:
                assert states[i].is_terminated and states[i].accepts_eos
                active.remove(i)
            else:
                outputs[i].append(token)
        if not active:
            return [tokenizer.decode(ids) for ids in outputs]
    raise AssertionError(f"{len(active)} rows reached {cap} tokens: {tokenizer.decode(outputs[active[0]])!r}")


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required if required is not None else
            list(properties), "additionalProperties": False}


SCHEMAS = {
    "nested": obj({"user": obj({"name": {"type": "string", "maxLength": 6},
                                "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
                   "active": {"type": "boolean"}}),
    "arrays": obj({"tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 2, "maxItems": 4},
                   "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                              "maxItems": 3},
                   "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"},
                                                          "minItems": 1, "maxItems": 2}, "maxItems": 2}}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2.5, None, "XL"]},
                  "kind": {"const": "fixed"}}),
    "integers": obj({"a": {"type": "integer", "minimum": 10, "maximum": 99},
                     "b": {"type": "integer", "minimum": -1000, "maximum": -900},
                     "c": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}}),
    "required": obj({"id": {"type": "integer", "minimum": 0, "maximum": 9}, "note": {"type": "string", "maxLength": 5},
                     "flag": {"type": "boolean"}}, required=["id"]),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                    "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.(com|org)$"}}),
    "top_level_array": {"type": "array", "items": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                        "minItems": 1, "maxItems": 3},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_generations_parse_and_validate(gm, tokenizer, name):
    schema = SCHEMAS[name]
    texts = generate(gm, tokenizer, GrammarSpec("json", schema), seed=len(name))
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
        assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text)), text  # compact JSON


def test_required_and_optional_fields_both_occur(gm, tokenizer):
    texts = generate(gm, tokenizer, GrammarSpec("json", SCHEMAS["required"]), seed=7)
    keys = [set(json.loads(t)) for t in texts]
    assert all("id" in k for k in keys)
    assert any("note" in k for k in keys) and any("note" not in k for k in keys)


REGEXES = [r"(yes|no|[0-9]{1,3})", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"(ab|cd)+x",
           r"[αβγ]{1,3}!?", r"(?i)(ok|fine)!{0,2}"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_generations_fully_match(gm, tokenizer, pattern):
    for text in generate(gm, tokenizer, GrammarSpec("regex", pattern), seed=len(pattern)):
        assert re.fullmatch(pattern, text), text


def test_regex_classes_are_unicode_json_patterns_ascii(gm, tokenizer):
    """A regex grammar follows Rust's (and Python's) Unicode classes; a JSON-schema pattern
    follows ECMA-262, where \\d is [0-9]."""
    def accepts(spec, text):
        state = gm.new_state(gm.compile(spec).result())
        return all(gm.advance(state, t) for t in tokenizer.encode(text, add_special_tokens=False))

    assert accepts(GrammarSpec("regex", r"\d{3}"), "١٢٣") and accepts(GrammarSpec("regex", r"\d{3}"), "123")
    pattern = GrammarSpec("json", {"type": "string", "pattern": "^\\d{3}$"})
    assert accepts(pattern, '"123"') and not accepts(pattern, '"١٢٣"')


def test_first_mask_is_exactly_the_prefix_tokens(gm, tokenizer):
    state = gm.new_state(gm.compile(GrammarSpec("regex", "yes|no")).result())
    mask = gm.fill_bitmask([state, None])
    assert mask.shape == (2, VOCAB) and mask.dtype == torch.bool
    expected = {i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids
                and (text := tokenizer.decode([i])) and ("yes".startswith(text) or "no".startswith(text))}
    assert set(mask[0].nonzero().flatten().tolist()) == expected
    assert mask[1].all()  # a row without a grammar allows everything, padding ids included
    assert not mask[0, len(tokenizer):].any()  # ids past the tokenizer never appear in a grammar row


def test_after_completion_only_eos(gm, tokenizer):
    state = gm.new_state(gm.compile(GrammarSpec("json", SCHEMAS["enums"])).result())
    for token in tokenizer.encode('{"color":"red","size":2.5,"kind":"fixed"}', add_special_tokens=False):
        assert not state.accepts_eos
        assert gm.fill_bitmask([state])[0, token] and gm.advance(state, token)
    assert state.accepts_eos and state.is_complete and not state.is_terminated
    assert gm.fill_bitmask([state])[0].nonzero().flatten().tolist() == [EOS]
    assert gm.advance(state, EOS) and state.is_terminated and state.error is None
    assert not gm.advance(state, EOS)  # nothing after EOS


def test_every_eos_id_ends_a_complete_grammar(tokenizer):
    gm = GrammarManager(tokenizer, VOCAB, max_threads=1, eos_token_ids=[2, 3])
    try:
        state = gm.new_state(gm.compile(GrammarSpec("regex", "[0-9]")).result())
        assert gm.advance(state, tokenizer.convert_tokens_to_ids("7"))
        assert gm.fill_bitmask([state])[0].nonzero().flatten().tolist() == [2, 3]
        assert gm.advance(state, 3) and state.is_terminated
    finally:
        gm.close()


def test_rejected_token_fails_the_state_and_masks_to_eos(gm, tokenizer):
    state = gm.new_state(gm.compile(GrammarSpec("regex", "yes|no")).result())
    assert not gm.advance(state, tokenizer.convert_tokens_to_ids("x"))
    assert state.is_terminated and state.error.startswith("Parser Error: token")
    assert gm.fill_bitmask([state])[0].nonzero().flatten().tolist() == [EOS]  # never an all-false row
    assert not gm.advance(state, EOS)


def test_json_object_allows_any_object_only(gm, tokenizer):
    fut = gm.compile(GrammarSpec("json_object"))
    assert fut is gm.compile(GrammarSpec("json", {"type": "object"}))
    state = gm.new_state(fut.result())
    allowed = gm.fill_bitmask([state])[0].nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([i]).startswith("{") for i in allowed)
    for token in tokenizer.encode('{"a":[1,{"b":null}],"c":"x"}', add_special_tokens=False):
        assert gm.advance(state, token)
    assert state.is_complete
    assert not gm.advance(gm.new_state(fut.result()), tokenizer.convert_tokens_to_ids("["))


def test_json_object_with_a_value_is_tgi_alias_of_json(gm):
    schema = obj({"x": {"const": 1}})
    assert gm.compile(GrammarSpec("json_object", schema)) is gm.compile(GrammarSpec("json", schema))


INVALID = [
    (GrammarSpec("json", {"type": "foo"}), "Invalid type: foo"),
    (GrammarSpec("json", {"not": {"type": "string"}}), 'Unimplemented keys: ["not"]'),
    (GrammarSpec("json", {"type": "integer", "minimum": 5, "maximum": 1}),
     "Unsatisfiable schema: minimum (5) is greater than maximum (1)"),
    (GrammarSpec("json", {"$ref": "#/nope"}), "Pointer '/nope' does not exist"),
    (GrammarSpec("json", "{not json"),
     "the JSON schema is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (GrammarSpec("json", [1]), "a JSON schema must be a JSON object, got list"),
    (GrammarSpec("regex", 5), "a regex grammar needs a string pattern, got int"),
    (GrammarSpec("xml", "<a/>"), "unknown grammar type 'xml'; expected one of json, json_object, regex"),
]


@pytest.mark.parametrize("spec,message", INVALID, ids=[m[:24] for _, m in INVALID])
def test_invalid_grammar_raises_the_compilers_message(gm, spec, message):
    with pytest.raises(GrammarError) as info:
        gm.compile(spec).result(timeout=30)
    assert str(info.value) == message
    assert gm.validate(spec) == [message]
    with pytest.raises(GrammarError):
        gm.new_state(gm.compile(spec))


def test_invalid_regex_reports_llguidance_error(gm):
    (message,) = gm.validate(GrammarSpec("regex", "(ab"))
    assert message.startswith('at 1(8): invalid regex "(ab" (in regex): regex parse error:')
    assert "error: unclosed group" in message
    assert gm.validate(GrammarSpec("regex", "(ab)")) == []


def test_cache_hit_returns_the_same_compiled_object(gm):
    schema = obj({"k": {"enum": ["v", "w"]}, "n": {"type": "integer", "minimum": 1, "maximum": 3}})
    hits, misses = gm.stats.hits, gm.stats.misses
    first = gm.compile(GrammarSpec("json", schema))
    compiled = first.result()
    assert gm.compile(GrammarSpec("json", dict(schema))) is first
    assert gm.compile(GrammarSpec("json", json.dumps(schema, indent=2))).result() is compiled
    assert (gm.stats.hits - hits, gm.stats.misses - misses) == (2, 1)
    assert gm.new_state(compiled).matcher is not gm.new_state(compiled).matcher


def test_property_order_is_part_of_the_key_and_of_the_output(gm, tokenizer):
    ba = {"type": "object", "properties": {"b": {"const": 2}, "a": {"const": 1}}, "required": ["b", "a"],
          "additionalProperties": False}
    ab = {**ba, "properties": {"a": {"const": 1}, "b": {"const": 2}}}
    assert gm.compile(GrammarSpec("json", ba)).result() is not gm.compile(GrammarSpec("json", ab)).result()
    assert generate(gm, tokenizer, GrammarSpec("json", ba), n=2) == ['{"b":2,"a":1}'] * 2
    assert generate(gm, tokenizer, GrammarSpec("json", ab), n=2) == ['{"a":1,"b":2}'] * 2


def test_concurrent_compiles_of_one_spec_share_one_compilation(gm):
    spec = GrammarSpec("regex", r"[a-f]{4}-[0-9]{1,6}")
    barrier, futures = threading.Barrier(8), []

    def worker():
        barrier.wait()
        futures.append(gm.compile(spec))

    misses = gm.stats.misses
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(futures) == 8 and all(f is futures[0] for f in futures)
    assert gm.stats.misses - misses == 1


def big_schema(n: int) -> dict:
    return obj({f"field_{i}": obj({"a": {"type": "integer", "minimum": 0, "maximum": 1000 + i},
                                   "b": {"type": "string", "pattern": f"[a-z]{{1,{i % 7 + 1}}}[0-9]+"},
                                   "c": {"enum": [f"v{i}_{j}" for j in range(20)]}}) for i in range(n)})


def test_compile_runs_off_thread_while_the_engine_keeps_stepping(gm, tokenizer):
    small = gm.compile(GrammarSpec("regex", "[0-9]{1,3}")).result()
    fut = gm.compile(GrammarSpec("json", big_schema(300)))
    assert not fut.done() and not gm.ready(fut)
    done_on: list[str] = []
    fut.add_done_callback(lambda _: done_on.append(threading.current_thread().name))
    gen, state, steps = torch.Generator().manual_seed(0), gm.new_state(small), 0
    while not fut.done():
        if sample_step(gm, [state], gen)[0] == EOS:
            state = gm.new_state(small)
        steps += 1
    assert gm.ready(fut) and fut.result().compile_seconds > 0
    assert steps > 0 and done_on[0].startswith("textgen-grammar")


def test_unpack_bitmask_bit_order_and_sign_bit():
    bitmask = torch.tensor([[1 | (1 << 5), -(1 << 31)], [-1, 0]], dtype=torch.int32)
    mask = unpack_bitmask(bitmask, 63)
    assert mask.shape == (2, 63)
    assert mask[0].nonzero().flatten().tolist() == [0, 5]  # bit 63 (sign of word 1) is cut off
    assert mask[1, :32].all() and not mask[1, 32:].any()
    assert unpack_bitmask(bitmask, 64)[0].nonzero().flatten().tolist() == [0, 5, 63]


def test_no_grammar_rows_give_no_mask(gm):
    assert gm.fill_bitmask([None, None]) is None


# -- tools ------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 8},
                                                    "unit": {"$ref": "#/$defs/Unit"}},
                   "required": ["location", "unit"], "$defs": {"Unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "arguments": {"type": "object", "properties": {"timezone": {"enum": ["UTC", "CET"]},
                                                                       "hour24": {"type": "boolean"}},
                                      "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]


def test_tool_grammar_has_tgis_shape():
    spec = tool_call_grammar([TIME], "required")
    assert spec == GrammarSpec("json", {
        "$functions": {"get_time": {
            "type": "object", "description": "",
            "properties": {"_name": {"type": "string", "const": "get_time"},
                           "timezone": {"enum": ["UTC", "CET"]}, "hour24": {"type": "boolean"}},
            "required": ["_name", "timezone"], "additionalProperties": False}},
        "type": "object", "properties": {"function": {"anyOf": [{"$ref": "#/$functions/get_time"}]}},
        "required": ["function"], "additionalProperties": False})


def test_tool_choice_selects_functions():
    def names(choice):
        return [r["$ref"].rsplit("/", 1)[1]
                for r in tool_call_grammar(TOOLS, choice).value["properties"]["function"]["anyOf"]]

    assert names("auto") == names(None) == ["get_weather", "get_time", NO_TOOL_NAME]
    assert names("required") == ["get_weather", "get_time"]
    assert names("get_time") == names({"type": "function", "function": {"name": "get_time"}}) == ["get_time"]
    no_tool = tool_call_grammar(TOOLS, "auto").value["$functions"][NO_TOOL_NAME]
    assert no_tool["description"] == "Open ended response with no specific tool selected"
    assert tool_call_grammar(TOOLS, "none") is None and tool_call_grammar([], "auto") is None
    assert tool_call_grammar(None, "required") is None
    with pytest.raises(ToolError, match="^Tool with name nope not found$"):
        tool_call_grammar(TOOLS, "nope")
    with pytest.raises(ToolError, match="^tool_choice must be"):
        tool_call_grammar(TOOLS, {"type": "function"})
    with pytest.raises(ToolError, match="^tool names must be unique; get_time is given twice$"):
        tool_call_grammar([TIME, TIME], "auto")


@pytest.mark.parametrize("choice,allowed", [("auto", {"get_weather", "get_time", NO_TOOL_NAME}),
                                            ("required", {"get_weather", "get_time"}),
                                            ("get_weather", {"get_weather"})])
def test_generated_tool_calls_parse_into_declared_functions(gm, tokenizer, choice, allowed):
    params = {t["function"]["name"]: t["function"].get("parameters") or t["function"]["arguments"] for t in TOOLS}
    params[NO_TOOL_NAME] = {"type": "object", "additionalProperties": False}
    seen = set()
    for text in generate(gm, tokenizer, tool_call_grammar(TOOLS, choice), seed=len(choice)):
        call = parse_tool_call(text, TOOLS)
        assert call is not None and call.name in allowed, text
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, {**params[call.name], "additionalProperties": False})
        assert json.loads(text) == {"function": {"_name": call.name, **arguments}}
        seen.add(call.name)
    assert seen == allowed


def test_parse_tool_call_keeps_order_and_rejects_unknown():
    text = '{"function":{"_name":"get_weather","unit":"c","location":"Zürich"}}'
    assert parse_tool_call(text, TOOLS) == ToolCall("get_weather", '{"unit":"c","location":"Zürich"}')
    assert parse_tool_call('{"function":{"_name":"no_tool"}}', TOOLS) == ToolCall(NO_TOOL_NAME, "{}")
    assert parse_tool_call('{"function":{"_name":"rm_rf"}}', TOOLS) is None
    assert parse_tool_call('{"function":{"_name":"get_weather"', TOOLS) is None
    assert parse_tool_call('{"function":"get_weather"}', TOOLS) is None
    assert parse_tool_call('[1]', TOOLS) is None


# -- overhead (printed for the report, not asserted) ------------------------------------------

def _ms_per_step(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) * 1000 / steps


def test_print_mask_overhead_at_batch_32(gm, tokenizer, capsys):
    compiled = gm.compile(GrammarSpec("json", SCHEMAS["nested"])).result()
    gen = torch.Generator().manual_seed(0)
    states = [gm.new_state(compiled) for _ in range(32)]

    def plain():
        logits = torch.randn(32, VOCAB, generator=gen)
        torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)

    def constrained():
        for i, token in enumerate(sample_step(gm, states, gen)):
            if token == EOS:
                states[i] = gm.new_state(compiled)

    base, with_grammar = _ms_per_step(plain, 100), _ms_per_step(constrained, 100)
    mask = gm.fill_bitmask(states)
    fill = _ms_per_step(lambda: gm.fill_bitmask(states), 100)
    apply = _ms_per_step(lambda: apply_token_mask(torch.randn(32, VOCAB), mask), 100)
    big = torch.randint(-(1 << 31), (1 << 31) - 1, (32, (128256 + 31) // 32), dtype=torch.int32)
    logits = torch.randn(32, 128256)
    unpack_big = _ms_per_step(lambda: apply_token_mask(logits, unpack_bitmask(big, 128256)), 10)
    with capsys.disabled():
        print(f"\n[grammar overhead, B=32, V={VOCAB}] sample only {base:.3f} ms/step; with grammar "
              f"(fill+apply+sample+advance) {with_grammar:.3f} ms/step (+{with_grammar - base:.3f}); "
              f"fill_bitmask {fill:.3f} ms; apply {apply:.3f} ms; "
              f"unpack+apply at V=128256 {unpack_big:.3f} ms (1 torch thread, load {os.getloadavg()[0]:.1f})")
    assert mask.shape == (32, VOCAB)
