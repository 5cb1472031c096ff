"""Graph mode (CPU: torch.compile per decode bucket) against eager: same greedy tokens and
logprobs on mixed workloads, decode batches padded to the next bucket, padding rows that never
reach a request's KV blocks or outputs."""
from __future__ import annotations

import pytest
import torch

from textgen.core.engine.types import EngineRequest
from textgen.core.llm import LLM
from textgen.core.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 58)), [90, 91, 92, 93, 94]]


def _run(llm: LLM, prompts: list[list[int]], n: int) -> list[list[tuple[int, float]]]:
    """Greedy (token, logprob) per request; the requests run together (continuous batching)."""
    events: dict[str, list] = {}
    for i, ids in enumerate(prompts):
        events[str(i)] = []
        llm.engine.add_request(EngineRequest(str(i), ids, SamplingParams(max_new_tokens=n, temperature=0.0,
                                                                         ignore_eos=True)),
                               events[str(i)].append)
    while llm.engine.has_work():
        llm.engine.step()
    return [[(e.token.id, e.token.logprob) for e in events[str(i)] if e.token is not None]
            for i in range(len(prompts))]


def _assert_same(ours: list[list[tuple[int, float]]], ref: list[list[tuple[int, float]]]) -> None:
    """Identical tokens, logprobs within float32 tolerance (compiled kernels fuse differently)."""
    assert len(ours) == len(ref)
    for got, want in zip(ours, ref):
        assert [t for t, _ in got] == [t for t, _ in want]
        torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.tensor([lp for _, lp in want]),
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    common = dict(backend="cpu", dtype="float32", max_batch_size=8, max_total_tokens=128, num_kv_blocks=64)
    return LLM(tiny_llama, graph_batch_sizes=(), **common), LLM(tiny_llama, graph_batch_sizes=(2, 4), **common)


def test_startup_compiles_each_bucket(engines) -> None:
    eager, graph = engines
    assert eager.engine.runner.graphs is None and eager.engine.startup_lines[-1] == (
        "graph mode: off (no --cuda-graphs batch sizes; every step eager)")
    graphs = graph.engine.runner.graphs
    assert graphs.batch_sizes == (2, 4) and set(graphs.graphs) == {2, 4}
    assert graph.engine.startup_lines[-1].startswith("graph mode: torch.compile for decode batch sizes 2, 4 (warm-up ")


@pytest.mark.parametrize("batch", [1, 3, 4], ids=["batch1-padded-to-2", "batch3-padded-to-4", "batch4-exact"])
def test_tokens_and_logprobs_equal_eager(engines, batch: int) -> None:
    eager, graph = engines
    before = dict(graph.engine.runner.graphs.replays)
    _assert_same(_run(graph, PROMPTS[:batch], 10), _run(eager, PROMPTS[:batch], 10))
    bucket = 2 if batch == 1 else 4
    assert graph.engine.runner.graphs.replays.get(bucket, 0) - before.get(bucket, 0) >= 9  # every decode step


def test_batches_above_the_largest_bucket_and_mixed_steps_stay_eager(engines) -> None:
    eager, graph = engines
    prompts = PROMPTS + [[100 + i for i in range(6)]]  # 5 requests > bucket 4
    before = sum(graph.engine.runner.graphs.replays.values())
    _assert_same(_run(graph, prompts, 6), _run(eager, prompts, 6))
    # the 5-request decode steps ran eagerly; only steps after requests finished could use a bucket
    assert sum(graph.engine.runner.graphs.replays.values()) == before


def test_padding_rows_touch_only_the_scratch_block(engines) -> None:
    """After identical work the two engines' caches agree on every block the scheduler owns; the
    padded rows of the graph steps wrote only the scratch block past them."""
    eager, graph = engines
    _run(graph, PROMPTS[:3], 5)
    _run(eager, PROMPTS[:3], 5)
    blocks = graph.engine.scheduler.config.num_blocks
    for ours, ref in zip(graph.engine.runner.kv_caches, eager.engine.runner.kv_caches):
        assert ours.shape[1] == blocks + 1  # the scratch block
        torch.testing.assert_close(ours[:, :blocks], ref[:, :blocks], atol=1e-6, rtol=0)
    assert graph.engine.runner.pad_slot == blocks * graph.engine.runner.block_size
