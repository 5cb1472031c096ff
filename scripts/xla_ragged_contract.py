"""RaggedPagedAttention's call of torch_xla's ragged_paged_attention op (layout of K/V pages, the
CSR arguments, window, soft-cap) checked on torch_xla's CPU device against StaticPagedAttention.
The Pallas kernel runs on TPU only, so the op runs its own non-kernel reference path
(use_kernel=False, torch_xla's documented reference of the same op). Not in CI: run by
scripts/xla_cpu_check.sh in its venv. Exits 1 when an output or the cache differs.
"""
import sys

import functools, torch, torch_xla
import torch_xla.experimental.custom_kernel  # noqa
from textgen.backends.tpu.attention import RaggedPagedAttention, StaticPagedAttention
from textgen.core.attention import AttentionSpec
from textgen.testing.steps import StepRow, fill_step, kernel_metadata
dev = torch_xla.device()
ok = True
real_op = torch.ops.xla.ragged_paged_attention
class Ops:  # torch_xla's own non-kernel reference path of the same op (use_kernel=False): CPU has no Pallas
    ragged_paged_attention = staticmethod(functools.partial(real_op, use_kernel=False))
torch.ops.xla = Ops
for window, cap in [(None, None), (40, None), (None, 5.0)]:
    spec = AttentionSpec(8, 2, 128, torch.float32, 128**-0.5, sliding_window=window, logits_soft_cap=cap, block_size=16)
    rows = [StepRow(20, 30, [3, 1, 6, 7]), StepRow(40, 1, [0, 5, 8]), StepRow(0, 5, [2])]
    step = fill_step(rows, 16)
    g = torch.Generator().manual_seed(0)
    T = step.input_ids.numel()
    q, k, v = (torch.randn(T, h, 128, generator=g) for h in (8, 2, 2))
    static_cache = torch.randn(2, 9, 16, 2, 128, generator=g)
    ragged_cache = static_cache.permute(1, 2, 3, 0, 4).reshape(9, 16, 4, 128).clone()  # K/V heads interleaved
    want = StaticPagedAttention(spec).forward(q, k, v, static_cache, kernel_metadata(StaticPagedAttention, [spec], step))
    meta = kernel_metadata(RaggedPagedAttention, [spec], step)
    to = lambda t: t.to(dev)
    for f in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, f, to(getattr(meta, f)))
    cache = to(ragged_cache)
    got = RaggedPagedAttention(spec).forward(to(q), to(k), to(v), cache, meta).cpu()
    err = (got - want).abs().max().item()
    cache_ok = torch.allclose(cache.cpu().reshape(9, 16, 2, 2, 128).permute(3, 0, 1, 2, 4), static_cache, atol=1e-6)
    ok = ok and err < 1e-5 and cache_ok
    print(f"window={window} softcap={cap}: max |ragged - static| = {err:.2e}, caches agree: {cache_ok}")
sys.exit(0 if ok else 1)
