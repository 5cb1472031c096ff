"""Attention kernels for XLA devices (the static-shape fallback, shared with Gaudi and Inferentia,
is `textgen.core.layers.static_paged_attention`).

RaggedPagedAttention: torch_xla's ragged paged attention Pallas kernel (TPU only), the kernel
vLLM's TPU backend runs, called through `torch.ops.xla.ragged_paged_attention`. torch_xla is
imported inside methods only.
"""
from __future__ import annotations

from importlib.util import find_spec
from typing import ClassVar

import torch

from textgen.core.attention import AttentionSpec
from textgen.core.forward_context import AttentionMetadata
from textgen.core.layers.static_paged_attention import StaticPagedAttention


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
