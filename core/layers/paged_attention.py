"""TorchPagedAttention: the portable paged attention kernel, plain vectorised torch.

KV cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_size];
index 0 holds keys, 1 values; flat slot s = block_id * block_size + offset lives at
cache[:, s // block_size, s % block_size].

How a step is computed (no Python loop over tokens):
1. the new k/v are written at `meta.slot_mapping` through a flat view of the cache;
2. requests are split into padded groups, decode (one query token) and prefill (several), each
   kind cut into buckets of similar context length (`_split_rows`), so that padding stays small; each
   group's index tensors and boolean mask depend on the step only, so the metadata builder
   (`TorchPagedMetadataBuilder`) makes them once per step and window (`_GroupPlan`) for all layers;
3. each group gathers its context K/V through the block tables into [B, S, Hkv, D], pads its
   queries into [B, Q, H, D] and calls `F.scaled_dot_product_attention` (or the manual path when
   `logits_soft_cap` is set);
4. outputs are scattered back to the original token order (a step of decodes only needs no
   padding and no scatter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from textgen.core.attention import AttentionBackend, AttentionMetadataBuilder, AttentionSpec
from textgen.core.forward_context import AttentionMetadata, StepTensors

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True, slots=True)
class _GroupPlan:
    """One padded batch of requests and every index tensor its attention needs, built once per
    step (the first layer) and shared by all layers.

    `token_idx` [B, Q] picks each padded query slot's token from q (padding repeats a real row);
    `out_idx` [B * Q] says where each slot's output goes (padding goes to the discard row T). Both
    are None when the group is the whole step and every request decodes one token: then query slot
    b is token b, and the output needs no scatter."""

    token_idx: torch.Tensor | None
    out_idx: torch.Tensor | None
    mask: torch.Tensor  # [B, 1, Q, S] bool: which context positions each query slot sees
    blocks: torch.Tensor  # [B * num_blocks] long: the context's block ids, flattened
    num_rows: int
    max_seq_len: int


@dataclass(slots=True)
class TorchPagedMetadata(AttentionMetadata):
    """The common metadata plus the step's group plans, per sliding window (None = full)."""

    plans: dict[int | None, list[_GroupPlan]] = field(default_factory=dict)
    fresh_prefill: bool = False  # one request, no cached prefix: causal SDPA over the new tokens


class TorchPagedMetadataBuilder(AttentionMetadataBuilder):
    """Plans each distinct window of the model once per step; layers only look them up."""

    def build(self, step: StepTensors) -> TorchPagedMetadata:
        base = step.attention_metadata()
        fresh = base.num_requests == 1 and base.query_lens[0] == base.context_lens[0]
        meta = TorchPagedMetadata(*(getattr(base, f) for f in AttentionMetadata.__dataclass_fields__),
                                  fresh_prefill=fresh)
        windows = {s.sliding_window for s in self.specs if not (fresh and _takes_fast_prefill(s))}
        num_tokens = int(step.input_ids.shape[0])
        groups = _split_rows(meta) if windows else []
        for window in windows:
            meta.plans[window] = [_plan_group(meta, rows, num_tokens, window, self.device) for rows in groups]
        return meta


def _takes_fast_prefill(spec: AttentionSpec) -> bool:
    return spec.sliding_window is None and spec.logits_soft_cap is None and spec.alibi_slopes is None


