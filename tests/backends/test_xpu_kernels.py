"""XPU kernels: vllm-xpu-kernels' paged flash-attention behind its availability check (reasons on
this machine, negotiation with a fake device report, its varlen call pinned with flash-attn's
documented semantics); the portable kernel otherwise."""
from __future__ import annotations

import sys
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from tests.backends.test_flash_attention import _flash_attn_semantics
from textgen.backends.cuda import attention as fa
from textgen.backends.xpu import attention as xa
from textgen.backends.xpu.attention import XPUFlashAttentionPaged
from textgen.backends.xpu.plugin import textgen_attention_backends
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import negotiate
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.testing.steps import StepRow, fill_step, kernel_metadata


def _spec(**overrides: object) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16, block_size=64, scale=128**-0.5)
    fields.update(overrides)
    return AttentionSpec(**fields)


@pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="this machine has an XPU")
def test_check_on_this_machine_names_what_is_missing() -> None:
    reasons = XPUFlashAttentionPaged.check(_spec())
    assert reasons[-1] == "no XPU device is visible to torch (torch.xpu.is_available() is False)"
    if find_spec("vllm_xpu_kernels") is None:
        assert reasons[0] == "vllm_xpu_kernels is not installed (pip install vllm-xpu-kernels, built for this torch)"


def test_negotiation_with_and_without_the_kernel_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xa, "xpu_device_reasons", lambda: [])
    monkeypatch.setattr(xa, "install_reasons", lambda: [])
    kernels = textgen_attention_backends(backend=None)
    choice = negotiate(kernels, [_spec()], None, None)
    assert (choice.kernel_cls, choice.block_size) == (XPUFlashAttentionPaged, 64)
    monkeypatch.setattr(xa, "install_reasons", lambda: ["vllm_xpu_kernels is not installed"])
    choice = negotiate(kernels, [_spec()], None, None)
    assert (choice.kernel_cls, choice.block_size) == (TorchPagedAttention, 16)
    assert choice.rejected[0].describe() == "xpu_flash_attn: vllm_xpu_kernels is not installed"


def test_forward_keeps_the_varlen_paged_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn's documented varlen/paged semantics stand in for the SYCL kernel (CPU)."""
    interface = SimpleNamespace(flash_attn_varlen_func=_flash_attn_semantics)
    monkeypatch.setitem(sys.modules, "vllm_xpu_kernels", SimpleNamespace(flash_attn_interface=interface))
    monkeypatch.setitem(sys.modules, "vllm_xpu_kernels.flash_attn_interface", interface)
    spec = _spec(dtype=torch.float32, head_size=16)
    step = fill_step([StepRow(70, 30, [3, 1]), StepRow(40, 1, [0]), StepRow(0, 5, [2])], 64)
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 4, 64, 2, 16, generator=generator)
    q, k, v = (torch.randn(36, h, 16, generator=generator) for h in (8, 2, 2))
    reference = cache.clone()
    out = XPUFlashAttentionPaged(spec).forward(q, k, v, cache, kernel_metadata(XPUFlashAttentionPaged, [spec], step))
    want = TorchPagedAttention(spec).forward(q, k, v, reference, kernel_metadata(TorchPagedAttention, [spec], step))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert fa.FlashAttentionPaged.varlen_func is not XPUFlashAttentionPaged.varlen_func
