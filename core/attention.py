"""The AttentionBackend interface: paged attention over mixed prefill chunks and decode tokens.

Who calls what, in order (the engine, `textgen.core.engine`):
1. The model is built; each attention layer states its facts in an `AttentionSpec` (heads, head
   size, window, soft-cap, ALiBi). Block size and KV dtype are left unset.
2. Negotiation (`textgen.core.attention_selection`): for each offered kernel, highest priority
   first, the specs are completed with a block size (the user's, else the kernel's first
   `block_sizes` entry, else `DEFAULT_BLOCK_SIZE`) and the KV dtype, and `check` is asked for
   reasons. The first kernel without reasons serves every layer; the others are printed with
   their reasons.
3. The runner allocates each layer's cache in `kv_cache_shape(..., dtype)` and builds one
   `metadata_builder_cls` instance with the step limits (largest token count, request count and
   blocks per request): it may allocate persistent buffers then.
4. Every step the runner fills the common step tensors (`StepTensors`) and calls the builder's
   `build` once; the metadata it returns is handed to every layer's `forward`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from textgen.core.forward_context import AttentionMetadata, StepTensors

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What one attention layer needs from a kernel.

    The model fills the layer's own facts; `block_size` (0 until negotiated) and `kv_cache_dtype`
    (None: the compute dtype) are filled by the engine through `for_cache`. `alibi_slopes` holds
    one slope per (local) query head when the layer uses ALiBi instead of rotary positions."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    scale: float
    sliding_window: int | None = None  # attend to at most this many most recent keys
    logits_soft_cap: float | None = None
    alibi_slopes: tuple[float, ...] | None = None
    block_size: int = 0
    kv_cache_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype K and V are stored in (fp8 caches compute in `dtype`)."""
        return self.kv_cache_dtype if self.kv_cache_dtype is not None else self.dtype

    def for_cache(self, block_size: int, kv_cache_dtype: torch.dtype | None) -> AttentionSpec:
        return replace(self, block_size=block_size, kv_cache_dtype=kv_cache_dtype)


@dataclass(frozen=True, slots=True)
class StepLimits:
    """The largest step the engine will run, known at startup: builders size persistent buffers
    from it and may rely on every step fitting."""

    max_num_tokens: int
    max_num_requests: int
    max_blocks_per_request: int
    block_size: int


class AttentionMetadataBuilder:
    """Builds a kernel's per-step metadata once per step (not once per layer).

    The default returns the common `AttentionMetadata` unchanged. A kernel that needs more (index
    plans, cumulative key lengths, a scheduler's work split) subclasses it, allocates what it can
    at `__init__` from `limits` and derives the rest from the step's tensors in `build`.
    `specs` are the model's completed layer specs, so a builder can prepare per-window data."""

    def __init__(self, kernel_cls: type[AttentionBackend], specs: list[AttentionSpec], limits: StepLimits,
                 device: torch.device) -> None:
        self.kernel_cls, self.specs, self.limits, self.device = kernel_cls, specs, limits, device

    def build(self, step: StepTensors) -> AttentionMetadata:
        return step.attention_metadata()


class AttentionBackend(ABC):
    """One attention kernel family. Each attention layer gets one instance, built from its spec.

    Declared capabilities, checked by the base `check` (so a model that needs one a kernel lacks
    skips that kernel with a reason):
    - `block_sizes`: block sizes the kernel accepts, preferred first; empty = any.
    - `block_size_multiple`: when set, any multiple of it is accepted (flash-attn: 256).
    - `kv_cache_dtypes`: storage dtypes besides the compute dtype (e.g. torch.float8_e4m3fn).
    - `supports_sliding_window`, `supports_soft_cap`, `supports_alibi`.
    - `supports_graph_capture`: `forward` may be captured in a device graph (CUDA/HIP graphs): on
      a padded step (`StepTensors.padded`) its metadata reads only the step buffers and its own
      persistent buffers, and it makes no host decision from per-step values.
    Contract of `forward(q, k, v, kv_cache, meta)`: first write the new k/v at `meta.slot_mapping`,
    then return the attention output [T, num_heads * head_size] for every query token, causal
    within each request's context (query token j of request i sees context positions
    <= seq_lens[i] - query_lens[i] + j), honouring the spec's window, soft-cap and ALiBi. A token's
    result must not depend on which other requests share the step. `meta` is what the kernel's
    `metadata_builder_cls` built for the step.
    """

    name: ClassVar[str]
    block_sizes: ClassVar[tuple[int, ...]] = ()
    block_size_multiple: ClassVar[int | None] = None
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    supports_sliding_window: ClassVar[bool] = True
    supports_soft_cap: ClassVar[bool] = False
    supports_alibi: ClassVar[bool] = False
    supports_graph_capture: ClassVar[bool] = False
    metadata_builder_cls: ClassVar[type[AttentionMetadataBuilder]] = AttentionMetadataBuilder

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @classmethod
    def preferred_block_size(cls) -> int:
        if cls.block_sizes:
            return cls.block_sizes[0]
        return cls.block_size_multiple or DEFAULT_BLOCK_SIZE

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (its layout is private to the kernel)."""

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        """Reasons this kernel cannot serve `spec` (empty = fine). Subclasses add their own
        reasons to `super().check(spec)`."""
        return _capability_reasons(cls, spec)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_size]
        k: torch.Tensor,  # [T, num_kv_heads, head_size]
        v: torch.Tensor,  # [T, num_kv_heads, head_size]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Write k/v into the cache, then attend; returns [T, num_heads * head_size]."""


def _capability_reasons(cls: type[AttentionBackend], spec: AttentionSpec) -> list[str]:
    reasons = []
    bs = spec.block_size
    if cls.block_size_multiple and bs % cls.block_size_multiple:
        reasons.append(f"block_size {bs} is not a multiple of {cls.block_size_multiple}")
    elif cls.block_sizes and not cls.block_size_multiple and bs not in cls.block_sizes:
        reasons.append(f"block_size {bs} is not one of {', '.join(map(str, cls.block_sizes))}")
    if spec.kv_cache_dtype not in (None, spec.dtype) and spec.kv_cache_dtype not in cls.kv_cache_dtypes:
        reasons.append(f"KV cache dtype {spec.kv_cache_dtype} is not supported")
    if spec.sliding_window is not None and not cls.supports_sliding_window:
        reasons.append("sliding-window attention is not supported")
    if spec.logits_soft_cap is not None and not cls.supports_soft_cap:
        reasons.append("logits soft-capping is not supported")
    if spec.alibi_slopes is not None and not cls.supports_alibi:
        reasons.append("ALiBi is not supported")
    if spec.num_heads % spec.num_kv_heads:
        reasons.append(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
    return reasons
