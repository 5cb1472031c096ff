"""Every generation parameter through the real engine, checked against an independent reference:
transformers' model and processors plus TGI's formulas written out here, token for token and
logprob for logprob, alone and inside one batch that mixes all of them.

The reference sampler is TGI's `Sampling`: after the warpers, probs / Exp(1) noise drawn from a
generator seeded with the request's seed ([V] draws per step), argmax. The reference watermark
detector re-derives TGI's greenlist (seed = 15485863 * previous token, randperm of the vocabulary).
`Reference` is also used by tests/api/test_parameters.py.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from textgen.core import LLM
from textgen.core.engine.types import EngineRequest, RequestOutput
from textgen.core.sampling_params import SamplingParams

TOL = 1e-4
HASH_KEY = 15485863
PROMPTS = ["def add(a, b):", "import os\nimport sys", "class Foo(object):\n    pass", "x = [1, 2, 3]"]


@dataclass
class Processing:
    """What the reference applies to the raw logits, in the sampler's order (bias, penalties,
    then warpers for sampled rows)."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float = 1.0
    tgi_frequency_penalty: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0

    def params(self, **extra) -> SamplingParams:
        fields = {k: v for k, v in vars(self).items() if k != "logit_bias"}
        return SamplingParams(logit_bias=dict(self.logit_bias) or None, **fields, **extra)

    def apply(self, prompt: list[int], output: list[int], logits: torch.Tensor, sampling: bool) -> torch.Tensor:
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper, TypicalLogitsWarper)

        scores = logits.clone().unsqueeze(0)
        for token, bias in self.logit_bias.items():
            scores[0, token] += bias
        seen = torch.tensor([prompt + output])
        if self.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(self.repetition_penalty)(seen, scores)
        if self.tgi_frequency_penalty:  # TGI: count in prompt + output / its length
            freq = torch.bincount(seen[0], minlength=scores.shape[-1]).float() / seen.shape[1]
            scores -= self.tgi_frequency_penalty * freq
        if self.frequency_penalty or self.presence_penalty:  # OpenAI: over the output only
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=scores.shape[-1]).float()
            scores -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).float()
        if sampling:
            for on, warper in ((self.temperature != 1.0, lambda: TemperatureLogitsWarper(self.temperature)),
                               (self.top_k > 0, lambda: TopKLogitsWarper(self.top_k)),
                               (self.top_p < 1.0, lambda: TopPLogitsWarper(self.top_p)),
                               (self.typical_p < 1.0, lambda: TypicalLogitsWarper(self.typical_p))):
                if on:
                    scores = warper()(seen, scores)
        return scores[0]