class TorchPagedAttention(AttentionBackend):
    name: ClassVar[str] = "torch_paged"
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = FP8_DTYPES
    supports_soft_cap: ClassVar[bool] = True
    supports_alibi: ClassVar[bool] = True
    metadata_builder_cls = TorchPagedMetadataBuilder

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self._slopes = None if spec.alibi_slopes is None else torch.tensor(spec.alibi_slopes, dtype=torch.float32)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                       dtype: torch.dtype) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def check(cls, spec: AttentionSpec) -> list[str]:
        reasons = super().check(spec)
        if spec.sliding_window is not None and spec.sliding_window < 1:
            reasons.append(f"sliding_window must be >= 1, got {spec.sliding_window}")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: TorchPagedMetadata) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_size = q.shape
        if meta.fresh_prefill and _takes_fast_prefill(self.spec):
            if kv_cache.dtype != k.dtype:  # attend to what the cache holds, as a later step will
                k, v = k.to(kv_cache.dtype).to(q.dtype), v.to(kv_cache.dtype).to(q.dtype)
            out = self._causal_prefill(q, k, v)
            return out.reshape(num_tokens, num_heads * head_size)
        plans = meta.plans[self.spec.sliding_window]
        if plans[0].token_idx is None:  # every request decodes one token
            out = self._attend(q[:, None], kv_cache, plans[0], meta.block_size)
            return out.reshape(num_tokens, num_heads * head_size)
        # one extra row absorbs the writes of padded query slots
        out = q.new_empty(num_tokens + 1, num_heads, head_size)
        for plan in plans:
            result = self._attend(q[plan.token_idx], kv_cache, plan, meta.block_size)
            out.index_put_((plan.out_idx,), result.reshape(-1, num_heads, head_size))
        return out[:num_tokens].reshape(num_tokens, num_heads * head_size)

    def _causal_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One request, no cached prefix: the new k/v are its whole context.

        Inputs go in as 4-D [1, H, T, D]: torch's CPU flash kernel takes only 4-D tensors, and a
        3-D call falls back to the math path, which materialises the [H, T, T] scores (10x slower
        at 2,000 tokens)."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=self.spec.scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)

    def _attend(self, padded_q: torch.Tensor, kv_cache: torch.Tensor, plan: _GroupPlan,
                block_size: int) -> torch.Tensor:
        """padded_q [B, Q, H, D] -> attention output [B, Q, H, D] over the group's paged context."""
        keys, values = gather_context(kv_cache, plan, block_size)
        if keys.dtype != padded_q.dtype:  # an fp8 cache: compute in the model dtype
            keys, values = keys.to(padded_q.dtype), values.to(padded_q.dtype)
        batch, q_len, heads, head_size = padded_q.shape
        kv_heads = keys.shape[2]
        manual = self.spec.logits_soft_cap is not None or self._slopes is not None
        if q_len == 1 and kv_heads != heads and not manual:
            # decode with GQA: the query heads sharing a KV head become that head's query rows, so
            # each K/V row is read once per KV head instead of once per query head (-13% at batch 64)
            folded = padded_q.view(batch, kv_heads, heads // kv_heads, head_size)
            out = F.scaled_dot_product_attention(folded, keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=plan.mask, scale=self.spec.scale)
            return out.reshape(batch, 1, heads, head_size)
        result = self._sdpa(padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), plan.mask)
        return result.transpose(1, 2)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, Q, D], k/v [B, Hkv, S, D], mask [B, 1, Q, S] -> [B, H, Q, D]."""
        if self.spec.logits_soft_cap is None and self._slopes is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.spec.scale, enable_gqa=q.shape[1] != k.shape[1])
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.spec.scale
        cap = self.spec.logits_soft_cap
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        if self._slopes is not None:
            # ALiBi: slope_h * key position (a per-row constant shift of slope_h * (k - q) that
            # softmax ignores), as Hugging Face's BLOOM adds it
            kv_pos = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32)
            scores = scores + self._slopes.to(scores.device)[None, :, None, None] * kv_pos
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values at their flat slots (an fp8 cache is cast on the way in)."""
    flat = _indexable(kv_cache).view(2, -1, *kv_cache.shape[3:])
    slots = slot_mapping.to(torch.long)
    flat[0].index_copy_(0, slots, _indexable(k.to(kv_cache.dtype)))
    flat[1].index_copy_(0, slots, _indexable(v.to(kv_cache.dtype)))


