"""The batched sampler against transformers' logits processors, row by row.

Every processor test builds a batch mixing rows with different settings (including neutral and
greedy rows) and checks that each row equals the transformers processor applied to that row alone.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    WatermarkLogitsProcessor,
)

from textgen.core.sampling import (
    Sampler,
    SamplingBatch,
    WatermarkConfig,
    compute_prompt_logprobs,
    make_generator,
    sampling_param_reasons,
)
from textgen.core.sampling_params import SamplingParams

V = 128
NEG_INF = float("-inf")


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn((rows, vocab), generator=torch.Generator().manual_seed(seed)) * 3.0


def build(params, prompts=None, outputs=None, generators=None, vocab: int = V) -> SamplingBatch:
    n = len(params)
    prompts = prompts if prompts is not None else [[1, 2, 3]] * n
    outputs = outputs if outputs is not None else [[]] * n
    generators = generators if generators is not None else [None] * n
    return SamplingBatch.build(params, prompts, outputs, generators, vocab, "cpu")


def processed(params, logits, prompts=None, outputs=None, allowed=None, sampler=None) -> torch.Tensor:
    sampler = sampler or Sampler(WatermarkConfig())
    return sampler.process(logits, build(params, prompts, outputs, vocab=logits.shape[1]), allowed)


def hf_row(processors, row_logits: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    scores = row_logits.unsqueeze(0).clone()
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    for processor in processors:
        scores = processor(ids, scores)
    return scores.squeeze(0)


def assert_rows(actual: torch.Tensor, expected: list[torch.Tensor]) -> None:
    for i, row in enumerate(expected):
        torch.testing.assert_close(actual[i], row, rtol=1e-6, atol=1e-6, msg=f"row {i}")


def sample(**kw) -> SamplingParams:
    return SamplingParams(do_sample=True, **kw)


# -- warpers ----------------------------------------------------------------------------------


def test_temperature_rows_match_transformers():
    temps = [0.5, 1.0, 2.0, 0.7]
    logits = random_logits(4)
    out = processed([sample(temperature=t) for t in temps], logits)
    assert_rows(out, [hf_row([TemperatureLogitsWarper(t)], logits[i]) for i, t in enumerate(temps)])


def test_top_k_rows_match_transformers():
    ks = [1, 5, 0, V + 10, 40]
    logits = random_logits(5, seed=1)
    out = processed([sample(top_k=k) for k in ks], logits)
    expected = [hf_row([TopKLogitsWarper(k)] if k else [], logits[i]) for i, k in enumerate(ks)]
    assert_rows(out, expected)
    assert int(torch.isfinite(out[0]).sum()) == 1 and int(torch.isfinite(out[1]).sum()) == 5


def test_top_p_rows_match_transformers():
    ps = [0.3, 0.9, 1.0, 0.5, 0.05]
    logits = random_logits(5, seed=2)
    out = processed([sample(top_p=p) for p in ps], logits)
    expected = [hf_row([TopPLogitsWarper(p)] if p < 1 else [], logits[i]) for i, p in enumerate(ps)]
    assert_rows(out, expected)
    assert torch.isinf(out[0]).any() and torch.isfinite(out[2]).all()


def test_typical_p_rows_match_transformers():
    ms = [0.2, 0.95, 1.0, 0.5]
    logits = random_logits(4, seed=3)
    out = processed([sample(typical_p=m) for m in ms], logits)
    expected = [hf_row([TypicalLogitsWarper(m)] if m < 1 else [], logits[i]) for i, m in enumerate(ms)]
    assert_rows(out, expected)
    assert torch.isinf(out[0]).any()


def test_min_p_rows_match_transformers():
    ms = [0.05, 0.5, 0.0, 1.0]
    logits = random_logits(4, seed=4)
    out = processed([sample(min_p=m) for m in ms], logits)
    assert_rows(out, [hf_row([MinPLogitsWarper(m)], logits[i]) for i, m in enumerate(ms)])
    assert torch.isinf(out[0]).any() and torch.isfinite(out[2]).all()


def test_warper_chain_per_row_matches_transformers_order():
    """temperature -> top_k -> top_p -> typical_p -> min_p, each row with its own subset."""
    rows = [dict(temperature=0.6, top_k=20, top_p=0.8), dict(temperature=1.5, typical_p=0.7, min_p=0.02),
            dict(top_k=50, top_p=0.95, typical_p=0.9, min_p=0.01), dict(temperature=0.3)]
    logits = random_logits(4, seed=5)
    out = processed([sample(**r) for r in rows], logits)
    expected = []
    for i, r in enumerate(rows):
        chain = [TemperatureLogitsWarper(r["temperature"])] if "temperature" in r else []
        chain += [TopKLogitsWarper(r["top_k"])] if "top_k" in r else []
        chain += [TopPLogitsWarper(r["top_p"])] if "top_p" in r else []
        chain += [TypicalLogitsWarper(r["typical_p"])] if "typical_p" in r else []
        chain += [MinPLogitsWarper(r["min_p"])] if "min_p" in r else []
        expected.append(hf_row(chain, logits[i]))
    assert_rows(out, expected)


def test_greedy_rows_skip_warpers_and_unused_processors_are_not_built():
    greedy = SamplingParams(temperature=0.5, top_k=3, top_p=0.5)  # do_sample False: warpers ignored
    batch = build([greedy, SamplingParams()])
    assert (batch.temperature, batch.top_k, batch.top_p_cutoff, batch.typical_p, batch.min_p) == (None,) * 5
    assert (batch.seen, batch.output_counts, batch.logit_bias, batch.sample_rows) == (None, None, None, [])
    logits = random_logits(2, seed=6)
    torch.testing.assert_close(Sampler(WatermarkConfig()).process(logits, batch), logits, rtol=0, atol=0)


# -- penalties and biases -----------------------------------------------------------------------


def test_repetition_penalty_rows_match_transformers_over_prompt_and_output():
    penalties = [1.3, 1.0, 0.7, 2.0]
    prompts = [[5, 6, 7, 5], [1, 2], [9, 9, 10], [0, V - 1]]
    outputs = [[8, 6], [3], [], [V - 1, 4, 4]]
    logits = random_logits(4, seed=7)
    params = [SamplingParams(repetition_penalty=p) for p in penalties[:2]] + [sample(repetition_penalty=p)
                                                                               for p in penalties[2:]]
    out = processed(params, logits, prompts, outputs)
    expected = [hf_row([RepetitionPenaltyLogitsProcessor(p)] if p != 1 else [], logits[i], prompts[i] + outputs[i])
                for i, p in enumerate(penalties)]
    assert_rows(out, expected)
    assert not torch.equal(out[0], logits[0])


def test_logit_bias_rows_match_sequence_bias_processor():
    biases = [{3: 5.0, 10: -100.0}, None, {0: 1.5, V - 1: -2.0, 3: 0.25}]
    logits = random_logits(3, seed=8)
    out = processed([SamplingParams(logit_bias=b) for b in biases], logits)
    expected = [hf_row([SequenceBiasLogitsProcessor([[[t], v] for t, v in b.items()])] if b else [], logits[i])
                for i, b in enumerate(biases)]
    assert_rows(out, expected)


def openai_reference(row: torch.Tensor, output: list[int], frequency: float, presence: float) -> torch.Tensor:
    row = row.clone()
    for token, count in Counter(output).items():
        row[token] -= frequency * count + presence
    return row


def test_openai_frequency_and_presence_penalties_count_the_output_only():
    cases = [(0.5, 0.0), (0.0, 1.0), (-0.8, 0.3), (0.0, 0.0)]
    prompts = [[4, 4, 4], [4, 7], [1], [2]]
    outputs = [[7, 7, 9], [7, 7, 7, 11], [5, 5], [2, 2]]
    logits = random_logits(4, seed=9)
    out = processed([SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in cases], logits,
                    prompts, outputs)
    assert_rows(out, [openai_reference(logits[i], outputs[i], f, p) for i, (f, p) in enumerate(cases)])
    assert out[0][4] == logits[0][4]  # prompt tokens are not penalized


def tgi_frequency_reference(row: torch.Tensor, input_ids: list[int], penalty: float) -> torch.Tensor:
    """TGI's HeterogeneousFrequencyPenaltyLogitsProcessor on a one-row batch."""
    ids = torch.tensor([input_ids])
    freq = torch.zeros(1, row.shape[0]).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
    return (row.unsqueeze(0) - freq / ids.shape[1] * penalty).squeeze(0)


