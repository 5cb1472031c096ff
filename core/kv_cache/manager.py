"""KVCacheManager: the blocks of each request, prefix-cache lookups and publication.

Lifecycle of a request's blocks:
1. `get_computed_blocks(req)` looks its full blocks up in the prefix cache (no state changes);
2. `allocate_slots(req, n, computed)` takes references on the hits and allocates the rest, or
   returns None and changes nothing;
3. after each forward, `cache_blocks(req, num_computed_tokens)` publishes the newly full blocks
   whose KV was computed (prompt and generated tokens alike, so multi-turn chats hit);
4. `free(req)` drops its references, tail-first, so a request's last blocks are evicted first.

Sliding windows (`sliding_window`, set only when every layer of the model has one: a layer with
full attention still reads every block): at each `allocate_slots`, the blocks that lie entirely
before the window of the step's first query token (position p sees keys > p - window) are
released and their table entries become `NULL_BLOCK`, so long generations hold at most
window / block_size + 1 blocks (+ the step's new ones). A placeholder keeps its place in the table
(positions stay block_index * block_size); its id, `NULL_BLOCK_ID`, is a valid block whose
contents kernels read but mask out (they honour the window). Placeholders are never published,
touched or freed; the real blocks they replaced were published before they left the window (a
block's KV is computed before a later step's query can pass it), and stay hittable while free, so
a prefix hit is always served by real, computed blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textgen.core.kv_cache.block import BlockHash, KVBlock
from textgen.core.kv_cache.block_pool import BlockPool
from textgen.core.kv_cache.events import BlockStored, KVEventObserver
from textgen.core.kv_cache.hashing import extend_block_hashes, request_extra_keys


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted in tokens at each request's first successful allocation (once per admission)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def releasable_window(specs: list[Any]) -> int | None:
    """The window behind which blocks can be released: the largest of the layers' windows when
    every layer has one (Mistral), else None (a full-attention layer, as in Gemma 2/3's mixed
    local/global layers, still reads every block: freeing would need per-layer block tables)."""
    windows = [spec.sliding_window for spec in specs]
    return max(windows) if windows and all(w is not None for w in windows) else None


NULL_BLOCK_ID = 0
NULL_BLOCK = KVBlock(NULL_BLOCK_ID)  # not the pool's block 0: a table entry only, never held


class KVCacheManager:
    """`request` objects need `request_id`, `all_token_ids`, `num_tokens`, `num_computed_tokens`
    and optionally `cache_salt` (extra hash key)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_cache_stats = PrefixCacheStats()
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_published: dict[str, int] = {}

    # -- queries --------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (free cached blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free list from head (evicted first) to tail."""
        return self.pool.free_queue.block_ids()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    # -- prefix cache ---------------------------------------------------------------------

    def get_computed_blocks(self, request: Any) -> tuple[list[KVBlock], int]:
        """The longest cached chain of the request's full blocks, stopping one token short of
        its known tokens (at least one token must run to produce logits). Changes no state."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def cache_blocks(self, request: Any, num_computed_tokens: int) -> None:
        """Publish the request's blocks that became full within its first `num_computed_tokens`."""
        blocks = self._blocks.get(request.request_id)
        if not self.enable_prefix_caching or not blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self._num_published.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        published = []
        for i in range(start, num_full):
            if blocks[i] is NULL_BLOCK:
                continue
            if blocks[i].block_hash is None and self.pool.cache_block(blocks[i], hashes[i]):
                published.append(i)
        self._num_published[request.request_id] = num_full
        if published and self.pool.event_observers:
            self._announce_stored(request, hashes, published)

    def _announce_stored(self, request: Any, hashes: list[BlockHash], published: list[int]) -> None:
        """One BlockStored per run of consecutive newly published blocks (a block that lost the
        race to an identical one breaks the chain; its hash is already announced)."""
        runs: list[list[int]] = []
        for i in published:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        bs, tokens = self.block_size, request.all_token_ids
        for run in runs:
            first, end = run[0], run[-1] + 1
            self.pool.emit(BlockStored(
                block_hashes=tuple(hashes[first:end]), parent_block_hash=hashes[first - 1] if first else None,
                token_ids=tuple(tokens[first * bs:end * bs]), block_size=bs))

    def add_event_observer(self, observer: KVEventObserver) -> None:
        """Announce every prefix-cache change (`events.py`) to `observer`, on the engine thread."""
        self.pool.event_observers.append(observer)

    def reset_prefix_cache(self) -> int:
        """Forget every published block (blocks in use keep their KV and are not republished;
        blocks that fill later are); return how many were dropped."""
        return self.pool.reset_prefix_cache()

    # -- allocation -----------------------------------------------------------------------

    def allocate_slots(self, request: Any, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None) -> list[KVBlock] | None:
        """Make the request hold blocks for num_computed_tokens + len(new_computed_blocks) *
        block_size + num_new_tokens tokens. Returns the newly allocated blocks, or None when the free
        list, minus the free hits it would take, is too short: then nothing changed but the release
        of blocks that left the sliding window (always valid, see the module docstring)."""
        rid, computed = request.request_id, new_computed_blocks or []
        held = self._blocks.get(rid, [])
        if computed and held:
            raise ValueError(f"request {rid} already holds blocks; prefix hits apply to a fresh request")
        self._release_out_of_window(rid, request.num_computed_tokens)
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_new_blocks = max(0, -(-total // self.block_size) - len(held) - len(computed))
        free_hits = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - free_hits:
            return None
        if rid not in self._blocks:
            self._record_query(request, len(computed))
        self.pool.touch(computed)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        self._blocks.setdefault(rid, []).extend(computed + new_blocks)
        self._num_published[rid] = self._num_published.get(rid, 0) + len(computed)
        if computed:
            self._release_out_of_window(rid, request.num_computed_tokens + len(computed) * self.block_size)
        return new_blocks

    def free(self, request: Any) -> None:
        """Release the request's blocks tail-first; blocks reaching ref 0 stay hittable until
        evicted."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self._hashes.pop(rid, None)
        self._num_published.pop(rid, None)
        self.pool.free_blocks(b for b in reversed(blocks) if b is not NULL_BLOCK)

    # -- helpers --------------------------------------------------------------------------

    def _release_out_of_window(self, rid: str, first_query_position: int) -> None:
        """Release the held blocks entirely before the window of the token at
        `first_query_position` (it and every later token see only keys > position - window);
        their entries become NULL_BLOCK. Released tail-first, like `free`."""
        blocks = self._blocks.get(rid)
        if self.sliding_window is None or not blocks:
            return
        num_out = min(max(0, first_query_position - self.sliding_window + 1) // self.block_size, len(blocks))
        leaving = [i for i in range(num_out) if blocks[i] is not NULL_BLOCK]
        if not leaving:
            return
        self.pool.free_blocks(blocks[i] for i in reversed(leaving))
        for i in leaving:
            blocks[i] = NULL_BLOCK

    def _block_hashes(self, request: Any) -> list[BlockHash]:
        hashes = self._hashes.setdefault(request.request_id, [])
        return extend_block_hashes(hashes, request.all_token_ids, self.block_size, request_extra_keys(request))

    def _record_query(self, request: Any, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += num_hit_blocks * self.block_size
