"""Attention kernels for XLA devices (TPU; Inferentia and Gaudi reuse the static one).

StaticPagedAttention: plain torch whose every tensor shape follows from the step tensors' shapes
alone (tokens T, rows R, block-table width W), never from per-step lengths: under shape
bucketing (`textgen.core.bucketing`) each bucket traces to one program and later steps of that
bucket reuse it. Each token attends over its request's whole block table (W * block_size
positions), masked by its own position, so it gathers [T, W * block_size] keys: the portable
fallback for a compiling device (it runs on any torch device, CPU included), not a fast kernel.

RaggedPagedAttention: torch_xla's ragged paged attention Pallas kernel (TPU only), the kernel
vLLM's TPU backend runs, called through `torch.ops.xla.ragged_paged_attention`. torch_xla is
imported inside methods only.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import ClassVar

import torch

from textgen.core.attention import AttentionBackend, AttentionSpec
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


RAGGED_MIN_TORCH_XLA = "2.8"
RAGGED_BLOCK_SIZES = (16, 32, 64, 128)


def ragged_kernel_reasons() -> list[str]:
    """Why torch_xla's ragged paged attention cannot run here (empty: it can)."""
    if find_spec("torch_xla") is None:
        return [f"torch_xla is not installed (pip install 'torch-xla>={RAGGED_MIN_TORCH_XLA}')"]
    import torch_xla.experimental.custom_kernel  # noqa: F401  registers torch.ops.xla.ragged_paged_attention

    if not hasattr(torch.ops.xla, "ragged_paged_attention"):
        return ["this torch_xla has no ragged_paged_attention op (torch_xla.experimental.custom_kernel)"]
    if find_spec("jax") is None:
        return ["jax is not installed (the Pallas kernels are written in JAX: pip install 'torch-xla[pallas]')"]
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return [f"the ragged paged attention Pallas kernel runs on TPU only (PJRT device is {xr.device_type()})"]
    return []


class RaggedPagedAttention(StaticPagedAttention):
    """torch_xla's ragged paged attention (Pallas, TPU). Its KV cache is one tensor per layer of
    [num_blocks, block_size, 2 * num_kv_heads, head_size], K and V heads interleaved (the layout
    torch_xla >= 2.8's kernel reads). Rows are padded; `num_seqs` tells the kernel how many are
    real, so padding rows cost nothing."""

    name: ClassVar[str] = "ragged_paged_attention"
    block_sizes: ClassVar[tuple[int, ...]] = RAGGED_BLOCK_SIZES
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    supports_soft_cap: ClassVar[bool] = True
    supports_graph_capture: ClassVar[bool] = True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        return (num_blocks, block_size, 2 * num_kv_heads, head_size)

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().check(spec)
        if spec.head_size % 128:
            reasons.append(f"head_size {spec.head_size} is not a multiple of 128 (the TPU lane width)")
        return reasons + ragged_kernel_reasons()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, num_heads, head_size = q.shape
        kv = torch.stack([k, v], dim=2).reshape(num_tokens, -1, head_size)  # [T, 2 * Hkv, D], interleaved
        flat = kv_cache.view(-1, *kv_cache.shape[2:])
        flat.index_copy_(0, meta.slot_mapping.to(torch.long), kv.to(kv_cache.dtype))
        num_seqs = (meta.seq_lens > 0).sum().reshape(1).to(torch.int32)
        window = self.spec.sliding_window
        out = torch.ops.xla.ragged_paged_attention(
            q, kv_cache, meta.seq_lens, meta.block_tables, meta.query_start_loc, num_seqs,
            sm_scale=self.spec.scale, sliding_window=window, soft_cap=self.spec.logits_soft_cap,
        )
        return out.reshape(num_tokens, num_heads * head_size)