class Reference:
    """transformers' model, one full forward per step (no cache: nothing shared with textgen)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """logprob of ids[t] given ids[:t], for t >= 1."""
        lp = torch.log_softmax(self.logits(ids)[:-1], dim=-1)
        return lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()

    def generate(self, prompt: list[int], n: int, proc: Processing | None = None, seed: int | None = None,
                 eos: int | None = 2) -> tuple[list[int], list[float], list[torch.Tensor]]:
        """(token ids, their logprobs, the logprob vector of each step); greedy unless `seed`."""
        proc = proc or Processing()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        out, lps, dists = [], [], []
        for _ in range(n):
            scores = proc.apply(prompt, out, self.logits(prompt + out)[-1], sampling=generator is not None)
            logprobs = torch.log_softmax(scores, dim=-1)
            if generator is None:
                token = int(scores.argmax())
            else:
                noise = torch.empty(scores.shape).exponential_(1, generator=generator)
                token = int((scores.softmax(-1) / noise).argmax())
            out.append(token)
            lps.append(float(logprobs[token]))
            dists.append(logprobs)
            if token == eos:
                break
        return out, lps, dists


def greenlist(prev_token: int, vocab_size: int, gamma: float) -> set[int]:
    generator = torch.Generator().manual_seed(HASH_KEY * prev_token)
    return set(torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)].tolist())


def green_fraction(prompt: list[int], output: list[int], vocab_size: int, gamma: float) -> float:
    prev = [prompt[-1], *output[:-1]]
    return sum(t in greenlist(p, vocab_size, gamma) for p, t in zip(prev, output)) / len(output)


_ids = itertools.count()


def run(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list[list[RequestOutput]]:
    """Add every request, then step the engine until all finish: they share batches."""
    core = llm.engine
    events: list[list[RequestOutput]] = [[] for _ in requests]
    for i, (ids, params) in enumerate(requests):
        core.add_request(EngineRequest(f"p{next(_ids)}", list(ids), params), events[i].append)
    while any(not ev or not ev[-1].finished for ev in events):
        assert core.step(), "the engine stopped with unfinished requests"
    return events


def tokens(events: list[RequestOutput]) -> list[int]:
    return [e.token.id for e in events if e.token is not None]


def logprobs(events: list[RequestOutput]) -> list[float]:
    return [e.token.logprob for e in events if e.token is not None]


@pytest.fixture(scope="module")
def ref(tiny_llama) -> Reference:
    return Reference(tiny_llama)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, backend="cpu", dtype="float32", max_batch_prefill_tokens=32)


ROWS = {  # name -> (processing, seed); seed None = greedy
    "greedy": (Processing(), None),
    "repetition": (Processing(repetition_penalty=1.8), None),
    "tgi_frequency": (Processing(tgi_frequency_penalty=1.5), None),
    "openai_frequency": (Processing(frequency_penalty=1.5), None),
    "openai_presence": (Processing(presence_penalty=1.5), None),
    "logit_bias": (Processing(logit_bias={17: 0.3, 386: -100.0}), None),
    "temperature_top_k": (Processing(temperature=0.7, top_k=40), 11),
    "top_p_typical_p": (Processing(top_p=0.6, typical_p=0.9), 12),
    "everything": (Processing(logit_bias={5: 0.2}, repetition_penalty=1.3, tgi_frequency_penalty=0.5,
                              frequency_penalty=0.4, presence_penalty=0.3, temperature=1.3, top_k=100,
                              top_p=0.95, typical_p=0.95), 13),
}


def test_every_processor_matches_the_reference_inside_one_mixed_batch(llm, ref):
    """Token ids and logprobs (TGI's: after penalties and warpers) of 9 rows with different
    parameters, sampled rows seeded, all in the same batches; prompt logprobs on every row."""
    names = list(ROWS)
    prompts = [llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(len(names))]  # row i: prompt i % 4
    requests = [(ids, ROWS[name][0].params(max_new_tokens=12, do_sample=ROWS[name][1] is not None,
                                           seed=ROWS[name][1], prompt_logprobs=True, top_n_tokens=3))
                for name, ids in zip(names, prompts)]
    results = run(llm, requests)
    for name, ids, events in zip(names, prompts, results):
        proc, seed = ROWS[name]
        want_ids, want_lps, dists = ref.generate(ids, 12, proc, seed)
        assert tokens(events) == want_ids, name
        assert logprobs(events) == pytest.approx(want_lps, abs=TOL), name
        assert events[-1].seed == seed
        top = [[(t.id, t.logprob) for t in e.top_tokens] for e in events]
        for got, dist in zip(top, dists):
            values, index = dist.topk(3)
            assert [i for i, _ in got] == index.tolist() and [lp for _, lp in got] == pytest.approx(values.tolist(), abs=TOL)
        prefill = events[0].prompt_tokens
        assert [t.id for t in prefill] == ids and prefill[0].logprob is None
        assert [t.logprob for t in prefill[1:]] == pytest.approx(ref.prompt_logprobs(ids), abs=TOL), name


def test_penalties_and_bias_change_greedy_output(llm, ref):
    """The rows above would pass vacuously if a processor did nothing on their prompts."""
    for i, name in enumerate(ROWS):
        if ROWS[name][1] is None and name != "greedy":
            ids = llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
            assert ref.generate(ids, 12, ROWS[name][0])[0] != ref.generate(ids, 12)[0], name


def test_logit_bias_forces_and_bans(llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    (plain,) = run(llm, [(ids, SamplingParams(max_new_tokens=10))])
    first = tokens(plain)[0]
    forced, banned = run(llm, [(ids, SamplingParams(max_new_tokens=10, logit_bias={7: 100.0})),
                               (ids, SamplingParams(max_new_tokens=10, logit_bias={first: -100.0}))])
    assert tokens(forced) == [7] * 10
    assert first not in tokens(banned) and tokens(banned) != tokens(plain)


def test_seed_gives_the_same_tokens_alone_and_in_any_batch(llm):
    ids = llm.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, seed=2024)
    (alone,) = run(llm, [(ids, params)])
    others = [(llm.tokenizer.encode(p), SamplingParams(max_new_tokens=n, do_sample=True, top_p=0.8))
              for n, p in zip((3, 20, 9), PROMPTS)]
    mixed = run(llm, [others[0], (ids, params), *others[1:], (ids, SamplingParams(max_new_tokens=16, watermark=True))])
    assert tokens(mixed[1]) == tokens(alone) and logprobs(mixed[1]) == pytest.approx(logprobs(alone), abs=TOL)
    (reseeded,) = run(llm, [(ids, SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, seed=2025))])
    assert tokens(reseeded) != tokens(alone)
    unseeded = run(llm, [(ids, SamplingParams(max_new_tokens=16, do_sample=True))])[0]
    drawn = unseeded[-1].seed  # TGI reports the seed it drew; sending it back reproduces the text
    assert drawn is not None
    (again,) = run(llm, [(ids, SamplingParams(max_new_tokens=16, do_sample=True, seed=drawn))])
    assert tokens(again) == tokens(unseeded)


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(tiny_llama, ref):
    """A 16-token prefill budget splits the prompts into chunks and 12 KV blocks force
    preemption by recompute; the prompt logprobs must still be one per prompt token, exact."""
    tight = LLM(tiny_llama, backend="cpu", dtype="float32", num_kv_blocks=12, block_size=16, max_batch_prefill_tokens=16)
    text = "for i in range(10):\n    print(i)\n# now the same thing with a while loop\n"
    prompts = [tight.tokenizer.encode(text * k + p) for k, p in zip((1, 2, 1, 2), PROMPTS)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, prompt_logprobs=True)
    results = run(tight, [(ids, params) for ids in prompts])
    assert tight.engine.scheduler.stats().num_preemptions > 0
    for ids, events in zip(prompts, results):
        assert [t.logprob for t in events[0].prompt_tokens[1:]] == pytest.approx(ref.prompt_logprobs(ids), abs=TOL)
        assert tokens(events) == ref.generate(ids, 24, eos=None)[0]


def test_watermark_follows_watermark_gamma_and_delta(tiny_llama, monkeypatch):
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "6.0")
    marked_llm = LLM(tiny_llama, backend="cpu", dtype="float32")
    ids = marked_llm.tokenizer.encode(PROMPTS[3])
    base = dict(max_new_tokens=120, ignore_eos=True, do_sample=True, seed=7)
    marked, plain = run(marked_llm, [(ids, SamplingParams(watermark=True, **base)), (ids, SamplingParams(**base))])
    vocab = marked_llm.engine.runner.vocab_size
    assert len(tokens(marked)) == 120
    assert green_fraction(ids, tokens(marked), vocab, 0.25) > 0.85
    assert green_fraction(ids, tokens(plain), vocab, 0.25) < 0.4
