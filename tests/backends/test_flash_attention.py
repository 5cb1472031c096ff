"""FlashAttentionPaged: its check() reasons (CPU) and its output against TorchPagedAttention
(needs a CUDA device with flash-attn installed)."""
from __future__ import annotations

import sys
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from textgen.backends.cuda import attention as fa
from textgen.backends.cuda.attention import FlashAttentionPaged
from textgen.core.attention import AttentionSpec
from textgen.core.layers.paged_attention import TorchPagedAttention
from textgen.testing.steps import StepRow, fill_step, kernel_metadata


def _spec(**overrides: object) -> AttentionSpec:
    fields = dict(num_heads=8, num_kv_heads=2, head_size=128, dtype=torch.bfloat16, block_size=256, scale=128**-0.5)
    fields.update(overrides)
    return AttentionSpec(**fields)


def test_check_names_every_reason_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa, "installed_version", lambda: None)
    monkeypatch.setattr(fa, "_device_reasons", lambda: [])
    spec = _spec(dtype=torch.float32, head_size=84, block_size=16, num_heads=6, num_kv_heads=4)
    assert FlashAttentionPaged.check(spec) == [
        "block_size 16 is not a multiple of 256",
        "num_heads 6 is not a multiple of num_kv_heads 4",
        "flash_attn is not installed (pip install 'flash-attn>=2.5.7')",
        "dtype torch.float32 is not supported (flash-attn computes in float16 or bfloat16)",
        "head_size 84 is unsupported (flash-attn needs a multiple of 8, at most 256)",
    ]


def test_check_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa, "_device_reasons", lambda: [])
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 5, 6))
    assert FlashAttentionPaged.check(_spec()) == [
        "flash-attn 2.5.6 has no paged KV in flash_attn_varlen_func (needs >= 2.5.7)"
    ]
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 5, 9))
    assert FlashAttentionPaged.check(_spec(logits_soft_cap=50.0)) == [
        "flash-attn 2.5.9 has no logits soft-capping (needs >= 2.6.0)"
    ]
    monkeypatch.setattr(fa, "installed_version", lambda: (2, 7, 4))
    assert FlashAttentionPaged.check(_spec(head_size=256, dtype=torch.float16, logits_soft_cap=50.0)) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_check_on_this_machine_says_no_cuda_device() -> None:
    reasons = FlashAttentionPaged.check(_spec())
    assert reasons[-1] == "no CUDA device is visible to torch"
    if find_spec("flash_attn") is None:
        assert reasons == ["flash_attn is not installed (pip install 'flash-attn>=2.5.7')", reasons[-1]]


def test_layout_matches_the_portable_kernel() -> None:
    """FlashAttentionPaged writes through TorchPagedAttention's write_kv, so the layouts must agree."""
    args = (7, 256, 2, 64, torch.bfloat16)
    assert FlashAttentionPaged.kv_cache_shape(*args) == TorchPagedAttention.kv_cache_shape(*args) == (2, 7, 256, 2, 64)


def _mixed_step(kernel_cls: type, spec: AttentionSpec, device: str):
    """Request 0: a 300-token prefill chunk after a 200-token cached prefix (spans 2 blocks);
    request 1: one decode token at position 40; request 2: a fresh 5-token prefill; built by the
    kernel's own metadata builder."""
    rows = [StepRow(200, 300, [3, 1]), StepRow(40, 1, [0]), StepRow(0, 5, [2])]
    return kernel_metadata(kernel_cls, [spec], fill_step(rows, spec.block_size, device), device)


def _flash_attn_semantics(q, k_cache, v_cache, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_size, block_table):
    """flash_attn_varlen_func as documented for paged KV: keys of batch b are the first
    cu_seqlens_k[b+1] - cu_seqlens_k[b] slots of its blocks; query i may see key j when
    i + sk - sq - window_left <= j <= i + sk - sq (the causal mask aligned bottom-right)."""
    assert causal and window_size[1] in (-1, 0) and block_table.dtype == torch.int32
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qb = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].float()
        sq, sk = qb.shape[0], int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        keys = k_cache[block_table[b].long()].flatten(0, 1)[:sk].float()
        values = v_cache[block_table[b].long()].flatten(0, 1)[:sk].float()
        groups = qb.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        allowed = j <= i + sk - sq
        if window_size[0] >= 0:
            allowed &= j >= i + sk - sq - window_size[0]
        scores = torch.einsum("qhd,khd->hqk", qb, keys) * softmax_scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype))
    return torch.cat(outs)


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_forward_keeps_flash_attn_paged_contract(monkeypatch: pytest.MonkeyPatch, sliding_window: int | None) -> None:
    """On CPU, flash-attn's documented varlen/paged semantics stand in for its CUDA kernel: this pins
    what forward passes it (cumulative key lengths, bottom-right causal, window W -> W - 1 left)."""
    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(flash_attn_varlen_func=_flash_attn_semantics))
    spec = _spec(dtype=torch.float32, sliding_window=sliding_window, head_size=16)
    out, expected = _run_both(spec, "cpu")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _run_both(spec: AttentionSpec, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttentionPaged and TorchPagedAttention on the same mixed step and cache contents."""
    meta = _mixed_step(FlashAttentionPaged, spec, device)
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, dtype=spec.dtype, device=device, generator=generator)  # noqa: E731
    shape = FlashAttentionPaged.kv_cache_shape(4, spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype)
    cache = randn(*shape)
    tokens = meta.slot_mapping.numel()
    q = randn(tokens, spec.num_heads, spec.head_size)
    k, v = randn(tokens, spec.num_kv_heads, spec.head_size), randn(tokens, spec.num_kv_heads, spec.head_size)
    reference_cache = cache.clone()
    out = FlashAttentionPaged(spec).forward(q, k, v, cache, meta)
    expected = TorchPagedAttention(spec).forward(q, k, v, reference_cache, _mixed_step(TorchPagedAttention, spec, device))
    assert torch.equal(cache, reference_cache)
    return out, expected


@pytest.mark.skipif(
    not torch.cuda.is_available() or find_spec("flash_attn") is None, reason="needs a CUDA device and flash-attn"
)
@pytest.mark.parametrize("sliding_window", [None, 64])
def test_matches_torch_paged_attention_on_a_mixed_step(sliding_window: int | None) -> None:
    spec = _spec(sliding_window=sliding_window)
    assert FlashAttentionPaged.check(spec) == []
    out, expected = _run_both(spec, "cuda")
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
