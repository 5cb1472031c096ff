"""BlockPool: every KV block, their ref counts, the LRU free list and the prefix-cache map.

Invariants:
- a block is in the free list iff its ref_cnt is 0;
- `cached[h] is b` iff `b.block_hash == h` (a published block keeps its hash while free, so it can
  still be hit, until it is popped from the free list for reuse: that is its eviction);
- at most one block per hash: when two requests compute the same block at once, the second copy
  stays unpublished and is freed as a plain block.
Cache changes (a block published, evicted, or every hash dropped) are announced to
`event_observers` (`events.py`) on the calling thread; with no observer no event is built.
There is no reserved "null" block: ids 0 .. num_blocks-1 are all usable and a fresh pool hands
them out in increasing order. Runners pad block tables with any id and must mask by seq_lens.
"""
from __future__ import annotations

from collections.abc import Iterable

from textgen.core.kv_cache.block import BlockHash, FreeBlockQueue, KVBlock
from textgen.core.kv_cache.events import AllBlocksCleared, BlockRemoved, KVCacheEvent, KVEventObserver


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.event_observers: list[KVEventObserver] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, counting cached blocks that would be evicted."""
        return len(self.free_queue)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks from the head of the free list (evicting their hashes) with ref_cnt 1."""
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks, only {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks, unlinking the free ones from the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 are appended to the free-list tail in the
        given order (so the first given is evicted first). Hashes are kept."""
        for block in ordered:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Publish a full, computed block; False when another block already holds that hash."""
        if block.block_hash is not None:
            return block.block_hash == block_hash
        if block_hash in self.cached:
            return False
        block.block_hash = block_hash
        self.cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> int:
        """Unpublish every block (in use or free); return how many were dropped."""
        dropped = len(self.cached)
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        if self.event_observers:
            self.emit(AllBlocksCleared())
        return dropped

    def emit(self, event: KVCacheEvent) -> None:
        """Announce a cache change to every observer, in registration order."""
        for observer in self.event_observers:
            observer(event)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            if self.event_observers:
                self.emit(BlockRemoved((block.block_hash,)))
            block.block_hash = None