def test_tgi_frequency_penalty_matches_tgi_over_prompt_and_output():
    penalties = [1.0, 0.0, -1.5, 2.0]
    prompts = [[4, 4, 4, 5], [4, 7], [1, 2, 3], [2]]
    outputs = [[5, 9], [7], [3, 3], []]
    logits = random_logits(4, seed=10)
    out = processed([SamplingParams(tgi_frequency_penalty=p) for p in penalties], logits, prompts, outputs)
    assert_rows(out, [tgi_frequency_reference(logits[i], prompts[i] + outputs[i], p) for i, p in enumerate(penalties)])


def paper_watermark(row: torch.Tensor, prev_token: int, gamma: float, delta: float) -> torch.Tensor:
    """Kirchenbauer et al. Algorithm 2 written out: seed with hash(prev token), permute, bias the greenlist."""
    rng = torch.Generator().manual_seed(15485863 * prev_token)
    green = torch.randperm(row.shape[0], generator=rng)[: int(row.shape[0] * gamma)]
    biased = row.clone()
    biased[green] += delta
    return biased


def test_watermark_rows_match_the_paper_and_transformers():
    logits = random_logits(3, seed=11)
    prompts, outputs = [[5, 17], [5, 17], [9]], [[42], [], []]
    params = [SamplingParams(watermark=True), SamplingParams(watermark=True), SamplingParams()]
    out = processed(params, logits, prompts, outputs)
    assert_rows(out, [paper_watermark(logits[0], 42, 0.5, 2.0), paper_watermark(logits[1], 17, 0.5, 2.0), logits[2]])
    hf = WatermarkLogitsProcessor(vocab_size=V, device="cpu", greenlist_ratio=0.5, bias=2.0)
    torch.testing.assert_close(out[0], hf_row([hf], logits[0], prompts[0] + outputs[0]))
    assert int((out[0] != logits[0]).sum()) == V // 2


