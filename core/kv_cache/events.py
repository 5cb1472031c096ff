"""KV-cache events for prefix-aware routers: a block stored in, removed from, or the whole prefix
cache cleared. The meaning is vLLM's (vllm/distributed/kv_events.py), so a router that indexes
vLLM pods by block hash indexes textgen's the same way; the wire encoding lives in the API layer.

- `BlockStored`: blocks published in the prefix cache, in chain order; `parent_block_hash` is the
  hash of the block before the first one (None at the start of a prompt), `token_ids` are the
  tokens of all the blocks (len == len(block_hashes) * block_size).
- `BlockRemoved`: published blocks evicted (their hash can no longer be hit).
- `AllBlocksCleared`: every published block was forgotten (`reset_prefix_cache`).

Observers are called on the engine thread, in the order the cache changed, and must only
enqueue: the block pool never waits on them. With no observer nothing is built (zero cost off).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from textgen.core.kv_cache.block import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
KVEventObserver = Callable[[KVCacheEvent], None]

