"""FlashAttentionPaged: flash-attn 2's varlen kernel reading K/V through the block table.

One call serves a mixed step (prefill chunks after cached prefixes and decode tokens): flash-attn
aligns the causal mask bottom-right when a request has fewer query tokens than keys, which is
the AttentionBackend contract (query token j of request i sees context positions
<= seq_lens[i] - query_lens[i] + j). flash_attn is imported inside methods only.
"""
from __future__ import annotations

from collections.abc import Callable
import importlib
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from typing import TYPE_CHECKING

import torch

from textgen.core.attention import AttentionBackend, AttentionMetadataBuilder, AttentionSpec, StepLimits
from textgen.core.forward_context import AttentionMetadata
from textgen.core.layers.paged_attention import write_kv

if TYPE_CHECKING:
    from textgen.core.forward_context import StepTensors

MIN_VERSION = (2, 5, 7)  # block_table in flash_attn_varlen_func (Dao-AILab/flash-attention#831)
SOFTCAP_MIN_VERSION = (2, 6, 0)
PAGE_MULTIPLE = 256  # flash-attn 2 checks "Paged KV cache block size must be divisible by 256"
MAX_HEAD_SIZE = 256
MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere, Ada and Hopper
DTYPES = (torch.float16, torch.bfloat16)


def package_version(module: str, distribution: str) -> tuple[int, ...] | None:
    """An installed kernel package's version as ints ("2.6.3.post1" -> (2, 6, 3)), None when
    `module` is not importable; a build installed without distribution metadata is asked itself."""
    if find_spec(module) is None:
        return None
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        version = importlib.import_module(module).__version__
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def installed_version() -> tuple[int, ...] | None:
    return package_version("flash_attn", "flash-attn")


def install_reasons(spec: AttentionSpec) -> list[str]:
    version = installed_version()
    needed = ".".join(map(str, MIN_VERSION))
    if version is None:
        return [f"flash_attn is not installed (pip install 'flash-attn>={needed}')"]
    have = ".".join(map(str, version))
    if version < MIN_VERSION:
        return [f"flash-attn {have} has no paged KV in flash_attn_varlen_func (needs >= {needed})"]
    if spec.logits_soft_cap is not None and version < SOFTCAP_MIN_VERSION:
        return [f"flash-attn {have} has no logits soft-capping (needs >= 2.6.0)"]
    return []


def spec_reasons(spec: AttentionSpec) -> list[str]:
    reasons = []
    if spec.dtype not in DTYPES:
        reasons.append(f"dtype {spec.dtype} is not supported (flash-attn computes in float16 or bfloat16)")
    if spec.head_size % 8 or spec.head_size > MAX_HEAD_SIZE:
        reasons.append(f"head_size {spec.head_size} is unsupported (flash-attn needs a multiple of 8, at most 256)")
    return reasons


def capability_reasons(minimum: tuple[int, int], kernel: str) -> list[str]:
    """Why the visible GPU cannot run `kernel` (none visible, or below `minimum`)."""
    if torch.version.cuda is None or torch.cuda.device_count() == 0:
        return ["no CUDA device is visible to torch"]
    capability = torch.cuda.get_device_capability()
    if capability < minimum:
        return [f"{kernel} needs compute capability >= {minimum[0]}.{minimum[1]} "
                f"(this GPU is {capability[0]}.{capability[1]})"]
    return []


def _device_reasons() -> list[str]:
    return capability_reasons(MIN_CAPABILITY, "flash-attn 2")


@dataclass(slots=True)
class FlashAttentionMetadata(AttentionMetadata):
    cu_seqlens_k: torch.Tensor | None = None  # [B+1] int32: prefix sums of seq_lens
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


class FlashAttentionMetadataBuilder(AttentionMetadataBuilder):
    """cu_seqlens_k once per step (not per layer), into a buffer allocated at startup. A padded
    (graph) step passes the largest lengths the limits allow, so a captured graph stays valid for
    every later step of its bucket (flash-attn sizes its grid from them)."""

    def __init__(self, kernel_cls: type[AttentionBackend], specs: list[AttentionSpec], limits: StepLimits,
                 device: torch.device) -> None:
        super().__init__(kernel_cls, specs, limits, device)
        self._cu_seqlens_k = torch.zeros(limits.max_num_requests + 1, dtype=torch.int32, device=device)

    def build(self, step: StepTensors) -> FlashAttentionMetadata:
        num = len(step.query_lens)
        cu = self._cu_seqlens_k[: num + 1]
        torch.cumsum(step.seq_lens, 0, dtype=torch.int32, out=cu[1:])
        base = step.attention_metadata()
        if step.padded:
            max_q, max_k = 1, self.limits.max_blocks_per_request * self.limits.block_size
        else:
            max_q, max_k = base.max_query_len, base.max_seq_len
        return FlashAttentionMetadata(base.slot_mapping, base.query_start_loc, base.seq_lens, base.block_tables,
                                      base.query_lens, base.context_lens, base.block_size, cu, max_q, max_k)


class FlashAttentionPaged(AttentionBackend):
    """KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_size] (K then V),
    the layout of TorchPagedAttention; each half is the paged `k`/`v` that flash-attn's
    block_table indexes."""

    name = "flash_attn"
    block_size_multiple = PAGE_MULTIPLE  # "Paged KV cache block size must be divisible by 256"
    supports_soft_cap = True  # from flash-attn 2.6.0 (checked in install_reasons)
    supports_graph_capture = True
    metadata_builder_cls = FlashAttentionMetadataBuilder

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        # sliding_window W: a query sees itself and the W - 1 keys before it
        self._window = (spec.sliding_window - 1, 0) if spec.sliding_window else (-1, -1)
        self._extra = {"softcap": spec.logits_soft_cap} if spec.logits_soft_cap is not None else {}

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        """Every reason at once (capabilities, install, spec, device), so one message says all
        that must change."""
        return super().check(spec) + install_reasons(spec) + spec_reasons(spec) + _device_reasons()

    @staticmethod
    def varlen_func() -> Callable[..., torch.Tensor]:
        """The vendor's flash_attn_varlen_func (ROCm's kernels subclass with their own)."""
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: FlashAttentionMetadata,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        out = self.varlen_func()(
            q,
            key_cache,
            value_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=meta.cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_seqlen_k,
            softmax_scale=self.spec.scale,
            causal=True,
            window_size=self._window,
            block_table=meta.block_tables,
            **self._extra,
        )
        return out.reshape(q.shape[0], -1)

