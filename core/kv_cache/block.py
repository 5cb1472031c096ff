"""KVBlock and the O(1) doubly linked free list the block pool keeps in LRU order.

The free list holds every block whose ref_cnt is 0, cached (it still has a hash and can be hit) or
not. The head is the next block handed out, so it is the first evicted; freed blocks are appended
at the tail. A cached block that gets a prefix hit while free is unlinked from the middle in O(1).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

BlockHash = bytes


@dataclass(slots=True, eq=False)
class KVBlock:
    """One fixed-size block of KV slots. `block_hash` is set while the block is published in the
    prefix cache (it is full and its KV was computed); `prev_free`/`next_free` link it into the
    free list while ref_cnt == 0."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks between two sentinels; every operation is O(1)."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    def block_ids(self) -> list[int]:
        """Free block ids from head (evicted first) to tail (evicted last)."""
        return [b.block_id for b in self]

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free KV block")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free list")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def append(self, block: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free list")
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._len += 1
