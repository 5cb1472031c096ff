"""Speculative decoding through the engine on tiny random models: greedy output identical to no
speculation (n-gram lookup and draft models, 16 prompts batched with chunked prefill), grammars,
stop sequences, max_new_tokens, preemption, seeded sampling and prefix caching."""
from __future__ import annotations

import json
import re

import pytest

from textgen.core import LLM
from textgen.core.engine.types import EngineRequest, RequestOutput
from textgen.core.sampling_params import GrammarSpec, SamplingParams

from tests.engine.test_generation import PROMPTS as GENERATION_PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    *GENERATION_PROMPTS,
    "a b c a b c a b c a b c a b",
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
    "foo bar foo bar foo bar foo",
    "the cat sat on the mat; the cat sat on the",
    "x = x + 1\nx = x + 1\nx = x + 1\nx =",
    "print('hi')\nprint('hi')\nprint(",
    "abcabcabcabcabcabcabc",
    "def f(): return f()\ndef g(): return g()\ndef h(): return",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=64)


@pytest.fixture(scope="module")
def baseline(plain):
    return plain.generate(PROMPTS, max_new_tokens=MAX_NEW)


def accepted_counter(llm: LLM) -> list[int]:
    counts: list[int] = []
    llm.engine.step_observers.append(lambda record: counts.extend(record.skipped_tokens))
    return counts


@pytest.fixture(scope="module")
def ngram(tiny_llama):
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=64, speculate=4)


def test_ngram_greedy_is_identical_to_no_speculation(ngram, baseline):
    counts = accepted_counter(ngram)
    outs = ngram.generate(PROMPTS, max_new_tokens=MAX_NEW)
    for base, out in zip(baseline, outs):
        assert out.token_ids == base.token_ids, out.prompt
        assert (out.text, out.finish_reason) == (base.text, base.finish_reason)
    assert sum(counts) > 0  # drafts were accepted, so the multi-token path ran
    assert len(counts) < sum(len(o.token_ids) for o in outs)  # fewer request-steps than tokens


@pytest.fixture(scope="module")
def draft_same(tiny_llama):
    """The target as its own draft: every greedy draft is accepted."""
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=64, speculate=3,
               speculative_model=tiny_llama)


@pytest.fixture(scope="module")
def draft_other(tiny_llama, tiny_model_factory):
    """Another random model with the same tokenizer and vocabulary (and one layer)."""
    other = tiny_model_factory("llama", num_hidden_layers=1)
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=64, speculate=3,
               speculative_model=other)


@pytest.mark.parametrize("which", ["draft_same", "draft_other"])
def test_draft_model_greedy_is_identical_to_no_speculation(which, request, baseline):
    llm = request.getfixturevalue(which)
    counts = accepted_counter(llm)
    outs = llm.generate(PROMPTS, max_new_tokens=MAX_NEW)
    for base, out in zip(baseline, outs):
        assert out.token_ids == base.token_ids, out.prompt
        assert (out.text, out.finish_reason) == (base.text, base.finish_reason)
    decoded = sum(len(o.token_ids) - 1 for o in outs)  # the first token of each comes from its prefill
    if which == "draft_same":
        assert sum(counts) >= 0.6 * decoded  # 3 of every 4 tokens when every draft is accepted
    assert len(counts) > 0


def run_events(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[RequestOutput]]:
    """Every event of each request, all requests in one batch."""
    events: list[list[RequestOutput]] = [[] for _ in prompts]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        llm.engine.add_request(EngineRequest(f"ev-{id(events)}-{i}", llm.tokenizer.encode(prompt), p), events[i].append)
    while any(not ev or not ev[-1].finished for ev in events):
        if not llm.engine.step() and not llm.engine.has_work():
            break
    return events


def summary(events: list[RequestOutput]) -> tuple:
    return ([e.token.id for e in events if e.token], [round(e.token.logprob, 4) for e in events if e.token],
            [[(t.id, round(t.logprob, 4)) for t in e.top_tokens] for e in events], "".join(e.text for e in events),
            events[-1].finish_reason)


