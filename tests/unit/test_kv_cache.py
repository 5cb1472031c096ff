"""KV block pool and prefix cache: exact block ids, ref counts and free-list order after each
operation (block_size 4, 8 blocks; a fresh pool's free list is 0..7 and hands out from the head)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from array import array

import pytest

from textgen.core.kv_cache import FreeBlockQueue, KVBlock, KVCacheManager, hash_block_tokens
from textgen.core.sampling_params import SamplingParams
from textgen.core.scheduler import Request

PREFIX = list(range(10, 18))  # two full blocks


def req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_new_tokens=8), cache_salt=salt)


def ids(blocks: list[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def refs(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


def hashed(kv: KVCacheManager) -> list[int]:
    return [b.block_id for b in kv.pool.blocks if b.block_hash is not None]


def run(kv: KVCacheManager, request: Request, hits: list[KVBlock] | None = None) -> list[int]:
    """Allocate for all of the request's tokens (after its hits), compute them, publish."""
    num_hit = len(hits or []) * kv.block_size
    new = kv.allocate_slots(request, request.num_tokens - num_hit, hits)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request, request.num_computed_tokens)
    return ids(new)


@pytest.fixture
def kv() -> KVCacheManager:
    return KVCacheManager(num_blocks=8, block_size=4)


def test_fresh_pool_allocates_from_head_and_frees_tail_first(kv):
    a = req("a", list(range(10, 20)))  # 10 tokens: 2 full blocks + 2 tokens
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.free_block_ids() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert run(kv, a) == [0, 1, 2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.free_block_ids() == [3, 4, 5, 6, 7]
    assert (kv.num_free_blocks, kv.usage) == (5, 3 / 8)
    assert hashed(kv) == [0, 1]  # the partial block 2 is not published
    kv.free(a)
    assert kv.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]  # the request's last block is evicted first
    assert (kv.num_free_blocks, kv.usage, refs(kv)) == (8, 0.0, [0] * 8)
    assert hashed(kv) == [0, 1] and len(kv.pool.cached) == 2  # free but still hittable
    assert kv.get_block_ids("a") == []


def test_prefix_hit_touches_blocks_and_shares_them(kv):
    kv.free(a := req("a", PREFIX + [18, 19]))  # nothing held: a no-op
    run(kv, a)
    kv.free(a)  # free list [3, 4, 5, 6, 7, 2, 1, 0]
    b = req("b", PREFIX + [99, 98, 97])
    hits, num_cached = kv.get_computed_blocks(b)
    assert (ids(hits), num_cached) == ([0, 1], 8)
    assert kv.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]  # a lookup changes nothing
    b_new = kv.allocate_slots(b, 3, hits)
    assert ids(b_new) == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert kv.free_block_ids() == [4, 5, 6, 7, 2]  # the hits were unlinked from the middle
    c = req("c", PREFIX + [5])
    hits, num_cached = kv.get_computed_blocks(c)
    assert (ids(hits), num_cached) == ([0, 1], 8)
    assert ids(kv.allocate_slots(c, 1, hits)) == [4]
    assert refs(kv)[:5] == [2, 2, 0, 1, 1]
    assert kv.free_block_ids() == [5, 6, 7, 2]
    kv.free(b)  # 3 reaches 0; 1 and 0 are still held by c
    assert kv.free_block_ids() == [5, 6, 7, 2, 3]
    assert refs(kv)[:5] == [1, 1, 0, 0, 1]
    kv.free(c)
    assert kv.free_block_ids() == [5, 6, 7, 2, 3, 4, 1, 0]
    assert refs(kv) == [0] * 8


def test_hit_stops_one_token_short_of_the_prompt(kv):
    run(kv, req("a", PREFIX))
    assert hashed(kv) == [0, 1]
    hits, num_cached = kv.get_computed_blocks(req("same", PREFIX))
    assert (ids(hits), num_cached) == ([0], 4)  # the last block is recomputed to get logits
    hits, num_cached = kv.get_computed_blocks(req("longer", PREFIX + [1]))
    assert (ids(hits), num_cached) == ([0, 1], 8)
    hits, num_cached = kv.get_computed_blocks(req("other", [10, 11, 12, 0] + PREFIX[4:] + [1]))
    assert (ids(hits), num_cached) == ([], 0)  # the chain breaks at the first block