def test_watermark_gamma_and_delta_come_from_the_environment():
    config = WatermarkConfig.from_env({"WATERMARK_GAMMA": "0.25", "WATERMARK_DELTA": "1.5"})
    assert config == WatermarkConfig(gamma=0.25, delta=1.5)
    assert WatermarkConfig.from_env({}) == WatermarkConfig(gamma=0.5, delta=2.0)
    with pytest.raises(ValueError, match="WATERMARK_GAMMA"):
        WatermarkConfig.from_env({"WATERMARK_GAMMA": "1.5"})
    logits = random_logits(1, seed=12)
    out = processed([SamplingParams(watermark=True)], logits, [[3]], [[8]], sampler=Sampler(config))
    torch.testing.assert_close(out[0], paper_watermark(logits[0], 8, 0.25, 1.5))


# -- the whole pipeline, mixed batch ----------------------------------------------------------------

MIXED = [
    dict(params=SamplingParams(), prompt=[1, 2, 3], output=[4]),
    dict(params=sample(temperature=0.7, top_k=10, repetition_penalty=1.2), prompt=[5, 6], output=[6, 7]),
    dict(params=sample(top_p=0.9, frequency_penalty=0.4, presence_penalty=0.2), prompt=[8], output=[9, 9, 10]),
    dict(params=SamplingParams(watermark=True, repetition_penalty=1.5, logit_bias={11: 3.0}), prompt=[12, 11], output=[]),
    dict(params=sample(typical_p=0.8, min_p=0.05, tgi_frequency_penalty=0.7), prompt=[13, 13], output=[14]),
    dict(params=sample(temperature=1.3, watermark=True, top_k=30, top_p=0.7), prompt=[15], output=[16, 17]),
    dict(params=sample(min_p=0.2, logit_bias={0: -5.0, 1: 2.0}, repetition_penalty=0.8), prompt=[0, 1], output=[2]),
    dict(params=SamplingParams(frequency_penalty=1.0, tgi_frequency_penalty=-0.5), prompt=[3, 4], output=[3, 3]),
]


