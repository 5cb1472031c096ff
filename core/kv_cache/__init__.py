"""Paged KV cache bookkeeping with prefix caching (device agnostic: block ids are plain ints;
the tensor layout belongs to the backend). See `manager.KVCacheManager`."""
from textgen.core.kv_cache.block import BlockHash, FreeBlockQueue, KVBlock
from textgen.core.kv_cache.block_pool import BlockPool
from textgen.core.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent, KVEventObserver
from textgen.core.kv_cache.hashing import hash_block_tokens
from textgen.core.kv_cache.manager import KVCacheManager, PrefixCacheStats

__all__ = ["AllBlocksCleared", "BlockHash", "BlockPool", "BlockRemoved", "BlockStored", "FreeBlockQueue", "KVBlock",
           "KVCacheEvent", "KVCacheManager", "KVEventObserver", "PrefixCacheStats", "hash_block_tokens"]
