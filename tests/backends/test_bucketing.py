"""Shape bucketing (TPU, Gaudi, Inferentia) on the CPU: the bucket a step gets, padding that never
reaches a request's outputs or KV blocks (greedy tokens and logprobs equal to the eager CPU
engine, with every step bucketed), prompts longer than the largest bucket chunked, and the static
kernel XLA devices run equal to the portable one on a padded mixed step."""
from __future__ import annotations

import random

import pytest
import torch

from textgen.backends.cpu.backend import CPUBackend
from textgen.core.layers.static_paged_attention import StaticPagedAttention
from textgen.core.attention import AttentionSpec
from textgen.core.backend import BackendCandidate
from textgen.core.bucketing import BucketedGraphs, EagerBuckets, ShapeBuckets, StepShape
from textgen.core.config import EngineConfig
from textgen.core.engine.engine_core import EngineCore
from textgen.core.engine.types import EngineRequest
from textgen.core.hookspecs import hookimpl
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.core.plugins import PluginManager
from textgen.core.registry import STATIC_PAGED, AttentionBackendInfo
from textgen.core.sampling_params import SamplingParams
from textgen.testing.steps import StepRow, fill_step, kernel_metadata

STATIC = STATIC_PAGED


def _buckets(**budgets) -> ShapeBuckets:
    config = EngineConfig(model_id="x", max_batch_size=8, max_batch_prefill_tokens=100, max_total_tokens=64,
                          block_size=16)
    for name, value in budgets.items():
        setattr(config, name, value)
    return ShapeBuckets.for_config(config, (2, 4))


def test_buckets_cover_the_budgets() -> None:
    b = _buckets()
    assert b.decode == (2, 4, 8)  # the largest decode batch is always a bucket
    assert b.prefill_tokens == (16, 32, 64, 100)
    assert b.row_capacity == 64 and b.prefill_requests == (1, 2, 4, 8, 10)  # 8 rows + 2 padding rows of 64
    assert b.describe().startswith("shape buckets: decode batch 2, 4, 8; prefill tokens 16, 32, 64, 100 x rows")


def test_bucket_choice() -> None:
    b = _buckets()
    assert b.shape_for([1]) == StepShape(2, 2, True)
    assert b.shape_for([1, 1, 1]) == StepShape(4, 4, True)
    assert b.shape_for([5, 1]) == StepShape(16, 4, False)  # 2 rows + 1 padding row -> 4
    assert b.shape_for([16]) == StepShape(16, 2, False)  # a padding row even without padding tokens
    assert b.shape_for([90, 1, 1, 1, 1, 1, 1]) == StepShape(100, 8, False)
    assert b.shape_for([101]) == "101 tokens exceed the largest prefill bucket (100)"


def test_every_reachable_step_has_a_warmed_shape() -> None:
    b, rng = _buckets(), random.Random(0)
    warmed = set(b.shapes())
    for _ in range(2000):
        rows = rng.randint(1, 8)
        lens = [rng.choice([1, 1, rng.randint(1, 40)]) for _ in range(rows)]
        while sum(lens) > 100:
            lens[lens.index(max(lens))] -= 1
        assert b.shape_for(lens) in warmed, lens


def test_padding_rows_carry_the_padding_tokens_within_their_capacity() -> None:
    graphs = BucketedGraphs(EagerBuckets(), (2,), {}, buckets=_buckets())
    rows = graphs.padding(num_tokens=3, num_rows=2, bucket=StepShape(100, 8, False), scratch_block=63, width=4)
    assert [r.num_new_tokens for r in rows] == [64, 33, 0, 0, 0, 0]
    assert all(r.block_ids == [63] * 4 for r in rows)


def test_static_kernel_on_a_padded_step_equals_the_portable_kernel_unpadded() -> None:
    torch.manual_seed(0)
    spec = AttentionSpec(4, 2, 16, torch.float32, 0.25, block_size=4)
    real = [StepRow(5, 3, [0, 1]), StepRow(2, 1, [2]), StepRow(0, 4, [3])]
    cache = torch.randn(2, 6, 4, 2, 16)  # block 5: scratch
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    ref_cache = cache.clone()
    step = fill_step(real, 4)
    want = TorchPagedAttention(spec).forward(q, k, v, ref_cache, kernel_metadata(TorchPagedAttention, [spec], step))
    graphs = BucketedGraphs(EagerBuckets(), (2,), {}, buckets=ShapeBuckets((2,), (16,), (1, 2, 4, 8), 8))
    pad = graphs.padding(8, 3, StepShape(16, 8, False), scratch_block=5, width=2)
    padded = fill_step(real + [StepRow(0, r.num_new_tokens, r.block_ids) for r in pad], 4)
    qp, kp, vp = (torch.cat([t, torch.randn(8, *t.shape[1:])]) for t in (q, k, v))
    got = StaticPagedAttention(spec).forward(qp, kp, vp, cache, kernel_metadata(StaticPagedAttention, [spec], padded))
    torch.testing.assert_close(got[:8], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, :5], ref_cache[:, :5])  # padding wrote only the scratch block


class _BucketedCPU(CPUBackend):
    """The CPU with a compiling device's graph rule: every step padded to a shape bucket."""

    name = "bucketed"

    def graph_runner(self, config):
        return EagerBuckets()


