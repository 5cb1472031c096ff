"""Speculative decoding through the engine on tiny random models: greedy output identical to no
speculation (n-gram lookup and draft models, 16 prompts batched with chunked prefill), grammars,
stop sequences, max_new_tokens, preemption, seeded sampling and prefix caching."""
from __future__ import annotations

import pytest

from textgen.core import LLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "def add(a, b):",
    "import os",
    "class Foo(object):\n    def __init__(self):",
    "x = 1",
    "for i in range(10):\n    print(i)\n# now the same thing with a while loop\n",
    "return",
    '"""A module docstring that goes on for a while, explaining what the module does and why."""',
    "if __name__ == '__main__':",
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
