"""RaggedPagedAttention's call of torch_xla's ragged_paged_attention op (layout of K/V pages, the
CSR arguments, window, soft-cap) checked on torch_xla's CPU device against StaticPagedAttention.
The Pallas kernel runs on TPU only, so the op runs its own non-kernel reference path
(use_kernel=False, torch_xla's reference of the same op). Not in CI: run by
scripts/xla_cpu_check.sh in its venv. Exits 1 when an output or the cache differs.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch_xla
import torch_xla.experimental.custom_kernel  # noqa: F401  registers torch.ops.xla.ragged_paged_attention

from textgen.backends.tpu.attention import RaggedPagedAttention
from textgen.core.layers.static_paged_attention import StaticPagedAttention
from textgen.core.attention import AttentionSpec
from textgen.testing.steps import StepRow, fill_step, kernel_metadata

ROWS = [StepRow(20, 30, [3, 1, 6, 7]), StepRow(40, 1, [0, 5, 8]), StepRow(0, 5, [2])]  # chunk, decode, fresh


class _NonKernelOps:
    """torch.ops.xla with the ragged op bound to its non-kernel path (no Pallas on CPU)."""

    ragged_paged_attention = staticmethod(functools.partial(torch.ops.xla.ragged_paged_attention, use_kernel=False))


def compare(spec: AttentionSpec, device: torch.device) -> tuple[float, bool]:
    """Max |ragged - static| over the step's outputs, and whether the two caches hold the same K/V."""
    step = fill_step(ROWS, spec.block_size)
    generator = torch.Generator().manual_seed(0)
    tokens = step.input_ids.numel()
    q, k, v = (torch.randn(tokens, h, spec.head_size, generator=generator) for h in (8, 2, 2))
    static_cache = torch.randn(2, 9, 16, 2, spec.head_size, generator=generator)
    ragged_cache = static_cache.permute(1, 2, 3, 0, 4).reshape(9, 16, 4, spec.head_size).to(device)  # k0 v0 k1 v1
    want = StaticPagedAttention(spec).forward(q, k, v, static_cache, kernel_metadata(StaticPagedAttention, [spec], step))
    meta = kernel_metadata(RaggedPagedAttention, [spec], step)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(device))
    got = RaggedPagedAttention(spec).forward(q.to(device), k.to(device), v.to(device), ragged_cache, meta).cpu()
    back = ragged_cache.cpu().reshape(9, 16, 2, 2, spec.head_size).permute(3, 0, 1, 2, 4)
    return (got - want).abs().max().item(), torch.allclose(back, static_cache, atol=1e-6)


def main() -> int:
    device, ok = torch_xla.device(), True
    torch.ops.xla = _NonKernelOps
    for window, cap in [(None, None), (40, None), (None, 5.0)]:
        spec = AttentionSpec(8, 2, 128, torch.float32, 128**-0.5, sliding_window=window, logits_soft_cap=cap,
                             block_size=16)
        err, cache_ok = compare(spec, device)
        ok = ok and err < 1e-5 and cache_ok
        print(f"window={window} softcap={cap}: max |ragged - static| = {err:.2e}, caches agree: {cache_ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
