"""Blocks that left every layer's sliding window are released during long generations (their
table entries become the null placeholder), never published through a placeholder, and the
outputs stay those of transformers."""
from __future__ import annotations

import pytest
import torch

from textgen.core.attention import AttentionSpec
from textgen.core.kv_cache import KVCacheManager
from textgen.core.kv_cache.manager import NULL_BLOCK, NULL_BLOCK_ID, releasable_window
from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(window: int | None) -> AttentionSpec:
    return AttentionSpec(4, 2, 16, torch.float32, 0.25, sliding_window=window)


def test_only_a_model_whose_every_layer_slides_releases_blocks() -> None:
    assert releasable_window([_spec(8), _spec(8)]) == 8
    assert releasable_window([_spec(8), _spec(16)]) == 16  # a block leaves only once it left every window
    assert releasable_window([_spec(8), _spec(None)]) is None  # Gemma 2/3: global layers read everything
    assert releasable_window([_spec(None)]) is None


def _decode(kv: KVCacheManager, request: Request, token: int) -> list[int]:
    """One decode step: allocate for the last token, compute it, publish, sample `token`."""
    assert kv.allocate_slots(request, 1) is not None
    request.num_computed_tokens += 1
    kv.cache_blocks(request, request.num_computed_tokens)
    request.append_output_token(token)
    return kv.get_block_ids(request.request_id)


def test_exact_blocks_while_a_generation_passes_the_window() -> None:
    """block_size 4, window 8: the token at position p sees keys p-7..p, so a step whose first
    position is p releases the blocks before position p-7: (p-7) // 4 of them."""
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=8)
    a = Request("a", list(range(10, 20)), SamplingParams(max_new_tokens=64))  # 10 prompt tokens
    assert [b.block_id for b in kv.allocate_slots(a, 10)] == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_blocks(a, 10)
    a.append_output_token(100)
    X = NULL_BLOCK_ID
    tables = [_decode(kv, a, 101 + i) for i in range(8)]  # steps at positions 10..17
    assert tables == [[0, 1, 2], [X, 1, 2], [X, 1, 2, 3], [X, 1, 2, 3], [X, 1, 2, 3], [X, X, 2, 3],
                      [X, X, 2, 3, 4], [X, X, 2, 3, 4]]
    assert kv.free_block_ids() == [5, 6, 7, 0, 1]  # released blocks join the tail, still published
    assert sorted(b.block_id for b in kv.pool.cached.values()) == [0, 1, 2, 3]
    for i in range(40):  # a long generation (8 blocks in all) holds window / block_size + 1 at most
        p = a.num_computed_tokens
        table = _decode(kv, a, 200 + i)
        real = [t for t in table[(p - 7) // 4:]]
        assert table[:(p - 7) // 4] == [X] * ((p - 7) // 4) and len(real) == -(-(p + 1) // 4) - (p - 7) // 4 <= 3
        assert kv.num_free_blocks == 8 - len(real)
    kv.free(a)
    assert kv.num_free_blocks == 8 and all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    assert NULL_BLOCK.block_hash is None and NULL_BLOCK not in kv.pool.cached.values()


def test_a_prefix_hit_is_served_by_the_real_blocks_that_left_a_window() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=8)
    a = Request("a", list(range(10, 20)), SamplingParams(max_new_tokens=64))
    kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a, 10)
    a.append_output_token(100)
    for i in range(6):  # positions 10..15: blocks 0 and 1 leave a's window
        _decode(kv, a, 101 + i)
    assert kv.get_block_ids("a")[:2] == [NULL_BLOCK_ID, NULL_BLOCK_ID]
    b = Request("b", list(range(10, 20)) + [100, 101, 7], SamplingParams(max_new_tokens=4))
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1, 2] and num_hit == 12  # the real blocks, still published
    new = kv.allocate_slots(b, b.num_tokens - 12, hits)
    # b's first computed position is 12: block 0 is behind its window and goes straight back
    assert kv.get_block_ids("b") == [NULL_BLOCK_ID, 1, 2, new[0].block_id]
    assert kv.pool.blocks[0].ref_cnt == 0 and kv.pool.blocks[1].ref_cnt == 1
    kv.free(a), kv.free(b)
    assert kv.num_free_blocks == 8 and all(blk.ref_cnt == 0 for blk in kv.pool.blocks)


def test_a_placeholder_is_never_published() -> None:
    """A block that leaves the window before it was published (a runner publishing late) leaves a
    placeholder that `cache_blocks` skips: publishing it would let a prefix hit read block 0,
    another request's KV."""
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=8)
    a = Request("a", list(range(10, 22)), SamplingParams(max_new_tokens=8))  # 12 tokens
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12  # computed, not yet published
    a.append_output_token(100)
    assert kv.allocate_slots(a, 1) is not None  # p=12 releases block 0
    assert kv.get_block_ids("a") == [NULL_BLOCK_ID, 1, 2, 3]
    a.num_computed_tokens = 13
    kv.cache_blocks(a, 13)
    assert sorted(b.block_id for b in kv.pool.cached.values()) == [1, 2]
    assert NULL_BLOCK.block_hash is None
    assert kv.get_computed_blocks(Request("c", list(range(10, 23)), SamplingParams()))[1] == 0


def test_engine_releases_blocks_of_a_mistral_and_generates_as_transformers(tiny_model_factory) -> None:
    """Tiny Mistral, window 8, block size 4: four prompts generate 40 tokens together. Each
    request holds at most 3 blocks at any step (13 without releasing), and the greedy tokens are
    transformers' `generate`."""
    from transformers import AutoModelForCausalLM

    from textgen.core import LLM
    from textgen.core.engine.types import EngineRequest

    path = tiny_model_factory("mistral", sliding_window=8)
    llm = LLM(path, backend="cpu", dtype="float32", block_size=4)
    kv = llm.engine.scheduler.kv_manager
    assert kv.sliding_window == 8
    prompts = [llm.tokenizer.encode(p) for p in ("def add(a, b):", "import os, sys", "x = [1, 2, 3]", "class A:")]
    events: dict[str, list] = {}
    for i, ids in enumerate(prompts):
        events[str(i)] = []
        llm.engine.add_request(EngineRequest(str(i), ids, SamplingParams(max_new_tokens=40, ignore_eos=True)),
                               events[str(i)].append)
    peak = 0
    while llm.engine.has_work():
        llm.engine.step()
        held = [len([b for b in kv._blocks.get(str(i), []) if b is not NULL_BLOCK]) for i in range(len(prompts))]
        peak = max(peak, *held)
    assert peak == 3 and kv.num_free_blocks == kv.num_blocks
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for i, ids in enumerate(prompts):
        tokens = [e.token.id for e in events[str(i)] if e.token is not None]
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert len(ids) + 40 > 8 * 4 and tokens == ref[0, len(ids):].tolist(), i
