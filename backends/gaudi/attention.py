"""Gaudi attention through vllm-hpu-extension (HabanaAI/vllm-hpu-extension), the kernels vLLM's
Gaudi plugin runs: `ops.flat_pa` for decode steps, `cache_ops.insert_or_update_cache` for the KV
writes. habana_frameworks and vllm_hpu_extension are imported inside functions only.

flat_pa works on a flat list of blocks instead of per-request block tables: `block_list` [N]
(block ids), `block_groups` [N] (the request each block belongs to; padding blocks name a
sentinel group, the batch size), `block_mapping` [N, B] (one-hot of the groups, the matrix its
batch<->block matmuls use), `block_bias` [N, block_size] (-inf past a block's used slots). Under
shape bucketing the list has a fixed length per decode bucket: every row's full block-table width
(N = B x W), the entries past a row's last block being padding blocks (the row's table entry, one
slot used, in the sentinel group, with a zero mapping row), so the shapes depend on the bucket
only. Prefill and mixed steps (flat_pa is a decode kernel) run the static kernel's math, which
shares the cache layout ([2, num_blocks, block_size, kv_heads, head_size]: flat_pa's key_cache and
value_cache are its two halves).

The extension's API changed across releases (block_scales and other arguments come and go): the
call passes flat_pa the keyword arguments its signature names, and the availability check names
an argument it needs but we do not supply.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from importlib.util import find_spec
from types import ModuleType
from typing import ClassVar

import torch

from textgen.core.attention import AttentionMetadataBuilder, AttentionSpec
from textgen.core.forward_context import AttentionMetadata, StepTensors
from textgen.core.layers.static_paged_attention import StaticPagedAttention

EXTENSION_URL = "git+https://github.com/HabanaAI/vllm-hpu-extension"
SUPPLIED = {"query", "key_cache", "value_cache", "block_list", "block_mapping", "block_bias", "block_groups",
            "block_scales", "scale", "matmul_qk_op", "matmul_av_op", "batch2block_matmul_op",
            "block2batch_matmul_op", "keys_fetch_func", "values_fetch_func"}


def extension_reasons() -> list[str]:
    """Why vllm-hpu-extension's kernels cannot run here (empty: they can)."""
    if find_spec("habana_frameworks") is None:
        return ["habana_frameworks is not installed (Intel Gaudi's PyTorch bridge, from Intel Gaudi's installer)"]
    if find_spec("vllm_hpu_extension") is None:
        return [f"vllm_hpu_extension is not installed (pip install {EXTENSION_URL})"]
    try:
        ops, cache_ops = extension()
    except ImportError as e:  # its ops import vllm (vllm.logger) and habana_frameworks' kernels
        return [f"vllm_hpu_extension.ops does not import: {e}"]
    return flat_pa_reasons(ops.flat_pa) + ([] if hasattr(cache_ops, "insert_or_update_cache") else
                                           ["vllm_hpu_extension.cache_ops has no insert_or_update_cache"])


def flat_pa_reasons(flat_pa: object) -> list[str]:
    """flat_pa arguments without a default that we do not supply (a release we do not know)."""
    params = inspect.signature(flat_pa).parameters.values()
    unknown = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in SUPPLIED
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [f"this vllm_hpu_extension's flat_pa needs arguments textgen does not pass: {', '.join(unknown)}"] \
        if unknown else []


def extension() -> tuple[ModuleType, ModuleType]:
    from vllm_hpu_extension import cache_ops, ops

    return ops, cache_ops


@dataclass(slots=True)
class FlatMetadata(AttentionMetadata):
    """The common metadata plus flat_pa's block list, on decode-only steps (None otherwise)."""

    block_list: torch.Tensor | None = None  # [N] long
    block_groups: torch.Tensor | None = None  # [N] long, B for padding blocks
    block_mapping: torch.Tensor | None = None  # [N, B] in the model dtype
    block_usage: torch.Tensor | None = None  # [N] long: slots used in each block (1 for padding)
    block_scales: torch.Tensor | None = None  # [N]: 1 / blocks of the block's request (older releases)