def reference_row(case: dict, row: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The documented order applied to one row with transformers' processors and the references."""
    p, ids = case["params"], case["prompt"] + case["output"]
    scores = row.masked_fill(~allowed, NEG_INF)
    if p.logit_bias:
        scores = hf_row([SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()])], scores)
    if p.watermark:
        scores = paper_watermark(scores, ids[-1], 0.5, 2.0)
    if p.repetition_penalty != 1.0:
        scores = hf_row([RepetitionPenaltyLogitsProcessor(p.repetition_penalty)], scores, ids)
    if p.tgi_frequency_penalty:
        scores = tgi_frequency_reference(scores, ids, p.tgi_frequency_penalty)
    scores = openai_reference(scores, case["output"], p.frequency_penalty, p.presence_penalty)
    if p.is_greedy:
        return scores
    chain = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    chain += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    chain += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    chain += [TypicalLogitsWarper(p.typical_p)] if p.typical_p < 1 else []
    chain += [MinPLogitsWarper(p.min_p)] if p.min_p else []
    return hf_row(chain, scores)


def run_mixed(logits: torch.Tensor, allowed: torch.Tensor | None, top_n: list[int]):
    params = [SamplingParams(**{**_fields(c["params"]), "top_n_tokens": n}) for c, n in zip(MIXED, top_n)]
    generators = [make_generator(100 + i, "cpu") if not p.is_greedy else None for i, p in enumerate(params)]
    batch = SamplingBatch.build(params, [c["prompt"] for c in MIXED], [c["output"] for c in MIXED], generators, V, "cpu")
    sampler = Sampler(WatermarkConfig())
    return sampler.process(logits, batch, allowed), sampler(logits, batch, allowed)


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in SamplingParams.__dataclass_fields__}


def test_mixed_batch_each_row_equals_its_processors_alone():
    logits = random_logits(len(MIXED), seed=13)
    allowed = torch.rand((len(MIXED), V), generator=torch.Generator().manual_seed(1)) > 0.2
    allowed[0] = True
    scores, out = run_mixed(logits, allowed, [0] * len(MIXED))
    assert_rows(scores, [reference_row(c, logits[i], allowed[i]) for i, c in enumerate(MIXED)])
    assert bool(allowed.gather(1, out.token_ids.unsqueeze(1)).all())
    assert out.top_token_ids is None and out.top_logprobs is None


