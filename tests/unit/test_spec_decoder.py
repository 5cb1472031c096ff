"""The engine side of speculative decoding without a model: n-gram proposals, the caps on drafts
(max_new_tokens, max_total_tokens, EOS) and the per-request back-off after rejected drafts."""
from __future__ import annotations

from dataclasses import dataclass

from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import Request, SchedulerOutput
from textgen.core.scheduler.outputs import ScheduledRequest
from textgen.core.spec_decode import NgramProposer, SpecDecoder, propose_ngram

EOS = 2


@dataclass
class State:
    generator: object = None
    grammar_state: object = None


def decoding(rid: str, prompt: list[int], output: list[int], max_new: int = 50) -> Request:
    r = Request(rid, prompt, SamplingParams(max_new_tokens=max_new), frozenset({EOS}))
    for t in output:
        r.append_output_token(t)
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_ngram_takes_the_longest_suffix_and_a_full_continuation():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert propose_ngram([9, 2, 3, 8, 5, 2, 3], 2) == [8, 5]  # the 2-gram (2, 3) before the 1-gram 3
    assert propose_ngram([9, 7, 7, 7, 7, 7, 7], 3) == [7, 7, 7]  # a cycle: not the match at the end
    assert propose_ngram([1, 2, 3, 4, 5], 3) == [] and propose_ngram([5], 3) == []


def test_drafts_are_capped_by_the_limits_and_stop_before_eos():
    spec = SpecDecoder(4, NgramProposer(), max_model_len=100, eos_token_ids=frozenset({EOS}))
    a = decoding("a", [5, 6, 7, 8, 9, 5], [6], max_new=3)  # 2 tokens left: 1 draft and 1 token
    b = decoding("b", [5, 6, 7, EOS, 9, 5, 6], [])  # the continuation holds EOS
    c = decoding("c", list(range(10, 20)) + [10, 11], [], max_new=50)  # max_model_len 100 is far
    spec.propose([a, b, c], {r.request_id: State() for r in (a, b, c)})
    assert (a.spec_token_ids, b.spec_token_ids, c.spec_token_ids) == ([7], [7], [12, 13, 14, 15])
    tight = SpecDecoder(4, NgramProposer(), max_model_len=14, eos_token_ids=frozenset({EOS}))
    tight.propose([c], {"c": State()})
    assert c.spec_token_ids == [12]  # 12 tokens now: 1 draft + 1 token reach 14


def test_rejected_drafts_back_off_exponentially_and_an_acceptance_resets():
    spec = SpecDecoder(2, NgramProposer(), max_model_len=1000, eos_token_ids=frozenset({EOS}))
    r = decoding("r", [5, 6, 5, 6], [5])
    states = {"r": State()}

    def step(accepted: int | None) -> bool:
        spec.propose([r], states)
        proposed = bool(r.spec_token_ids)
        s = ScheduledRequest(r, 1 + len(r.spec_token_ids), r.num_computed_tokens, [], [], True, list(r.spec_token_ids))
        spec.observe(SchedulerOutput(scheduled=[s]), {"r": accepted if proposed else 0})
        return proposed

    pattern = [step(0) for _ in range(20)]
    assert [i for i, proposed in enumerate(pattern) if proposed] == [0, 5, 14]  # skips 4, then 8
    assert step(1) is False  # still skipping (16 steps after the 3rd rejection)
    while not step(1):
        pass
    assert [step(1) for _ in range(3)] == [True, True, True]  # accepted: no more skipping
