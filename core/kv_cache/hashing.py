"""Hash chain of full blocks: hash(parent hash, the block's token ids, extra keys).

A block's hash names its whole prefix, so equal hashes mean equal KV (for the same model).
sha256 makes a collision (which would serve another prompt's KV) practically impossible and is
stable across processes, unlike Python's `hash` of a str. Token ids are encoded as int64 so the
encoding is unambiguous; extra keys (cache salt, adapter id) are pickled.
"""
from __future__ import annotations

import hashlib
import pickle
from array import array
from collections.abc import Sequence
from typing import Any

from textgen.core.kv_cache.block import BlockHash

ROOT_HASH: BlockHash = b""


def hash_block_tokens(parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: Any = None) -> BlockHash:
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    if extra_keys is not None:
        digest.update(pickle.dumps(extra_keys, protocol=5))
    return digest.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        extra_keys: Any = None) -> list[BlockHash]:
    """Append to `hashes` (in place) the hashes of the full blocks of `token_ids` not yet hashed."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else ROOT_HASH
        hashes.append(hash_block_tokens(parent, token_ids[start:start + block_size], extra_keys))
    return hashes


def request_extra_keys(request: Any) -> Any:
    """What besides the tokens decides a block's KV: the cache salt and an adapter id, if any."""
    salt = getattr(request, "cache_salt", None)
    adapter = getattr(request, "adapter_id", None)
    if adapter is None:
        return salt
    return (salt, adapter, getattr(request, "adapter_load_id", None))