def test_logprobs_greedy_choice_and_top_n_tokens():
    logits = random_logits(len(MIXED), seed=14)
    top_n = [0, 3, 5, 1, 0, 2, 4, 5]
    scores, out = run_mixed(logits, None, top_n)
    logprobs = torch.log_softmax(scores, dim=-1)
    torch.testing.assert_close(out.logprobs, logprobs.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    greedy_rows = [i for i, c in enumerate(MIXED) if c["params"].is_greedy]
    assert greedy_rows == [0, 3, 7]
    assert out.token_ids[greedy_rows].tolist() == scores[greedy_rows].argmax(-1).tolist()
    assert out.top_token_ids.shape == out.top_logprobs.shape == (len(MIXED), 5)
    for i, n in enumerate(top_n):
        expected = sorted(range(V), key=lambda t: -logprobs[i, t].item())[:n]
        torch.testing.assert_close(out.top_logprobs[i, :n], logprobs[i, expected])
        finite = [t for t in expected if logprobs[i, t] > NEG_INF]  # -inf ties may come in any order
        assert out.top_token_ids[i, : len(finite)].tolist() == finite
    assert bool(torch.isfinite(out.logprobs).all())


def test_input_logits_are_not_modified():
    logits = random_logits(len(MIXED), seed=15)
    copy = logits.clone()
    run_mixed(logits, None, [1] * len(MIXED))
    assert torch.equal(logits, copy)


# -- choosing tokens ------------------------------------------------------------------------------


def test_top_k_one_sampling_equals_greedy_with_logprob_zero():
    logits = random_logits(16, seed=16)
    params = [sample(top_k=1, temperature=0.9)] * 8 + [SamplingParams()] * 8
    generators = [make_generator(i, "cpu") for i in range(8)] + [None] * 8
    out = Sampler(WatermarkConfig())(logits, build(params, generators=generators))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs[:8].tolist() == [0.0] * 8


def test_seeded_draw_is_tgis_exponential_race():
    """TGI's Sampling: argmax(softmax(scores) / Exp(1) noise from the request's generator)."""
    logits = random_logits(1, seed=17)
    out = Sampler(WatermarkConfig())(logits, build([sample(temperature=0.8)], generators=[make_generator(7, "cpu")]))
    noise = torch.empty(V).exponential_(1, generator=torch.Generator().manual_seed(7))
    assert out.token_ids.item() == (torch.softmax(logits[0] / 0.8, -1) / noise).argmax().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_rows_on_cuda_match_tgis_draw_alone_and_in_a_batch():
    logits = random_logits(4, seed=21).cuda()
    params = [sample(), SamplingParams(), sample(top_k=20), sample(temperature=0.5)]
    seeds = [3, None, 4, 5]
    generators = [make_generator(s, "cuda") if s is not None else None for s in seeds]
    batch = SamplingBatch.build(params, [[1]] * 4, [[]] * 4, generators, V, "cuda")
    mixed = Sampler(WatermarkConfig())(logits, batch).token_ids.tolist()
    for i in (0, 3):
        noise = torch.empty(V, device="cuda").exponential_(1, generator=make_generator(seeds[i], "cuda"))
        expected = (torch.softmax(logits[i] / params[i].temperature, -1) / noise).argmax().item()
        assert mixed[i] == expected
    alone = SamplingBatch.build(params[2:3], [[1]], [[]], [make_generator(4, "cuda")], V, "cuda")
    assert Sampler(WatermarkConfig())(logits[2:3], alone).token_ids.item() == mixed[2]


def next_logits(table: torch.Tensor, history: list[int]) -> torch.Tensor:
    return table[history[-1]] + 0.5 * table[(history[-2] * 7) % V]


def generate(rows: list[SamplingParams], seeds: list[int | None], steps: int) -> list[list[int]]:
    """A toy decoding loop: each row's logits depend on its own history only (prompt from its seed)."""
    table = torch.randn((V, V), generator=torch.Generator().manual_seed(99)) * 2.0
    prompts = [[(3 * (s or i) + 1) % V, (5 * (s or i) + 2) % V] for i, s in enumerate(seeds)]
    outputs: list[list[int]] = [[] for _ in rows]
    generators = [make_generator(s, "cpu") if s is not None else None for s in seeds]
    sampler = Sampler(WatermarkConfig())
    for _ in range(steps):
        logits = torch.stack([next_logits(table, p + o) for p, o in zip(prompts, outputs)])
        batch = SamplingBatch.build(rows, prompts, outputs, generators, V, "cpu")
        for i, token in enumerate(sampler(logits, batch).token_ids.tolist()):
            outputs[i].append(token)
    return outputs


def test_seeded_row_gives_the_same_tokens_alone_and_in_a_mixed_batch():
    row = sample(temperature=1.2, top_p=0.95, repetition_penalty=1.1)
    others = [SamplingParams(), sample(temperature=0.5), sample(top_k=5, watermark=True), SamplingParams(top_n_tokens=2),
              sample(typical_p=0.9, frequency_penalty=0.5), sample(min_p=0.1), sample(temperature=2.0)]
    alone = generate([row], [1234], 20)[0]
    batch_rows = others[:3] + [row] + others[3:]
    seeds = [None, 5, None, 1234, None, 77, None, 8]
    mixed = generate(batch_rows, seeds, 20)
    assert mixed[3] == alone
    assert len(set(alone)) > 3  # really sampled, not stuck
    assert generate([row], [4321], 20)[0] != alone
    assert mixed[1] == generate([others[1]], [5], 20)[0]


def test_unseeded_sampling_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, NEG_INF, 0.2]]).repeat(20000, 1)
    out = Sampler(WatermarkConfig())(logits, build([sample()] * 20000, vocab=8))
    freq = torch.bincount(out.token_ids, minlength=8).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    assert freq[6] == 0


