"""Grammars through the engine on the tiny random-weight Llama (the hardest case: the model knows
nothing about JSON, so every structural token comes from the mask).

Many seeded sampled requests run in one batch; every output must parse, validate and end on EOS.
Grammars must also survive what the engine does to requests: other sampling parameters, stop
sequences, batching with unconstrained requests, preemption by recompute, prefix-cache hits,
and a slow compile that must not hold up the others.
"""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from textgen.core.config import EngineConfig
from textgen.core.engine.engine_core import EngineCore
from textgen.core.engine.types import EngineRequest
from textgen.core.sampling_params import GrammarSpec, SamplingParams

N_SAMPLES = 50
PROMPT = "def handler(request):\n    return"


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


SCHEMAS = {
    "nested_with_integer_bounds": obj({
        "user": obj({"name": {"type": "string", "maxLength": 8},
                     "age": {"type": "integer", "minimum": 18, "maximum": 99},
                     "address": obj({"zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                                     "country": {"enum": ["FR", "DE", "US"]}})}),
        "balance": {"type": "integer", "minimum": -500, "maximum": -100}}),
    "arrays_and_enums": obj({
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "points": {"type": "array", "items": obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                  "ok": {"type": "boolean"}}), "maxItems": 2},
        "level": {"enum": [1, 2.5, None, "max"]}}),
    "required_and_optional": obj({
        "id": {"type": "integer", "minimum": 1, "maximum": 5},
        "note": {"type": "string", "maxLength": 6}, "flag": {"type": "boolean"},
        "kind": {"const": "event"}}, required=["id", "kind"]),
    "string_patterns": obj({
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{2,5}\\.(com|org)$"},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}}),
}
REGEXES = [r"(yes|no|maybe)", r"[a-z]{2,8}@[a-z]{2,6}\.(com|org|net)", r"\+33 [0-9]{3}( [0-9]{2}){3}",
           r"(ab|cd)+x?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def core(tiny_llama) -> EngineCore:
    return EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32"))


def sampled(spec: GrammarSpec | None, seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 160, "do_sample": True, "temperature": 1.0, "seed": seed,
                             "grammar": spec, **kw})


def run(core: EngineCore, params: list[SamplingParams], prompts: list[list[int]] | None = None,
        on_step=None) -> list[list]:
    """Submits one request per params (in order), steps until all finish; the events of each."""
    ids = core.tokenizer.encode(PROMPT)
    events: list[list] = [[] for _ in params]
    for i, p in enumerate(params):
        prompt = prompts[i] if prompts is not None else ids
        core.add_request(EngineRequest(f"g{time.monotonic_ns()}-{i}", list(prompt), p), events[i].append)
    while not all(e and e[-1].finished for e in events):
        if not core.step():
            time.sleep(0.001)  # only compiles pending
        if on_step is not None:
            on_step()
    return events


def text(events: list) -> str:
    return "".join(e.text for e in events)


def token_ids(events: list) -> list[int]:
    return [e.token.id for e in events if e.token is not None]


def test_50_sampled_generations_per_schema_parse_and_validate_in_one_batch(core):
    names = list(SCHEMAS)
    params = [sampled(GrammarSpec("json", SCHEMAS[name]), seed) for name in names for seed in range(N_SAMPLES)]
    results = run(core, params)
    for k, name in enumerate(names):
        outs = results[k * N_SAMPLES:(k + 1) * N_SAMPLES]
        texts = [text(ev) for ev in outs]
        for ev, out in zip(outs, texts):
            assert ev[-1].finish_reason == "eos_token", (name, out)
            jsonschema.validate(json.loads(out), SCHEMAS[name])
            assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', out)), out  # compact JSON
        assert len(set(texts)) > N_SAMPLES // 2, (name, texts[:5])  # the seeds really sample
    optional = [json.loads(text(ev)) for ev in results[2 * N_SAMPLES:3 * N_SAMPLES]]
    assert any("note" in o for o in optional) and any("note" not in o for o in optional)


def test_regex_generations_fully_match(core):
    params = [sampled(GrammarSpec("regex", pattern), seed) for pattern in REGEXES for seed in range(20)]
    results = run(core, params)
    for k, pattern in enumerate(REGEXES):
        for ev in results[k * 20:(k + 1) * 20]:
            assert ev[-1].finish_reason == "eos_token"
            assert re.fullmatch(pattern, text(ev)), (pattern, text(ev))


def test_seeded_grammar_sampling_is_reproducible_and_batch_invariant(core):
    """A seeded request gives the same tokens alone and among unconstrained and other grammar
    rows, with every sampling parameter that could interact with the mask."""
    schema = SCHEMAS["nested_with_integer_bounds"]
    knobs = dict(temperature=0.7, top_k=40, top_p=0.9, typical_p=0.95, repetition_penalty=1.3,
                 frequency_penalty=0.5, presence_penalty=0.3, min_p=0.01)
    target = sampled(GrammarSpec("json", schema), 1234, **knobs)
    (alone,) = run(core, [target])
    mixed = run(core, [sampled(None, 1, max_new_tokens=30), target, sampled(GrammarSpec("regex", REGEXES[1]), 2),
                       SamplingParams(max_new_tokens=20), sampled(GrammarSpec("json", schema), 1235, **knobs)])
    assert token_ids(mixed[1]) == token_ids(alone)
    for ev in (alone, mixed[1], mixed[4]):
        jsonschema.validate(json.loads(text(ev)), schema)
    assert token_ids(mixed[4]) != token_ids(alone)
    assert re.fullmatch(REGEXES[1], text(mixed[2]))


def test_greedy_grammar_with_stop_sequence_ends_at_the_stop(core):
    spec = GrammarSpec("regex", r"[a-z]{3,5}-[0-9]{2}-[a-z]{2}")
    (full,) = run(core, [SamplingParams(max_new_tokens=40, grammar=spec)])
    assert re.fullmatch(spec.value, text(full)) and full[-1].finish_reason == "eos_token"
    (cut,) = run(core, [SamplingParams(max_new_tokens=40, grammar=spec, stop=["-"])])
    assert cut[-1].finish_reason == "stop_sequence"
    assert text(cut) == text(full)[: text(full).index("-") + 1]


def test_preemption_keeps_grammar_state_and_outputs(tiny_llama, core):
    """12 blocks of 16 tokens cannot hold 8 requests of 40+ tokens: requests are preempted and
    recomputed mid-grammar. Their grammar state must continue where it was, so the outputs equal
    those of an engine with room for all."""
    tight = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32", num_kv_blocks=12,
                                    block_size=16))
    schema = obj({"items": {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999},
                            "minItems": 12, "maxItems": 12}, "name": {"type": "string", "maxLength": 10}})
    params = [sampled(GrammarSpec("json", schema), seed) for seed in range(8)]
    prompts = [tight.tokenizer.encode(PROMPT + f" {i} * x") for i in range(8)]
    got = run(tight, params, prompts)
    assert tight.scheduler.stats().num_preemptions > 0
    ref = run(core, params, prompts)
    assert [token_ids(e) for e in got] == [token_ids(e) for e in ref]
    for ev in got:
        assert ev[-1].finish_reason == "eos_token"
        jsonschema.validate(json.loads(text(ev)), schema)
    assert tight.stats().kv_cache_usage == 0.0


def test_prefix_cache_hit_with_grammar(tiny_llama):
    """The second request reuses the cached prompt blocks of the first; its constrained output is
    the one an engine without prefix caching produces."""
    cached = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32"))
    fresh = EngineCore(EngineConfig(model_id=tiny_llama, backend="cpu", dtype="float32", enable_prefix_caching=False))
    prefix = cached.tokenizer.encode("import json\n" + "value = json.loads(text)\n" * 20)[:120]
    spec = GrammarSpec("json", SCHEMAS["required_and_optional"])
    first, second = prefix + cached.tokenizer.encode(" a", add_special_tokens=False), prefix + [40, 41]
    run(cached, [sampled(spec, 7)], [first])
    (hit,) = run(cached, [sampled(spec, 8)], [second])
    (ref,) = run(fresh, [sampled(spec, 8)], [second])
    assert max(e.num_cached_tokens for e in hit) == (120 // 16) * 16
    assert token_ids(hit) == token_ids(ref)
    jsonschema.validate(json.loads(text(hit)), SCHEMAS["required_and_optional"])


def large_schema(n: int = 300, salt: int = 0) -> dict:
    """Wide integer ranges make llguidance build big number lexers: a compile of ~0.2 s."""
    return obj({f"field_{i}": {"type": "integer", "minimum": -i * 1234567 - salt, "maximum": 1000 + i * 3777777}
                for i in range(n)})


def test_other_requests_keep_stepping_while_a_large_schema_compiles(core):
    """The compile runs on the grammar manager's thread: the engine steps the unconstrained
    request all along, and the grammar request waits in `pending_grammar` without a slot."""
    spec = GrammarSpec("json", large_schema(salt=time.monotonic_ns() % 1000))  # never cached before
    events: dict[str, list] = {"plain": [], "big": []}
    ids = core.tokenizer.encode(PROMPT)
    plain_id = f"plain-{time.monotonic_ns()}"
    core.add_request(EngineRequest(plain_id, ids, SamplingParams(max_new_tokens=500, ignore_eos=True)),
                     events["plain"].append)
    core.step()
    before = len(events["plain"])
    core.add_request(EngineRequest(f"big-{time.monotonic_ns()}", ids, SamplingParams(max_new_tokens=12, grammar=spec)),
                     events["big"].append)
    assert core.pending_grammar  # compiling
    while not events["big"]:
        core.step()
    stepped = len(events["plain"]) - before
    core.abort([plain_id])
    while core.step():
        pass
    assert core.grammar.compile(spec).result().compile_seconds > 0.05
    assert stepped >= 5, "the engine waited for the compile"
    assert text(events["big"]).startswith('{"field_0":')


def test_a_grammar_that_does_not_compile_fails_alone(core):
    bad = SamplingParams(max_new_tokens=10, grammar=GrammarSpec("regex", "a(b"))
    good = SamplingParams(max_new_tokens=10, grammar=GrammarSpec("regex", "[0-9]{5}"))
    failed, ok = run(core, [bad, good])
    assert failed[-1].finish_reason == "error" and "grammar: " in failed[-1].error and "unclosed group" in failed[-1].error
    assert re.fullmatch("[0-9]{5}", text(ok)) and ok[-1].finish_reason == "eos_token"