def test_eviction_pops_the_head_and_drops_its_hash(kv):
    a = req("a", PREFIX + [18, 19])
    run(kv, a)
    kv.free(a)
    assert kv.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    big = req("big", list(range(100, 120)))  # 5 blocks
    assert run(kv, big) == [3, 4, 5, 6, 7]
    assert kv.free_block_ids() == [2, 1, 0] and hashed(kv) == [0, 1, 3, 4, 5, 6, 7]
    assert ids(kv.allocate_slots(req("x", [1, 2, 3, 4]), 4)) == [2]
    assert ids(kv.allocate_slots(req("y", [1, 2, 3, 4]), 4)) == [1]  # a cached block is reused
    assert kv.pool.blocks[1].block_hash is None and hashed(kv) == [0, 3, 4, 5, 6, 7]
    assert kv.free_block_ids() == [0]
    hits, num_cached = kv.get_computed_blocks(req("b", PREFIX + [1]))
    assert (ids(hits), num_cached) == ([0], 4)  # tail-first release kept the first block longest


def test_allocate_returns_none_when_full_and_changes_nothing(kv):
    a = req("a", PREFIX)
    run(kv, a)
    kv.free(a)  # free list [2, 3, 4, 5, 6, 7, 1, 0]; 0 and 1 cached
    run(kv, req("holder", list(range(100, 116))))
    assert kv.get_block_ids("holder") == [2, 3, 4, 5]
    assert kv.free_block_ids() == [6, 7, 1, 0]
    stats = (kv.prefix_cache_stats.queries, kv.prefix_cache_stats.hits)
    b = req("b", PREFIX + list(range(50, 62)))  # 20 tokens = 5 blocks: 2 hits + 3 new
    hits, _ = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1]
    # 4 free blocks, but the 2 free hits leave the list when touched: only 2 for new blocks
    assert kv.allocate_slots(b, 12, hits) is None
    assert kv.free_block_ids() == [6, 7, 1, 0] and refs(kv)[:2] == [0, 0]
    assert kv.get_block_ids("b") == [] and hashed(kv)[:2] == [0, 1]
    assert (kv.prefix_cache_stats.queries, kv.prefix_cache_stats.hits) == stats
    b2 = req("b2", PREFIX + list(range(50, 58)))  # 4 blocks: 2 hits + 2 new fit exactly
    hits, _ = kv.get_computed_blocks(b2)
    assert ids(kv.allocate_slots(b2, 8, hits)) == [6, 7]
    assert kv.get_block_ids("b2") == [0, 1, 6, 7]
    assert (kv.free_block_ids(), kv.num_free_blocks, kv.usage) == ([], 0, 1.0)
    assert kv.allocate_slots(req("c", [1]), 1) is None


def test_growing_request_allocates_only_when_a_block_fills(kv):
    a = req("a", [1, 2, 3])
    assert ids(kv.allocate_slots(a, 3)) == [0]
    a.num_computed_tokens = 3
    a.append_output_token(4)
    assert kv.allocate_slots(a, 1) == []  # token 4 still fits block 0
    a.num_computed_tokens = 4
    a.append_output_token(5)
    assert ids(kv.allocate_slots(a, 1)) == [1]
    assert kv.get_block_ids("a") == [0, 1]


def test_generated_tokens_are_published_once_their_kv_is_computed(kv):
    a = req("a", [1, 2, 3, 4, 5, 6])
    run(kv, a)
    assert hashed(kv) == [0]
    for token in (7, 8):  # decode steps: the sampled token's KV is computed by the next step
        a.append_output_token(token)
        kv.cache_blocks(a, a.num_computed_tokens)
        assert hashed(kv) == [0]  # block 1 is full of tokens once 8 is sampled, not of KV
        assert kv.allocate_slots(a, 1) == []
        a.num_computed_tokens += 1
        kv.cache_blocks(a, a.num_computed_tokens)
    assert hashed(kv) == [0, 1]
    a.append_output_token(9)  # sampled but not computed: block 2 must not be published
    kv.cache_blocks(a, a.num_computed_tokens)
    assert hashed(kv) == [0, 1]
    kv.free(a)
    hits, num_cached = kv.get_computed_blocks(req("turn2", [1, 2, 3, 4, 5, 6, 7, 8, 9, 42]))
    assert (ids(hits), num_cached) == ([0, 1], 8)


def test_concurrent_duplicates_publish_one_copy(kv):
    a, b = req("a", PREFIX), req("b", PREFIX)
    assert kv.allocate_slots(a, 8) is not None and kv.allocate_slots(b, 8) is not None
    for r in (a, b):
        r.num_computed_tokens = 8
        kv.cache_blocks(r, 8)
    assert kv.get_block_ids("b") == [2, 3] and hashed(kv) == [0, 1]
    kv.free(a)
    kv.free(b)
    assert kv.free_block_ids() == [4, 5, 6, 7, 1, 0, 3, 2]
    assert ids(kv.get_computed_blocks(req("c", PREFIX + [1]))[0]) == [0, 1]