def test_truncated_tokens_are_never_sampled():
    logits = random_logits(1, seed=18).repeat(500, 1)
    params = [sample(top_k=3)] * 250 + [sample(top_p=0.3)] * 250
    generators = [make_generator(i, "cpu") for i in range(500)]
    out = Sampler(WatermarkConfig())(logits, build(params, generators=generators))
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(out.token_ids[:250].tolist()) <= top3 and len(set(out.token_ids[:250].tolist())) > 1
    kept = torch.isfinite(hf_row([TopPLogitsWarper(0.3)], logits[0])).nonzero().flatten().tolist()
    assert set(out.token_ids[250:].tolist()) <= set(kept)


# -- helpers -------------------------------------------------------------------------------------


def test_prompt_logprobs_score_each_token_given_the_previous_ones():
    logits = random_logits(6, seed=19)
    prompt = [5, 9, 1, 0, 127, 3]
    out = compute_prompt_logprobs(logits, prompt)
    expected = torch.log_softmax(logits, -1)[torch.arange(5), torch.tensor(prompt[1:])]
    assert out.shape == (5,)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compute_prompt_logprobs(logits[:3], prompt), expected[:3])  # chunk: next id known
    assert compute_prompt_logprobs(logits[:1], prompt[:1]).shape == (0,)


def test_make_generator_is_seeded_or_random():
    a, b = make_generator(42, "cpu"), make_generator(42, "cpu")
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert make_generator(None, "cpu").initial_seed() != make_generator(None, "cpu").initial_seed()


def test_invalid_parameters_give_reasons_and_build_names_the_row():
    assert sampling_param_reasons(SamplingParams(), V) == []
    reasons = sampling_param_reasons(SamplingParams(temperature=-1.0, top_p=0.0, repetition_penalty=0.0,
                                                    logit_bias={V: 1.0}, top_k=-2), V)
    assert [r.split(" ")[0] for r in reasons] == ["temperature", "top_k", "top_p", "repetition_penalty", "logit_bias"]
    with pytest.raises(ValueError, match=r"row 1: min_p must be in \[0, 1\]"):
        build([SamplingParams(), SamplingParams(min_p=2.0)])
    with pytest.raises(ValueError, match="logits must be"):
        Sampler(WatermarkConfig())(random_logits(2), build([SamplingParams()]))


def test_token_ids_outside_the_vocabulary_are_not_counted():
    logits = random_logits(1, seed=20)
    out = processed([SamplingParams(repetition_penalty=2.0)], logits, [[V + 5, 3]], [[]])
    expected = hf_row([RepetitionPenaltyLogitsProcessor(2.0)], logits[0], [V + 5, 3])
    torch.testing.assert_close(out[0], expected)
