"""The speculator's memory in the KV plan: a draft model's weights and its own KV cache (as many
blocks as the target's), and Medusa heads' weights, come off the budget the target's blocks are
sized from, so --speculative-model cannot overcommit memory."""
from __future__ import annotations

import pytest

from textgen.core import LLM
from textgen.core.engine.sizing import bytes_per_block

from tests.engine.test_speculative_medusa import make_medusa_repo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUDGET_GB = 0.02  # the CPU backend's KV cap: small enough that the budget, not max_concurrent_requests, decides


@pytest.fixture()
def small_budget(monkeypatch) -> int:
    monkeypatch.setenv("TEXTGEN_CPU_KV_CACHE_GB", str(BUDGET_GB))
    return int(BUDGET_GB * 2**30)


def build(model: str, **kw) -> LLM:
    return LLM(model, backend="cpu", dtype="float32", max_batch_prefill_tokens=64, **kw)


def target_bytes_per_block(llm: LLM) -> int:
    runner = llm.engine.runner
    return bytes_per_block(runner.attention_specs(), runner.block_size)


def test_a_draft_model_shrinks_the_targets_blocks_by_its_footprint(small_budget, tiny_llama, tiny_model_factory):
    plain = build(tiny_llama)
    per_block = target_bytes_per_block(plain)
    assert plain.engine.scheduler.config.num_blocks == small_budget // per_block

    draft_path = tiny_model_factory("llama", num_hidden_layers=1)
    spec = build(tiny_llama, speculate=3, speculative_model=draft_path)
    draft = spec.engine.spec.proposer
    draft_per_block = bytes_per_block(draft.runner.attention_specs(), draft.runner.block_size)
    weights = draft.runner.loaded.weight_bytes
    assert 0 < draft_per_block < per_block and weights > 0
    blocks = spec.engine.scheduler.config.num_blocks
    assert blocks == (small_budget - weights) // (per_block + draft_per_block)
    assert draft.kv.num_blocks == blocks  # the draft's cache has as many blocks as the target's
    assert blocks * (per_block + draft_per_block) + weights <= small_budget < plain.engine.scheduler.config.num_blocks * per_block + weights
    assert any("the speculator took" in line for line in spec.engine.startup_lines)


def test_medusa_heads_weights_come_off_the_budget(small_budget, tiny_llama, tmp_path):
    repo = make_medusa_repo(tmp_path / "medusa", tiny_llama, num_heads=3)
    llm = build(str(repo))
    heads = llm.engine.runner.medusa.weight_bytes
    assert heads == 3 * (64 * 64 + 64 + 1000 * 64) * 4
    assert llm.engine.scheduler.config.num_blocks == (small_budget - heads) // target_bytes_per_block(llm)


def test_an_explicit_block_count_is_kept(tiny_llama):
    """--num-kv-blocks wins, as without speculation; the draft still gets as many."""
    spec = build(tiny_llama, speculate=2, speculative_model=tiny_llama, num_kv_blocks=40)
    assert spec.engine.scheduler.config.num_blocks == 40 == spec.engine.spec.proposer.kv.num_blocks
