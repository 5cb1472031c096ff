"""FlashInferPaged: FlashInfer's paged attention (`flashinfer-python`), the second CUDA kernel.

Any page size (its page table is CSR: page indptr, page indices, last-page length), so it runs
with the default block size 16 where flash-attn needs 256. Its metadata builder plans once per
step, not per layer: it computes the page table from the step tensors, then calls the wrappers'
`plan` (which sizes the work split into the workspace buffers allocated once, at startup) for
each distinct (window, soft-cap) of the model's layers; every layer's `forward` only `run`s.
A decode-only step uses BatchDecodeWithPagedKVCacheWrapper; a step with a prefill chunk uses
BatchPrefillWithPagedKVCacheWrapper with causal=True (FlashInfer aligns the causal mask
bottom-right when a request has fewer query tokens than keys: the AttentionBackend contract).
fp8 KV caches (e4m3, e5m2) are read by both wrappers (`kv_data_type`). flashinfer is imported
inside methods only. Not capture-safe here: FlashInfer's CUDA-graph mode needs one wrapper per
batch size on fixed buffers (use_cuda_graph=True), so graph mode is off with this kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from textgen.backends.cuda.attention import capability_reasons, package_version
from textgen.core.attention import AttentionBackend, AttentionMetadataBuilder, AttentionSpec, StepLimits
from textgen.core.forward_context import AttentionMetadata
from textgen.core.layers.paged_attention import FP8_DTYPES, write_kv

if TYPE_CHECKING:
    from textgen.core.forward_context import StepTensors

MIN_VERSION = (0, 2, 5)  # plan()/run() wrappers with window_left, logits_soft_cap and kv_data_type
HEAD_SIZES = (64, 128, 256)  # the head dims FlashInfer's prebuilt and JIT kernels cover
DTYPES = (torch.float16, torch.bfloat16)
WORKSPACE_BYTES = 128 << 20  # FlashInfer's documented default float workspace
MIN_CAPABILITY = (7, 5)  # FlashInfer's kernels run from Turing on


def installed_version() -> tuple[int, ...] | None:
    return package_version("flashinfer", "flashinfer-python")


def _install_reasons() -> list[str]:
    version, needed = installed_version(), ".".join(map(str, MIN_VERSION))
    if version is None:
        return [f"flashinfer is not installed (pip install 'flashinfer-python>={needed}')"]
    if version < MIN_VERSION:
        return [f"flashinfer {'.'.join(map(str, version))} has no plan()/run() wrappers (needs >= {needed})"]
    return []


def _spec_reasons(spec: AttentionSpec) -> list[str]:
    reasons = []
    if spec.dtype not in DTYPES:
        reasons.append(f"dtype {spec.dtype} is not supported (FlashInfer computes in float16 or bfloat16)")
    if spec.head_size not in HEAD_SIZES:
        reasons.append(f"head_size {spec.head_size} is unsupported (FlashInfer: {', '.join(map(str, HEAD_SIZES))})")
    return reasons


def _device_reasons() -> list[str]:
    return capability_reasons(MIN_CAPABILITY, "FlashInfer")


PlanKey = tuple[int, float | None]  # (window_left, logits_soft_cap) of a layer


def plan_key(spec: AttentionSpec) -> PlanKey:
    """FlashInfer's window: a query sees itself and `window_left` keys before it (-1: all)."""
    return (spec.sliding_window - 1 if spec.sliding_window else -1, spec.logits_soft_cap)


@dataclass(slots=True)
class FlashInferMetadata(AttentionMetadata):
    wrappers: dict[PlanKey, Any] = field(default_factory=dict)  # planned for this step, per layer kind
    decode: bool = False  # every request computes one token: the decode wrappers were planned


class FlashInferMetadataBuilder(AttentionMetadataBuilder):
    """One decode and one prefill wrapper per distinct layer kind, each with its own workspace
    (a plan lives in its wrapper's workspace until the next plan)."""

    def __init__(self, kernel_cls: type[AttentionBackend], specs: list[AttentionSpec], limits: StepLimits,
                 device: torch.device) -> None:
        super().__init__(kernel_cls, specs, limits, device)
        import flashinfer

        self._first = {plan_key(s): s for s in reversed(specs)}
        self._decode = {k: flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace(), "NHD")
                        for k in self._first}
        self._prefill = {k: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace(), "NHD")
                         for k in self._first}

    def _workspace(self) -> torch.Tensor:
        return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)

    def build(self, step: StepTensors) -> FlashInferMetadata:
        base = step.attention_metadata()
        indptr, indices, last_len = page_table(step.seq_lens, step.block_tables, step.block_size)
        decode = all(n == 1 for n in step.query_lens)
        meta = FlashInferMetadata(*(getattr(base, f) for f in AttentionMetadata.__dataclass_fields__), decode=decode)
        for key, spec in self._first.items():
            common = dict(window_left=key[0], logits_soft_cap=key[1], sm_scale=spec.scale,
                          q_data_type=spec.dtype, kv_data_type=spec.cache_dtype)
            heads = (spec.num_heads, spec.num_kv_heads, spec.head_size, step.block_size)
            if decode:
                wrapper = self._decode[key]
                wrapper.plan(indptr, indices, last_len, *heads, **common)
            else:
                wrapper = self._prefill[key]
                wrapper.plan(step.query_start_loc, indptr, indices, last_len, *heads, causal=True, **common)
            meta.wrappers[key] = wrapper
        return meta


def page_table(seq_lens: torch.Tensor, block_tables: torch.Tensor, page_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page table (int32): page indptr [B+1], the pages in use, in order, and
    each request's last-page length in [1, page_size] (a 0-length row keeps one page of 0)."""
    lens = seq_lens.to(torch.int32)
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
    torch.cumsum(pages, 0, dtype=torch.int32, out=indptr[1:])
    used = torch.arange(block_tables.shape[1], device=lens.device)[None, :] < pages[:, None]
    indices = block_tables[used].to(torch.int32)
    last = lens - (pages - 1).clamp(min=0) * page_size
    return indptr, indices, last


class FlashInferPaged(AttentionBackend):
    """KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_size] (the
    portable kernel's); FlashInfer reads it as the (k_cache, v_cache) pair in its NHD layout."""

    name: ClassVar[str] = "flashinfer"
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = FP8_DTYPES
    supports_soft_cap: ClassVar[bool] = True
    metadata_builder_cls = FlashInferMetadataBuilder

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        """Every reason at once (capabilities, install, spec, device)."""
        return super().check(spec) + _install_reasons() + _spec_reasons(spec) + _device_reasons()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: FlashInferMetadata) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = meta.wrappers[plan_key(self.spec)].run(q, (kv_cache[0], kv_cache[1]))
        return out.reshape(q.shape[0], -1)
