"""The CPU backend's C++ paged-attention kernel (cpu_fused) against the portable kernel and a
per-token reference, and its place in negotiation."""
from __future__ import annotations

import pytest
import torch

from textgen.backends.cpu.attention import CPUPagedAttention
from textgen.backends.cpu.fused_attention import MAX_KERNEL_QUERY, CPUFusedPagedAttention, build_problem
from textgen.core.attention import AttentionSpec
from textgen.core.attention_selection import negotiate
from textgen.core.registry import AttentionBackendInfo
from textgen.testing.conformance import _check_kernel_spec, kernel_variants
from textgen.testing.steps import StepRow, fill_step, kernel_metadata

pytestmark = pytest.mark.skipif(build_problem() is not None, reason=f"cpu_fused unavailable: {build_problem()}")

FUSED = AttentionBackendInfo("cpu_fused", "textgen.backends.cpu.fused_attention:CPUFusedPagedAttention", 10)
PORTABLE = AttentionBackendInfo("cpu_paged", "textgen.backends.cpu.attention:CPUPagedAttention", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_variant_matches_the_reference(dtype):
    """GQA, sliding window, soft-cap and ALiBi through mixed steps (decodes, short and long chunks)."""
    for name, spec in kernel_variants(CPUFusedPagedAttention, dtype).items():
        result = _check_kernel_spec(CPUFusedPagedAttention, spec, name, torch.device("cpu"))
        assert result.passed, result.render()


def _random_step(spec: AttentionSpec, cached: list[int], query: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    bs = spec.block_size
    seq = [c + q for c, q in zip(cached, query)]
    num_blocks = sum(-(-n // bs) for n in seq) + 1
    free = torch.randperm(num_blocks, generator=gen).tolist()
    rows = [StepRow(c, q, [free.pop() for _ in range(-(-n // bs))]) for c, q, n in zip(cached, query, seq)]
    shape = CPUFusedPagedAttention.kv_cache_shape(num_blocks, bs, spec.num_kv_heads, spec.head_size, spec.dtype)
    cache = torch.randn(shape, generator=gen).to(spec.dtype)
    tokens = sum(query)
    # q as a strided view of a fused projection, as the models hand it over
    qkv = torch.randn(tokens, spec.num_heads + 2 * spec.num_kv_heads, spec.head_size, generator=gen).to(spec.dtype)
    q, k, v = qkv.split([spec.num_heads, spec.num_kv_heads, spec.num_kv_heads], dim=1)
    return rows, cache, q, k, v


# query heads per KV head 1-8 (the vector path takes them 4, 2 or 1 at a time by head size, the
# rest in a smaller pass), head sizes with and without a compiled specialisation
SHAPES = [(12, 4, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80), (20, 4, 64), (7, 1, 64), (6, 2, 128), (4, 2, 256)]


@pytest.mark.parametrize("heads,kv_heads,head_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_portable_kernel_on_a_mixed_step(heads, kv_heads, head_size, dtype):
    """Same cache, same step: decodes, a short chunk, a long chunk after a prefix (which cpu_fused
    hands to the portable path) in one step. bf16: both round once per output element from float32
    sums in different orders, so they may differ by an ulp of bf16 (2^-8 relative)."""
    spec = AttentionSpec(heads, kv_heads, head_size, dtype, head_size ** -0.5, block_size=16)
    cached = [37, 0, 5, 64, 3]
    query = [1, 9, MAX_KERNEL_QUERY + 20, 1, MAX_KERNEL_QUERY]
    outs = []
    for kernel_cls in (CPUPagedAttention, CPUFusedPagedAttention):
        rows, cache, q, k, v = _random_step(spec, cached, query, seed=3)
        step = fill_step(rows, spec.block_size)
        meta = kernel_metadata(kernel_cls, [spec], step)
        outs.append(kernel_cls(spec).forward(q, k, v, cache, meta))
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)


def test_decode_only_step_runs_only_the_kernel():
    spec = AttentionSpec(12, 4, 64, torch.bfloat16, 0.125, block_size=16)
    rows, cache, q, k, v = _random_step(spec, [100, 7, 300], [1, 1, 1], seed=1)
    meta = kernel_metadata(CPUFusedPagedAttention, [spec], fill_step(rows, 16))
    assert meta.plans == {} and meta.kernel_tokens.tolist() == [0, 1, 2]
    assert meta.token_context.tolist() == [101, 8, 301]


def test_fp8_cache_and_disabled_kernel_fall_back_to_the_portable_kernel(monkeypatch):
    spec = AttentionSpec(4, 2, 16, torch.float32, 0.25)
    choice = negotiate([FUSED, PORTABLE], [spec], None, torch.float8_e4m3fn)
    assert choice.kernel_cls.name == "cpu_paged"
    assert any(r.kernel == "cpu_fused" and "KV cache dtype" in r.describe() for r in choice.rejected)

    build_problem.cache_clear()
    monkeypatch.setenv("TEXTGEN_CPU_FUSED_ATTENTION", "0")
    try:
        choice = negotiate([FUSED, PORTABLE], [spec], None, None)
        assert choice.kernel_cls.name == "cpu_paged"
        assert any("TEXTGEN_CPU_FUSED_ATTENTION=0" in r.describe() for r in choice.rejected)
    finally:
        build_problem.cache_clear()
        monkeypatch.delenv("TEXTGEN_CPU_FUSED_ATTENTION")
        assert build_problem() is None


def test_the_cpu_backend_offers_the_fused_kernel_first():
    from textgen.backends.cpu import plugin

    spec = AttentionSpec(4, 2, 16, torch.bfloat16, 0.25)
    choice = negotiate(plugin.textgen_attention_backends(backend=None), [spec], None, None)
    assert choice.kernel_cls is CPUFusedPagedAttention and choice.rejected == ()