def test_cache_salt_separates_prefixes(kv):
    run(kv, req("a", PREFIX, salt="tenant-1"))
    assert kv.get_computed_blocks(req("b", PREFIX + [1])) == ([], 0)
    assert kv.get_computed_blocks(req("c", PREFIX + [1], salt="tenant-2")) == ([], 0)
    assert ids(kv.get_computed_blocks(req("d", PREFIX + [1], salt="tenant-1"))[0]) == [0, 1]


def test_reset_prefix_cache_forgets_every_hash(kv):
    a = req("a", PREFIX + [1])
    run(kv, a)
    kv.free(a)
    order = kv.free_block_ids()
    assert kv.reset_prefix_cache() == 2
    assert hashed(kv) == [] and kv.pool.cached == {}
    assert kv.free_block_ids() == order
    assert kv.get_computed_blocks(req("b", PREFIX + [1])) == ([], 0)


def test_prefix_stats_count_tokens_once_per_first_allocation(kv):
    run(kv, a := req("a", PREFIX + [18, 19]))
    kv.free(a)
    b = req("b", PREFIX + [1, 2, 3])
    hits, _ = kv.get_computed_blocks(b)
    kv.get_computed_blocks(b)  # lookups alone are not counted
    kv.allocate_slots(b, 3, hits)
    b.num_computed_tokens = 11
    b.append_output_token(7)
    kv.allocate_slots(b, 1)  # a later step of the same request is not a query
    stats = kv.prefix_cache_stats
    assert (stats.queries, stats.hits) == (10 + 11, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)


def test_disabled_prefix_caching_never_hits_or_publishes():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req("a", PREFIX + [1])
    run(kv, a)
    kv.free(a)
    assert hashed(kv) == [] and kv.get_computed_blocks(req("b", PREFIX + [1])) == ([], 0)
    assert (kv.prefix_cache_stats.queries, kv.prefix_cache_stats.hits) == (0, 0)


def test_hits_only_for_a_fresh_request(kv):
    run(kv, req("a", PREFIX + [1]))
    b = req("b", PREFIX + [2])
    kv.allocate_slots(b, 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.allocate_slots(b, 1, kv.get_computed_blocks(req("c", PREFIX + [3]))[0])


def test_pool_is_fully_free_after_freeing_everything(kv):
    requests = [req("a", PREFIX + [1]), req("b", PREFIX + [2, 3]), req("c", [7] * 9)]
    for r in requests:
        hits, _ = kv.get_computed_blocks(r)
        run(kv, r, hits)
    assert [kv.get_block_ids(r.request_id) for r in requests] == [[0, 1, 2], [0, 1, 3], [4, 5, 6]]
    for r in requests:
        kv.free(r)
    assert sorted(kv.free_block_ids()) == list(range(8)) and refs(kv) == [0] * 8
    assert kv.free_block_ids() == [7, 2, 3, 1, 0, 6, 5, 4]
    assert (kv.num_free_blocks, kv.usage) == (8, 0.0)


def test_block_hash_chains_parent_tokens_and_extra_keys():
    first = hash_block_tokens(b"", [1, 2, 3, 4])
    assert first == hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    other_parent = hash_block_tokens(b"", [1, 2, 3, 0])
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(other_parent, [5, 6, 7, 8])
    assert hash_block_tokens(b"", [1, 2, 3, 4], "salt") != first
    assert hash_block_tokens(b"", [1, 2, 3, 4], None) == first


def test_block_hash_is_stable_across_processes():
    code = "from textgen.core.kv_cache import hash_block_tokens as h; print(h(h(b'', [1, 2], 's'), [3, 4], 's').hex())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {hash_block_tokens(hash_block_tokens(b"", [1, 2], "s"), [3, 4], "s").hex() + "\n"}


def test_free_block_queue_links():
    blocks = [KVBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert queue.block_ids() == [0, 1, 3] and len(queue) == 3
    queue.append(blocks[2])
    assert queue.popleft() is blocks[0]
    assert queue.block_ids() == [1, 3, 2]
    with pytest.raises(ValueError, match="already in the free list"):
        queue.append(blocks[1])
    with pytest.raises(ValueError, match="not in the free list"):
        queue.remove(blocks[0])
    for _ in range(3):
        queue.popleft()
    with pytest.raises(IndexError):
        queue.popleft()