class _Plugin:
    def __init__(self, kernel: AttentionBackendInfo) -> None:
        self.kernel = kernel

    @hookimpl
    def textgen_probe_backend(self, config):
        return BackendCandidate("bucketed", True, 1000, "the host CPU, bucketed", f"{__name__}:_BucketedCPU")

    @hookimpl
    def textgen_attention_backends(self, backend):
        return [self.kernel]


COMMON = dict(dtype="float32", max_batch_size=4, max_total_tokens=96, max_batch_prefill_tokens=40, num_kv_blocks=48)


def _engine(path: str, kernel: AttentionBackendInfo | None) -> EngineCore:
    if kernel is None:
        return EngineCore(EngineConfig(model_id=path, backend="cpu", graph_batch_sizes=(), **COMMON))
    pm = PluginManager(allow={"cpu"})
    pm.register(_Plugin(kernel), "bucketed")
    return EngineCore(EngineConfig(model_id=path, backend="bucketed", graph_batch_sizes=(1, 2), **COMMON), pm)


def _run(engine: EngineCore, prompts: list[list[int]], n: int) -> tuple[list, int]:
    """Greedy (token, logprob) per request, the requests batched together; and the steps run."""
    events: dict[str, list] = {}
    for i, ids in enumerate(prompts):
        events[str(i)] = []
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(EngineRequest(str(i), ids, params), events[str(i)].append)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return [[(e.token and e.token.id, e.token and e.token.logprob, e.error) for e in events[str(i)]]
             for i in range(len(prompts))], steps


PROMPTS = [list(range(5, 12)), [20, 21, 22], list(range(30, 75)), [90, 91, 92, 93, 94]]  # 45 > 40: chunked


@pytest.fixture(scope="module")
def eager(tiny_llama):
    return _engine(tiny_llama, None)


@pytest.mark.parametrize("kernel", [STATIC, AttentionBackendInfo("torch_paged", f"{TorchPagedAttention.__module__}:"
                                                                 "TorchPagedAttention")], ids=["static", "portable"])
def test_bucketed_engine_equals_eager_with_every_step_bucketed(tiny_llama, eager, kernel) -> None:
    engine = _engine(tiny_llama, kernel)
    graphs = engine.runner.graphs
    assert isinstance(graphs, BucketedGraphs) and set(graphs.graphs) == set(graphs.buckets.shapes())
    assert any(line.startswith("graph mode: eager buckets over shape buckets: decode batch 1, 2, 4;")
               for line in engine.startup_lines)
    before = sum(graphs.replays.values())
    ours, steps = _run(engine, PROMPTS, 8)
    ref, _ = _run(eager, PROMPTS, 8)
    for got, want in zip(ours, ref):
        assert [t for t, _, _ in got] == [t for t, _, _ in want]
        torch.testing.assert_close(torch.tensor([lp for _, lp, _ in got]), torch.tensor([lp for _, lp, _ in want]),
                                   atol=1e-5, rtol=0)
    assert sum(graphs.replays.values()) - before == steps and not graphs.unbucketed
    assert any(not s.decode and s.tokens == 40 for s in graphs.replays)  # a full 40-token chunk


def test_a_prompt_over_the_length_limit_is_refused_with_the_reason(tiny_llama) -> None:
    engine = _engine(tiny_llama, STATIC)
    (events,), _ = _run(engine, [list(range(1, 100))], 2)
    assert events[-1][2] == "the prompt has 99 tokens; the maximum is 95"


class _GaudiRuleCPU(_BucketedCPU):
    def graph_runner(self, config):
        from textgen.backends.gaudi.graphs import HPUGraphBuckets

        return HPUGraphBuckets()


def test_gaudi_rule_wraps_the_model_once_and_ends_each_bucket_step(tiny_llama, eager, monkeypatch) -> None:
    """habana_frameworks stand-in (documented semantics: `wrap_in_hpu_graph(module)` returns the
    module replaying its forward; `mark_step()` ends the lazy graph): pins the rule's calls."""
    import sys
    from types import SimpleNamespace

    calls = {"wrapped": [], "steps": 0}

    def wrap(module, disable_tensor_cache):
        calls["wrapped"].append(disable_tensor_cache)
        return module

    def mark_step():
        calls["steps"] += 1

    htorch = SimpleNamespace(hpu=SimpleNamespace(wrap_in_hpu_graph=wrap), core=SimpleNamespace(mark_step=mark_step))
    monkeypatch.setitem(sys.modules, "habana_frameworks", SimpleNamespace(torch=htorch))
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch", htorch)
    monkeypatch.setattr(sys.modules[__name__], "_BucketedCPU", _GaudiRuleCPU)
    engine = _engine(tiny_llama, STATIC)
    graphs = engine.runner.graphs
    shapes = len(graphs.buckets.shapes())
    assert calls == {"wrapped": [True], "steps": shapes + 2 * graphs.sampler_warmups}  # 2 sampler programs a run
    calls["steps"] = 0
    ours, steps = _run(engine, PROMPTS[:2], 4)
    want, _ = _run(eager, PROMPTS[:2], 4)
    assert [[t for t, _, _ in r] for r in ours] == [[t for t, _, _ in r] for r in want]
    assert calls["steps"] == 3 * steps  # every step samples: the bucket, the gather, the sampling