def test_logprobs_top_tokens_and_penalties_match_per_position(plain, ngram):
    """Each verified position sees the output plus the drafts before it: the repetition and
    frequency penalties, and the logprobs TGI reports, equal the non-speculative ones."""
    params = [SamplingParams(max_new_tokens=MAX_NEW, top_n_tokens=3, repetition_penalty=1.3),
              SamplingParams(max_new_tokens=MAX_NEW, top_n_tokens=2, frequency_penalty=0.5, presence_penalty=0.2),
              SamplingParams(max_new_tokens=MAX_NEW, do_sample=True, top_k=1, seed=5, repetition_penalty=0.7)]
    prompts = [PROMPTS[8], PROMPTS[10], PROMPTS[14]]
    counts = accepted_counter(ngram)
    spec = run_events(ngram, prompts, params)
    base = run_events(plain, prompts, params)
    assert [summary(e) for e in spec] == [summary(e) for e in base]
    assert sum(counts) > 0


def test_grammar_with_speculation_gives_the_same_constrained_output(plain, ngram):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["ab", "ab ab", "cd"]},
                                                        "maxItems": 12}}, "required": ["tags"], "additionalProperties": False}
    params = [SamplingParams(max_new_tokens=60, grammar=GrammarSpec("json", schema)),
              SamplingParams(max_new_tokens=40, grammar=GrammarSpec("regex", r"(ab )+(cd )*x?"))]
    prompts = ['{"tags": ["ab", "ab", "ab", "ab"]}', "ab ab ab ab"]
    counts = accepted_counter(ngram)
    spec = run_events(ngram, prompts, params)
    base = run_events(plain, prompts, params)
    assert [summary(e) for e in spec] == [summary(e) for e in base]
    assert sum(counts) > 0
    assert json.loads(summary(spec[0])[3])["tags"] and summary(spec[0])[4] == "eos_token"
    assert re.fullmatch(r"(ab )+(cd )*x?", summary(spec[1])[3])


def test_stop_sequences_inside_accepted_drafts(plain, ngram, baseline):
    """A stop sequence may end inside a step's accepted drafts: nothing after it is emitted."""
    stops = [[b.text[len(b.text) // 2: len(b.text) // 2 + 3]] if len(b.text) > 8 else [] for b in baseline]
    params = [SamplingParams(max_new_tokens=MAX_NEW, stop=s) for s in stops]
    spec = run_events(ngram, PROMPTS, params)
    base = run_events(plain, PROMPTS, params)
    assert [summary(e) for e in spec] == [summary(e) for e in base]
    assert sum(e[-1].finish_reason == "stop_sequence" for e in spec) >= 8


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_max_new_tokens_is_never_passed(ngram, max_new):
    outs = ngram.generate(PROMPTS[8:12], max_new_tokens=max_new, ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [max_new] * 4
    assert all(o.finish_reason == "length" for o in outs)


def test_preemption_with_speculation(tiny_llama, plain):
    tight = LLM(tiny_llama, backend="cpu", dtype="float32", num_kv_blocks=12, block_size=16, speculate=4)
    ref = plain.generate(PROMPTS[:8], max_new_tokens=30, ignore_eos=True)
    outs = tight.generate(PROMPTS[:8], max_new_tokens=30, ignore_eos=True)
    assert tight.engine.scheduler.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert tight.engine.stats().kv_cache_usage == 0.0


def test_prefix_cache_hits_on_blocks_published_under_speculation(plain, ngram):
    """Generated tokens' blocks are published too; under speculation only accepted tokens' KV
    may be, so a follow-up turn that hits them must give the non-speculative tokens."""
    first = ngram.generate(PROMPTS[8:], max_new_tokens=40, ignore_eos=True)
    turns = [ngram.tokenizer.encode(p) + o.token_ids + ngram.tokenizer.encode(" and") for p, o in zip(PROMPTS[8:], first)]
    second = ngram.generate_ids(turns, max_new_tokens=12, ignore_eos=True)
    assert sum(o.num_cached_tokens for o in second) >= 8 * 32  # the turns hit their generated blocks
    assert [o.token_ids for o in second] == [o.token_ids for o in plain.generate_ids(turns, max_new_tokens=12, ignore_eos=True)]


def test_seeded_sampling_with_a_draft_model(draft_same, draft_other):
    """A seeded request alone is reproducible (its draws follow its own drafts, so the same
    schedule gives the same tokens); and a draft equal to the target samples from q == p, so the
    rejection sampler accepts every draft (q is processed exactly like the target's p)."""
    knobs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.1)
    for llm in (draft_same, draft_other):
        runs = [llm.generate(PROMPTS[9], **knobs)[0].token_ids for _ in range(2)]
        assert runs[0] == runs[1] and len(runs[0]) == 16
    counts = accepted_counter(draft_same)
    outs = draft_same.generate(PROMPTS[:6], **knobs)
    assert sum(counts) >= 0.6 * sum(len(o.token_ids) - 1 for o in outs)
