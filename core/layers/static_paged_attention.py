"""StaticPagedAttention: paged attention whose every tensor shape follows from the step tensors'
shapes alone (tokens T, rows R, block-table width W), never from per-step lengths.

Under shape bucketing (`textgen.core.bucketing`) each bucket traces to one program and later steps
of that bucket reuse it: the kernel compiling devices (TPU, Gaudi, Inferentia) fall back to. Each
token attends over its request's whole block table (W * block_size positions), masked by its own
position, so it gathers [T, W * block_size] keys: correct on any torch device, CPU included, not a
fast kernel.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from textgen.core.attention import AttentionBackend
from textgen.core.forward_context import AttentionMetadata
from textgen.core.layers.paged_attention import FP8_DTYPES, write_kv


def token_rows(query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] long: the row each query token belongs to (rows without tokens are skipped), by
    comparison against every row end: shapes depend on T and R only."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device)
    return (tokens[:, None] >= query_start_loc[None, 1:]).sum(dim=1)


class StaticPagedAttention(AttentionBackend):
    """KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_size], the
    portable kernel's."""

    name: ClassVar[str] = "static_paged"
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = FP8_DTYPES
    supports_soft_cap: ClassVar[bool] = True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_size = q.shape
        rows = token_rows(meta.query_start_loc, num_tokens)
        seq_lens = meta.seq_lens.to(torch.long)
        # a token's context position: its row's length minus the row's tokens after it
        positions = seq_lens[rows] - meta.query_start_loc.to(torch.long)[rows + 1] + torch.arange(
            num_tokens, device=q.device)
        keys, values = self._context(kv_cache, meta.block_tables.to(torch.long)[rows])
        kv_pos = torch.arange(keys.shape[1], device=q.device)
        mask = kv_pos[None, :] <= positions[:, None]
        if self.spec.sliding_window is not None:
            mask &= kv_pos[None, :] > positions[:, None] - self.spec.sliding_window
        kv_heads = keys.shape[2]
        grouped = q.view(num_tokens, kv_heads, num_heads // kv_heads, head_size).float()
        scores = torch.einsum("tkgd,tskd->tkgs", grouped, keys.float()) * self.spec.scale
        if self.spec.logits_soft_cap is not None:
            scores = torch.tanh(scores / self.spec.logits_soft_cap) * self.spec.logits_soft_cap
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.einsum("tkgs,tskd->tkgd", scores.softmax(dim=-1), values.float())
        return out.to(q.dtype).reshape(num_tokens, num_heads * head_size)

    @staticmethod
    def _context(kv_cache: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's request context through its block table: 2 x [T, W * block_size, Hkv, D]."""
        num_tokens, width = tables.shape
        cache = kv_cache.view(torch.uint8) if kv_cache.dtype in FP8_DTYPES else kv_cache
        flat = tables.reshape(-1)
        shape = (num_tokens, width * kv_cache.shape[2], *kv_cache.shape[3:])
        keys = cache[0].index_select(0, flat).view(shape).view(kv_cache.dtype)
        values = cache[1].index_select(0, flat).view(shape).view(kv_cache.dtype)
        return keys, values
