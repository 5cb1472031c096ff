"""The AttentionBackend interface: paged attention over mixed prefill chunks and decode tokens."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from textgen.core.forward_context import AttentionMetadata


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What one attention layer needs from a kernel."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int
    scale: float
    sliding_window: int | None = None  # attend to at most this many most recent keys
    logits_soft_cap: float | None = None


class AttentionBackend(ABC):
    """One attention kernel family. A layer builds one instance from its AttentionSpec.

    Contract for vendors:
    - `kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)` gives the shape of one
      layer's cache tensor; the layout is private to the backend (block ids are plain ints).
    - `check(spec)` returns human-readable reasons this kernel cannot serve `spec` (empty = fine).
    - `forward(q, k, v, kv_cache, meta)` first writes the new k/v at `meta.slot_mapping`, then
      returns the attention output [T, num_heads * head_size] for every query token, causal within
      each request's context (query token j of request i sees context positions
      <= seq_lens[i] - query_lens[i] + j), honouring `sliding_window`. It must give the same
      result for a token whether its request runs alone or in a mixed batch.
    """

    name: ClassVar[str]

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor."""

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        return []

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_size]
        k: torch.Tensor,  # [T, num_kv_heads, head_size]
        v: torch.Tensor,  # [T, num_kv_heads, head_size]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Write k/v into the cache, then attend; returns [T, num_heads * head_size]."""