def _indexable(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes: CPU index_copy_/index_select have no fp8 kernels (same bits)."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def gather_context(kv_cache: torch.Tensor, plan: _GroupPlan, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the group's first `max_seq_len` context positions: 2 x [B, S, Hkv, D].

    `index_select` over the flattened block ids (not advanced indexing, which is about 4x slower
    on CPU for this copy: it is a fifth of a batch-64 decode step)."""
    shape = (plan.num_rows, plan.blocks.shape[0] // plan.num_rows * block_size, *kv_cache.shape[3:])
    cache = _indexable(kv_cache)
    keys = cache[0].index_select(0, plan.blocks).view(shape).view(kv_cache.dtype)
    values = cache[1].index_select(0, plan.blocks).view(shape).view(kv_cache.dtype)
    return keys[:, : plan.max_seq_len], values[:, : plan.max_seq_len]


# A bucket ends before a row whose context is shorter than (1 - PAD_SLACK) of the bucket's longest
# when cutting there saves more than MIN_PAD_WASTE padded context positions: copying and attending
# 1,024 positions in every layer costs more than the extra group's ~15 small ops per layer.
MIN_PAD_WASTE = 1024
PAD_SLACK = 0.25
MAX_GROUPS_PER_KIND = 4


def _split_rows(meta: AttentionMetadata) -> list[list[int] | None]:
    """Decode requests (one query token) and the rest, each kind cut into buckets of similar
    context length, so that a group is padded only to its own maxima: a long prefill chunk never
    pads hundreds of decode rows, and one 1,000-token context never pads 63 short ones (at batch
    64 that halved the attention of a decode step). None: every request, in order, one group."""
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    prefill = [i for i, n in enumerate(meta.query_lens) if n != 1]
    groups = [g for rows in (decode, prefill) if rows for g in _length_buckets(rows, meta.context_lens)]
    if len(groups) == 1 and len(groups[0]) == meta.num_requests:
        return [None]
    return groups


def _length_buckets(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """Cut `rows`, longest context first, into at most MAX_GROUPS_PER_KIND buckets (see
    MIN_PAD_WASTE). One bucket keeps the step's order (a decode-only step then needs no scatter)."""
    order = sorted(rows, key=lambda i: lengths[i], reverse=True)
    buckets: list[list[int]] = []
    longest = 0
    for j, i in enumerate(order):
        n = lengths[i]
        saved = (len(order) - j) * (longest - n)  # padding avoided if the rest start a new bucket
        if not buckets or (len(buckets) < MAX_GROUPS_PER_KIND and n < (1 - PAD_SLACK) * longest
                           and saved > MIN_PAD_WASTE):
            buckets.append([])
            longest = n
        buckets[-1].append(i)
    return [rows] if len(buckets) == 1 else buckets


def _plan_group(meta: AttentionMetadata, rows: list[int] | None, num_tokens: int, window: int | None,
                device: torch.device) -> _GroupPlan:
    query_lens_host = meta.query_lens if rows is None else [meta.query_lens[i] for i in rows]
    seq_lens_host = meta.context_lens if rows is None else [meta.context_lens[i] for i in rows]
    max_query_len, max_seq_len = max(query_lens_host), max(seq_lens_host)
    index = None if rows is None else torch.tensor(rows, device=device)
    starts, query_lens, seq_lens, tables = _group_tensors(meta, index)
    offsets = torch.arange(max_query_len, device=device)
    valid = offsets[None, :] < query_lens[:, None]  # [B, Q]
    q_pos = (seq_lens - query_lens)[:, None] + offsets[None, :]
    mask = _mask(q_pos, valid, max_seq_len, window)[:, None]
    num_blocks = min(-(-max_seq_len // meta.block_size), tables.shape[1])
    blocks = tables[:, :num_blocks].reshape(-1).to(torch.long)
    token_idx = out_idx = None
    if rows is not None or max_query_len > 1:
        slot_token = torch.where(valid, starts[:, None] + offsets[None, :], num_tokens)  # [B, Q]
        token_idx, out_idx = slot_token.clamp(max=num_tokens - 1), slot_token.reshape(-1)
    return _GroupPlan(token_idx, out_idx, mask, blocks, len(query_lens_host), max_seq_len)


def _mask(q_pos: torch.Tensor, valid: torch.Tensor, max_seq_len: int, window: int | None) -> torch.Tensor:
    """[B, Q, S]: a query at context position p sees keys at positions (p - window, p]; padded
    query slots see only position 0 so that no softmax row is empty (their output is discarded)."""
    kv_pos = torch.arange(max_seq_len, device=q_pos.device)
    mask = kv_pos[None, None, :] <= q_pos[..., None]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[..., None] - window
    return torch.where(valid[..., None], mask, kv_pos == 0)


def _group_tensors(meta: AttentionMetadata, rows: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query starts, query lengths, seq lengths, block tables) of the group's requests."""
    qsl = meta.query_start_loc.to(torch.long)
    starts, ends = qsl[:-1], qsl[1:]
    seq_lens, tables = meta.seq_lens.to(torch.long), meta.block_tables
    if rows is not None:
        starts, ends, seq_lens, tables = starts[rows], ends[rows], seq_lens[rows], tables[rows]
    return starts, ends - starts, seq_lens, tables
