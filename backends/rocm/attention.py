"""ROCm's paged kernels: flash-attention's CK backend and AMD's aiter, both through the
flash_attn_varlen_func call of FlashAttentionPaged (same layout, same metadata builder, the same
bottom-right causal contract); imported inside methods only.

- flash_attn_ck: ROCm's flash-attention build (github.com/ROCm/flash-attention, upstream
  flash-attn compiled for ROCm) on its Composable Kernel backend. Its paged varlen path needs the
  block size to be a multiple of 128 ("Paged KV cache block size must be divisible by 128",
  Dao-AILab/flash-attention#1579); the Triton AMD backend (FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE)
  has no paged KV at all.
- aiter: AMD's AI Tensor Engine (github.com/ROCm/aiter), `aiter.flash_attn_varlen_func` with a
  block_table, the kernels vLLM's ROCm backends call. Its paged varlen path faults the GPU on
  gfx950 (MI350X) with bf16 (ROCm/aiter#4455, open): refused there with that reason.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from importlib.util import find_spec
from typing import ClassVar

import torch

from textgen.backends.cuda import attention as cuda_attention
from textgen.backends.cuda.attention import FlashAttentionPaged
from textgen.core.attention import AttentionSpec

CK_PAGE_MULTIPLE = 128
TRITON_AMD_ENV = "FLASH_ATTENTION_TRITON_AMD_ENABLE"
AITER_FAULTING_ARCHS = ("gfx950",)


def rocm_device_reasons() -> list[str]:
    if not torch.version.hip or torch.cuda.device_count() == 0:
        return ["no ROCm device is visible to torch"]
    return []


def gpu_arch() -> str:
    return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]


class CKFlashAttentionPaged(FlashAttentionPaged):
    name: ClassVar[str] = "flash_attn_ck"
    block_size_multiple: ClassVar[int] = CK_PAGE_MULTIPLE

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = super(FlashAttentionPaged, cls).check(spec) + cuda_attention.install_reasons(spec)
        if os.environ.get(TRITON_AMD_ENV, "").upper() in ("TRUE", "1"):
            reasons.append(f"{TRITON_AMD_ENV} selects flash-attn's Triton AMD backend, which has no paged KV")
        return reasons + cuda_attention.spec_reasons(spec) + rocm_device_reasons()


def _aiter_install_reasons() -> list[str]:
    if find_spec("aiter") is None:
        return ["aiter is not installed (AMD's github.com/ROCm/aiter; it ships in ROCm's vLLM images)"]
    return []


class AiterPaged(FlashAttentionPaged):
    name: ClassVar[str] = "aiter"
    block_size_multiple: ClassVar[int] = CK_PAGE_MULTIPLE  # aiter's FMHA pages as CK's do

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = super(FlashAttentionPaged, cls).check(spec) + _aiter_install_reasons()
        reasons += cuda_attention.spec_reasons(spec)
        device = rocm_device_reasons()
        if not device and gpu_arch().startswith(AITER_FAULTING_ARCHS):
            device = [f"aiter's paged varlen attention faults the GPU on {gpu_arch()} (ROCm/aiter#4455)"]
        return reasons + device

    @staticmethod
    def varlen_func() -> Callable[..., torch.Tensor]:
        from aiter import flash_attn_varlen_func

        return flash_attn_varlen_func