def flat_blocks(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_list, block_groups, block_usage, block_scales for rows of one query token each, from
    the step tensors alone (shapes [B * W], whatever the lengths)."""
    rows, width = block_tables.shape
    lens = seq_lens.to(torch.long)
    used = (lens + block_size - 1) // block_size  # [B]
    j = torch.arange(width, device=lens.device)
    valid = j[None, :] < used[:, None]  # [B, W]
    row_ids = torch.arange(rows, device=lens.device)[:, None].expand(rows, width)
    groups = torch.where(valid, row_ids, torch.full_like(row_ids, rows))
    usage = torch.where(valid, (lens[:, None] - j[None, :] * block_size).clamp(max=block_size), torch.ones_like(groups))
    per_block = 1.0 / used.clamp(min=1)[:, None].to(torch.float32)
    scales = torch.where(valid, per_block, torch.ones_like(usage, dtype=torch.float32))
    return block_tables.to(torch.long).reshape(-1), groups.reshape(-1), usage.reshape(-1), scales.reshape(-1)


class FlatMetadataBuilder(AttentionMetadataBuilder):
    def build(self, step: StepTensors) -> FlatMetadata:
        base = step.attention_metadata()
        meta = FlatMetadata(*(getattr(base, f) for f in AttentionMetadata.__dataclass_fields__))
        if any(n != 1 for n in step.query_lens):
            return meta
        block_list, groups, usage, scales = flat_blocks(step.block_tables, step.seq_lens, step.block_size)
        rows = step.block_tables.shape[0]
        meta.block_list, meta.block_groups, meta.block_usage, meta.block_scales = block_list, groups, usage, scales
        meta.block_mapping = (groups[:, None] == torch.arange(rows, device=groups.device)[None, :])
        return meta


class HPUFlatPagedAttention(StaticPagedAttention):
    """flat_pa on decode steps; the static kernel's math on prefill and mixed steps."""

    name: ClassVar[str] = "hpu_flat_pa"
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    supports_sliding_window: ClassVar[bool] = False  # flat_pa has no window argument
    supports_soft_cap: ClassVar[bool] = False
    metadata_builder_cls = FlatMetadataBuilder

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        return super().check(spec) + extension_reasons()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: FlatMetadata) -> torch.Tensor:
        if meta.block_list is None:
            return super().forward(q, k, v, kv_cache, meta)
        ops, cache_ops = extension()
        slots = meta.slot_mapping.to(torch.long)
        block_size = kv_cache.shape[2]
        for cache, new in ((kv_cache[0], k), (kv_cache[1], v)):
            cache_ops.insert_or_update_cache(new.to(cache.dtype), cache, slots // block_size, slots % block_size)
        out = ops.flat_pa(**flat_pa_kwargs(ops.flat_pa, q, kv_cache, meta, self.spec.scale))
        return out.reshape(q.shape[0], -1)


def flat_pa_kwargs(flat_pa: object, q: torch.Tensor, kv_cache: torch.Tensor, meta: FlatMetadata,
                   scale: float) -> dict[str, object]:
    """The arguments for this release's flat_pa (those its signature names)."""
    block_size = kv_cache.shape[2]
    bias = torch.zeros((meta.block_usage.shape[0], block_size), dtype=q.dtype, device=q.device)
    slot = torch.arange(block_size, device=q.device)
    bias.masked_fill_(slot[None, :] >= meta.block_usage[:, None], -math.inf)
    fetch = lambda cache, blocks: cache.index_select(0, blocks)  # noqa: E731  (the non-contiguous-PA fetch)
    everything = dict(
        query=q, key_cache=kv_cache[0], value_cache=kv_cache[1], block_list=meta.block_list,
        block_mapping=meta.block_mapping.to(q.dtype), block_bias=bias, block_groups=meta.block_groups,
        block_scales=meta.block_scales.to(q.dtype), scale=scale, matmul_qk_op=torch.matmul,
        matmul_av_op=torch.matmul, batch2block_matmul_op=torch.matmul, block2batch_matmul_op=torch.matmul,
        keys_fetch_func=fetch, values_fetch_func=fetch,
    )
    names = set(inspect.signature(flat_pa).parameters)
    return {name: value for name, value in everything.items() if name in names}
