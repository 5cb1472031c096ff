"""ROCm's kernels (aiter, flash-attention CK): check() reasons on this machine and with fake
device reports, negotiation among them and the portable kernel, and aiter's call contract pinned
with flash-attn's documented varlen semantics (aiter mirrors flash_attn_varlen_func)."""
from __future__ import annotations

import sys
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from tests.backends.test_flash_attention import _flash_attn_semantics
from textgen.backends.cuda import attention as fa
from textgen.backends.rocm import attention as ra
from textgen.backends.rocm.attention import AiterPaged, CKFlashAttentionPaged
from textgen.backends.rocm.plugin import textgen_attention_backends
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import negotiate
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.testing.steps import StepRow, fill_step, kernel_metadata


def _spec(**overrides: object) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16, block_size=128, scale=128**-0.5)
    fields.update(overrides)
    return AttentionSpec(**fields)


@pytest.mark.skipif(bool(torch.version.hip) and torch.cuda.is_available(), reason="this machine has a ROCm GPU")
def test_check_on_this_machine_names_what_is_missing() -> None:
    ck, aiter = CKFlashAttentionPaged.check(_spec()), AiterPaged.check(_spec())
    assert ck[-1] == aiter[-1] == "no ROCm device is visible to torch"
    if find_spec("aiter") is None:
        assert aiter[0].startswith("aiter is not installed")
    if find_spec("flash_attn") is None:
        assert ck[0] == "flash_attn is not installed (pip install 'flash-attn>=2.5.7')"


@pytest.fixture
def mi300(monkeypatch: pytest.MonkeyPatch):
    """A device report of an MI300X (gfx942) with aiter and ROCm's flash-attention installed."""
    monkeypatch.setattr(ra, "rocm_device_reasons", lambda: [])
    monkeypatch.setattr(ra, "gpu_arch", lambda: "gfx942")
    monkeypatch.setattr(ra, "_aiter_install_reasons", lambda: [])
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 7, 4))
    monkeypatch.delenv(ra.TRITON_AMD_ENV, raising=False)
    return monkeypatch


def test_negotiation_on_rocm(mi300) -> None:
    kernels, specs = textgen_attention_backends(backend=None), [_spec()]
    choice = negotiate(kernels, specs, None, None)
    assert (choice.kernel_cls, choice.block_size) == (AiterPaged, 128)
    mi300.setattr(ra, "gpu_arch", lambda: "gfx950")
    choice = negotiate(kernels, specs, None, None)
    assert (choice.kernel_cls, choice.block_size) == (CKFlashAttentionPaged, 128)
    assert choice.rejected[0].describe() == "aiter: aiter's paged varlen attention faults the GPU on gfx950 (ROCm/aiter#4455)"
    mi300.setenv(ra.TRITON_AMD_ENV, "TRUE")
    choice = negotiate(kernels, specs, 16, None)
    assert choice.kernel_cls is TorchPagedAttention
    assert choice.rejected[1].describe() == (
        "flash_attn_ck: block_size 16 is not a multiple of 128; FLASH_ATTENTION_TRITON_AMD_ENABLE selects "
        "flash-attn's Triton AMD backend, which has no paged KV")


@pytest.mark.parametrize("kernel_cls,module", [(AiterPaged, "aiter"), (CKFlashAttentionPaged, "flash_attn")])
def test_forward_keeps_the_varlen_paged_contract(monkeypatch: pytest.MonkeyPatch, kernel_cls, module) -> None:
    """flash-attn's documented varlen/paged semantics stand in for the ROCm kernels (CPU)."""
    monkeypatch.setitem(sys.modules, module, SimpleNamespace(flash_attn_varlen_func=_flash_attn_semantics))
    spec = _spec(dtype=torch.float32, head_size=16, sliding_window=100)
    rows = [StepRow(200, 60, [3, 1, 4]), StepRow(40, 1, [0]), StepRow(0, 5, [2])]
    step = fill_step(rows, 128)
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(*kernel_cls.kv_cache_shape(5, 128, 2, 16, spec.dtype), generator=generator)
    q = torch.randn(66, 8, 16, generator=generator)
    k, v = torch.randn(66, 2, 16, generator=generator), torch.randn(66, 2, 16, generator=generator)
    reference = cache.clone()
    out = kernel_cls(spec).forward(q, k, v, cache, kernel_metadata(kernel_cls, [spec], step))
    want = TorchPagedAttention(spec).forward(q, k, v, reference, kernel_metadata(TorchPagedAttention, [spec], step))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
