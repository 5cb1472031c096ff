"""CPUFusedPagedAttention: the CPU backend's own paged-attention kernel (C++, built at first use).

The portable kernel (`cpu_paged`, core/layers/paged_attention.py) gathers each group's whole
context K/V into a padded copy in every layer, builds a boolean mask, then calls SDPA. At 64
decoding clients that copy and mask are most of the attention time. This kernel
(csrc/paged_attention.cpp) reads each key and value row straight from its block, once per KV
head, for all the query heads that share it, with the softmax in float32; work is split over
(token, KV head) pairs with ATen's thread pool.

Which tokens it computes: every token of a request with at most `MAX_KERNEL_QUERY` new tokens
(decodes, speculative verification). Longer prefill chunks keep the portable
kernel's flash SDPA groups, where a per-token loop would lose; a lone fresh prompt keeps the
causal SDPA fast path. Both paths read the same cache layout, so a step may mix them.

Built with torch.utils.cpp_extension and `-march=native` into torch's extension cache
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): the first start on a machine compiles
it (about a minute on 2 cores), later starts load it. Where it cannot be built (no C++ compiler
or ninja) or `TEXTGEN_CPU_FUSED_ATTENTION=0`, negotiation skips it with that reason and the
portable kernel serves.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from textgen.backends.cpu import cpp_build
from textgen.core.attention import AttentionSpec
from textgen.core.forward_context import StepTensors
from textgen.core.layers.paged_attention import (
    TorchPagedAttention, TorchPagedMetadata, TorchPagedMetadataBuilder, _length_buckets, _plan_group,
    _takes_fast_prefill, write_kv,
)

# New tokens per request up to which the C++ kernel computes them. It attends token by token, so
# the keys a request's chunk shares are read once per token; SDPA's groups share them. Measured
# (1 thread, bf16, 4 requests, 12/4 heads of 64): per-token wins at 1-2 new tokens (0.26 vs 0.66 ms
# at 256 context), is even at 4, and loses from 8 (6.3 vs 4.6 ms at 1,024 context).
MAX_KERNEL_QUERY = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def build_problem() -> str | None:
    """None once the op is loaded (built if needed); else why it cannot be."""
    return cpp_build.build_problem("textgen_cpu_attention", "paged_attention.cpp", "TEXTGEN_CPU_FUSED_ATTENTION")


@dataclass(slots=True)
class FusedMetadata(TorchPagedMetadata):
    """The portable metadata (whose plans cover only the long prefill rows) plus, per token, the
    request row and visible context length the C++ kernel reads; `kernel_tokens` lists the tokens
    it computes (None: none)."""

    kernel_tokens: torch.Tensor | None = None
    token_request: torch.Tensor | None = None
    token_context: torch.Tensor | None = None


class FusedMetadataBuilder(TorchPagedMetadataBuilder):
    def build(self, step: StepTensors) -> FusedMetadata:
        base = step.attention_metadata()
        query_lens, context_lens = base.query_lens, base.context_lens
        fresh = base.num_requests == 1 and query_lens[0] == context_lens[0] and query_lens[0] > MAX_KERNEL_QUERY
        meta = FusedMetadata(*(getattr(base, f) for f in TorchPagedMetadata.__dataclass_fields__
                               if f not in ("plans", "fresh_prefill")), fresh_prefill=fresh)
        meta.block_tables = meta.block_tables.contiguous()
        num_tokens = int(step.input_ids.shape[0])
        if fresh and all(_takes_fast_prefill(s) for s in self.specs):
            return meta
        q = np.asarray(query_lens, dtype=np.int64)
        kernel_rows = q <= MAX_KERNEL_QUERY
        long_rows = [i for i in range(len(query_lens)) if not kernel_rows[i]]
        if kernel_rows.any():
            ends = np.asarray(context_lens, dtype=np.int64)
            request = np.repeat(np.arange(len(q), dtype=np.int32), q)
            starts = np.cumsum(q) - q
            # token j of request i sees its context up to position ctx_i - q_i + j (inclusive)
            context = (np.arange(num_tokens) - np.repeat(starts, q) + np.repeat(ends - q, q) + 1).astype(np.int32)
            tokens = np.flatnonzero(np.repeat(kernel_rows, q)).astype(np.int32)
            meta.kernel_tokens = torch.from_numpy(tokens).to(self.device)
            meta.token_request = torch.from_numpy(request).to(self.device)
            meta.token_context = torch.from_numpy(context).to(self.device)
        if long_rows:
            groups = _length_buckets(long_rows, context_lens)
            for window in {s.sliding_window for s in self.specs}:
                meta.plans[window] = [_plan_group(meta, rows, num_tokens, window, self.device) for rows in groups]
        return meta


class CPUFusedPagedAttention(TorchPagedAttention):
    """Paged attention on the host CPU through textgen's C++ kernel (see the module docstring)."""

    name: ClassVar[str] = "cpu_fused"
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()  # an fp8 cache is the portable kernel's
    metadata_builder_cls = FusedMetadataBuilder

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().check(spec)
        if spec.dtype not in _DTYPES:
            reasons.append(f"dtype {spec.dtype} is not float32, bfloat16 or float16")
        if not reasons:
            problem = build_problem()
            if problem:
                reasons.append(problem)
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: FusedMetadata) -> torch.Tensor:
        if meta.fresh_prefill and _takes_fast_prefill(self.spec):
            return super().forward(q, k, v, kv_cache, meta)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_size = q.shape
        q = q.contiguous()
        plans = meta.plans.get(self.spec.sliding_window, [])
        # one extra row absorbs the writes of the portable groups' padded query slots
        full = q.new_empty(num_tokens + 1 if plans else num_tokens, num_heads, head_size)
        out = full[:num_tokens]
        if meta.kernel_tokens is not None:
            spec = self.spec
            torch.ops.textgen_cpu.paged_attention(
                out, q, kv_cache, meta.block_tables, meta.kernel_tokens, meta.token_request, meta.token_context,
                spec.scale, spec.sliding_window or 0, spec.logits_soft_cap or 0.0, self._slopes)
        for plan in plans:
            result = self._attend(q[plan.token_idx], kv_cache, plan, meta.block_size)
            full.index_put_((plan.out_idx,), result.reshape(-1, num_heads, head_size))
        return out.reshape(num_tokens, num_heads * head_size)
