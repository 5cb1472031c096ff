"""XPU kernels. Stock PyTorch's XPU build (torch.xpu, no IPEX) runs the portable kernel
(TorchPagedAttention: index_select + scaled_dot_product_attention, which torch implements for
XPU), so every XPU serves without extra packages. Where installed, the vLLM project's
`vllm-xpu-kernels` (SYCL/CUTLASS kernels for Intel GPUs, the ones vLLM's XPU platform calls)
supply a paged flash-attention with flash-attn's varlen call: FlashAttentionPaged's layout,
metadata builder and bottom-right causal contract, its block size a multiple of 64 (the size
its tests cover). Imported inside methods only.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from typing import ClassVar

import torch

from textgen.backends.cuda.attention import FlashAttentionPaged, spec_reasons
from textgen.core.attention import AttentionSpec

XPU_PAGE_MULTIPLE = 64


def xpu_device_reasons() -> list[str]:
    if not hasattr(torch, "xpu") or not torch.xpu.is_available():
        return ["no XPU device is visible to torch (torch.xpu.is_available() is False)"]
    return []


def install_reasons() -> list[str]:
    if find_spec("vllm_xpu_kernels") is None:
        return ["vllm_xpu_kernels is not installed (pip install vllm-xpu-kernels, built for this torch)"]
    return []


class XPUFlashAttentionPaged(FlashAttentionPaged):
    name: ClassVar[str] = "xpu_flash_attn"
    block_size_multiple: ClassVar[int] = XPU_PAGE_MULTIPLE
    supports_graph_capture: ClassVar[bool] = False  # the XPU backend has no graph rule

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        return super(FlashAttentionPaged, cls).check(spec) + install_reasons() + spec_reasons(spec) + xpu_device_reasons()

    @staticmethod
    def varlen_func() -> Callable[..., torch.Tensor]:
        from vllm_xpu_kernels.flash_attn_interface import flash_attn_varlen_func

        return flash_attn_varlen_func
