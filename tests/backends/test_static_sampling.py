"""Sampling on static shapes (bucketed devices: TPU, Gaudi, Inferentia) on the CPU: the static
sampler gives the dynamic sampler's tokens, logprobs and top-n exactly for every parameter kind;
each step cuts two programs; and in an engine serving mixed sampling parameters every program
key a step reaches (gather: step tokens x padded rows; sampling: padded rows x flags) was warmed
at startup, which is what keeps a compiling device from compiling while it serves."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.backends.test_bucketing import _engine, eager  # noqa: F401  (eager: a fixture)
from textgen.core.engine.types import EngineRequest
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.core.registry import AttentionBackendInfo
from textgen.core.sampling import Sampler, SamplingBatch
from textgen.core.sampling.static import SampledRows, StaticSampler, padded_mask
from textgen.core.sampling.watermark import WatermarkConfig
from textgen.core.sampling_params import SamplingParams

VOCAB = 50
PORTABLE = AttentionBackendInfo("torch_paged", f"{TorchPagedAttention.__module__}:TorchPagedAttention")

ROWS = [
    SamplingParams(),  # greedy
    SamplingParams(do_sample=True, temperature=0.7, seed=1),
    SamplingParams(do_sample=True, top_k=3, seed=2, top_n_tokens=3),
    SamplingParams(do_sample=True, top_p=0.6, seed=3),
    SamplingParams(do_sample=True, typical_p=0.5, min_p=0.05),  # no seed: the shared default generator
    SamplingParams(repetition_penalty=1.5, top_n_tokens=2),  # greedy with a penalty
    SamplingParams(do_sample=True, tgi_frequency_penalty=0.5, frequency_penalty=0.3, presence_penalty=0.4,
                   logit_bias={7: 5.0}, seed=4),
    SamplingParams(do_sample=True, temperature=1.3, top_k=10, top_p=0.9, watermark=True, seed=5),
]


def _generators(rows: list[SamplingParams]) -> list[torch.Generator | None]:
    return [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in rows]


def _inputs(rows: list[SamplingParams]):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (5,), generator=g).tolist() for _ in rows]
    outputs = [torch.randint(0, VOCAB, (3,), generator=g).tolist() for _ in rows]
    hidden = torch.randn(12, VOCAB, generator=g) * 3  # hidden states = logits (identity head)
    return prompts, outputs, hidden


@pytest.mark.parametrize("subset", [slice(0, 1), slice(0, 5), slice(0, 8), slice(5, 6)],
                         ids=["greedy", "sampling", "everything", "penalty-only"])
def test_static_sampler_equals_the_dynamic_sampler(subset) -> None:
    rows = ROWS[subset]
    prompts, outputs, hidden = _inputs(rows)
    index = [11 - i for i in range(len(rows))]
    allowed = torch.ones(len(rows), VOCAB - 2, dtype=torch.bool)  # a grammar vocabulary narrower than the head
    allowed[0, 5:] = False
    watermark = WatermarkConfig()
    torch.manual_seed(7)
    batch = SamplingBatch.build(rows, prompts, outputs, _generators(rows), VOCAB, "cpu")
    want = Sampler(watermark)(hidden[index], batch, padded_mask(allowed, len(rows), VOCAB))
    cuts = []
    static = StaticSampler((1, 2, 4, 8), 5, lambda: cuts.append(1), watermark, torch.device("cpu"))
    torch.manual_seed(7)
    got = static.sample(hidden, index, lambda x: x, SampledRows(rows, prompts, outputs, _generators(rows), allowed))
    assert got.token_ids.tolist() == want.token_ids.tolist()
    assert torch.equal(got.logprobs, want.logprobs)
    if want.top_token_ids is None:
        assert got.top_token_ids is None
    for i, p in enumerate(rows):  # each row's own top-n (ids of -inf ties are in no defined order)
        n = p.top_n_tokens
        if not n:
            continue
        assert torch.equal(got.top_logprobs[i, :n], want.top_logprobs[i, :n])
        finite = want.top_logprobs[i, :n].isfinite()
        assert got.top_token_ids[i, :n][finite].tolist() == want.top_token_ids[i, :n][finite].tolist()
    assert len(cuts) == 2  # the gather, then logits + sampling


def test_rows_are_padded_to_the_smallest_bucket() -> None:
    static = StaticSampler((2, 4, 8), 5, lambda: None, WatermarkConfig(), torch.device("cpu"))
    assert [static.rows_for(n) for n in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, 9]


class _Keys:
    """Records the program key of each gather and each sampling run."""

    def __init__(self, monkeypatch) -> None:
        self.keys: set[tuple] = set()
        sample, run = StaticSampler.sample, StaticSampler.run

        def recording_sample(sampler, hidden, index, compute_logits, rows):
            self.keys.add(("gather", hidden.shape[0], sampler.rows_for(len(index))))
            return sample(sampler, hidden, index, compute_logits, rows)

        def recording_run(sampler, logits, x):
            self.keys.add(("sample", logits.shape[0], x.noise is not None, x.allowed is not None))
            return run(sampler, logits, x)

        monkeypatch.setattr(StaticSampler, "sample", recording_sample)
        monkeypatch.setattr(StaticSampler, "run", recording_run)


def test_serving_mixed_parameters_reaches_only_warmed_programs(tiny_llama, eager, monkeypatch) -> None:  # noqa: F811
    keys = _Keys(monkeypatch)
    engine = _engine(tiny_llama, PORTABLE)
    warmed = set(keys.keys)
    graphs = engine.runner.graphs
    assert engine.runner.static_sampler is not None and graphs.sampler_warmups > 0
    assert any(f"sampler on static shapes ({graphs.sampler_warmups} warm-up runs)" in line
               for line in engine.startup_lines)
    assert engine.runner.generator_device == torch.device("cpu")
    keys.keys.clear()
    prompts = [list(range(5, 12)), [20, 21, 22], list(range(30, 75)), [90, 91, 92, 93, 94], [3, 4], [60] * 9]
    params = [ROWS[i % len(ROWS)] for i in range(len(prompts))]
    ours = _serve(engine, prompts, params)
    assert keys.keys and keys.keys <= warmed, keys.keys - warmed
    assert ("sample", 4, True, True) in keys.keys  # sampling and processed rows in one padded batch
    assert not graphs.unbucketed
    assert ours == _serve(eager, prompts, params)  # seeded rows: the same tokens as the dynamic sampler


def _serve(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, (ids, p) in enumerate(zip(prompts, params)):
        p = replace(p, max_new_tokens=6, ignore_eos=True, seed=p.seed if p.seed is not None else 100 + i)
        engine.add_request(EngineRequest(str(i), ids, p),
                           lambda e, sink=out[str(i)]: sink.append(e.token.id) if e.token else None)
    while engine.has_work():
        engine.step()
    return [out[str(i)] for i in range(len(prompts))]
