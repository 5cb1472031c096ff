"""TorchPagedAttention: the portable paged attention kernel, plain vectorised torch.

KV cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_size];
index 0 holds keys, 1 values; flat slot s = block_id * block_size + offset lives at
cache[:, s // block_size, s % block_size].

How a step is computed (no Python loop over tokens):
1. the new k/v are written at `meta.slot_mapping` through a flat view of the cache;
2. requests are split into at most two padded groups, decode (one query token) and prefill
   (several), so a long prefill chunk never pads hundreds of decode rows to its length;
3. each group gathers its context K/V through the block tables into [B, S, Hkv, D], pads its
   queries into [B, Q, H, D], builds a boolean mask from positions and calls
   `F.scaled_dot_product_attention` (or the manual path when `logits_soft_cap` is set);
4. outputs are scattered back to the original token order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from textgen.core.attention import AttentionBackend, AttentionSpec
from textgen.core.forward_context import AttentionMetadata


@dataclass(frozen=True, slots=True)
class _Group:
    """Requests attended in one padded batch. `rows` None means every request of the step."""

    rows: torch.Tensor | None  # [B] request indices into the step's metadata
    max_query_len: int
    max_seq_len: int


class TorchPagedAttention(AttentionBackend):
    name: ClassVar[str] = "torch_paged"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def check(cls, spec: AttentionSpec | None) -> list[str]:
        if spec is None:
            return []
        reasons = []
        if spec.num_heads % spec.num_kv_heads:
            reasons.append(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        if spec.sliding_window is not None and spec.sliding_window < 1:
            reasons.append(f"sliding_window must be >= 1, got {spec.sliding_window}")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_size = q.shape
        if _is_single_fresh_prefill(meta) and self.spec.sliding_window is None and self.spec.logits_soft_cap is None:
            out = self._causal_prefill(q, k, v)
            return out.reshape(num_tokens, num_heads * head_size)
        # one extra row absorbs the writes of padded query slots
        out = q.new_empty(num_tokens + 1, num_heads, head_size)
        for group in _split_groups(meta, q.device):
            self._attend_group(q, kv_cache, meta, group, out)
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

    def _attend_group(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      group: _Group, out: torch.Tensor) -> None:
        starts, query_lens, seq_lens, tables = _group_tensors(meta, group.rows)
        offsets = torch.arange(group.max_query_len, device=q.device)
        valid = offsets[None, :] < query_lens[:, None]  # [B, Q]
        token_idx = torch.where(valid, starts[:, None] + offsets[None, :], q.shape[0])  # [B, Q]
        padded_q = q[token_idx.clamp(max=q.shape[0] - 1)]  # [B, Q, H, D]
        keys, values = gather_context(kv_cache, tables, group.max_seq_len, meta.block_size)
        q_pos = (seq_lens - query_lens)[:, None] + offsets[None, :]
        mask = self._mask(q_pos, valid, group.max_seq_len)  # [B, Q, S]
        result = self._sdpa(padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask)
        out.index_put_((token_idx.reshape(-1),), result.transpose(1, 2).reshape(-1, *out.shape[1:]))

    def _mask(self, q_pos: torch.Tensor, valid: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """Query at context position p sees keys at positions (p - window, p]; padded query rows
        see only position 0 so that no softmax row is empty (their output is discarded)."""
        kv_pos = torch.arange(max_seq_len, device=q_pos.device)
        mask = kv_pos[None, None, :] <= q_pos[..., None]
        if self.spec.sliding_window is not None:
            mask &= kv_pos[None, None, :] > q_pos[..., None] - self.spec.sliding_window
        return torch.where(valid[..., None], mask, kv_pos == 0)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, Q, D], k/v [B, Hkv, S, D], mask [B, Q, S] -> [B, H, Q, D]."""
        if self.spec.logits_soft_cap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[:, None], scale=self.spec.scale, enable_gqa=q.shape[1] != k.shape[1])
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        cap = self.spec.logits_soft_cap
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.spec.scale
        scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values at their flat slots."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    slots = slot_mapping.to(torch.long)
    flat[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, v.to(kv_cache.dtype))


def gather_context(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first `max_seq_len` context positions: 2 x [B, S, Hkv, D].

    `index_select` over the flattened block ids (not advanced indexing, which is about 4x slower
    on CPU for this copy: it is a fifth of a batch-64 decode step)."""
    num_blocks = min(-(-max_seq_len // block_size), block_tables.shape[1])
    blocks = block_tables[:, :num_blocks].reshape(-1).to(torch.long)
    shape = (block_tables.shape[0], num_blocks * block_size, *kv_cache.shape[3:])
    keys = kv_cache[0].index_select(0, blocks).view(shape)
    values = kv_cache[1].index_select(0, blocks).view(shape)
    return keys[:, :max_seq_len], values[:, :max_seq_len]


def _is_single_fresh_prefill(meta: AttentionMetadata) -> bool:
    return meta.num_requests == 1 and meta.query_lens[0] == meta.context_lens[0]


def _split_groups(meta: AttentionMetadata, device: torch.device) -> list[_Group]:
    """Decode requests (one query token) and the rest, each padded only to its own maxima."""
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if len(decode) in (0, meta.num_requests):
        return [_Group(None, meta.max_query_len, meta.max_seq_len)]
    prefill = [i for i, n in enumerate(meta.query_lens) if n != 1]
    return [
        _Group(torch.tensor(rows, device=device), max(meta.query_lens[i] for i in rows),
               max(meta.context_lens[i] for i in rows))
        for rows in (decode, prefill)
    ]


def _group_tensors(meta: AttentionMetadata, rows: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query starts, query lengths, seq lengths, block tables) of the group's requests."""
    qsl = meta.query_start_loc.to(torch.long)
    starts, ends = qsl[:-1], qsl[1:]
    seq_lens, tables = meta.seq_lens.to(torch.long), meta.block_tables
    if rows is not None:
        starts, ends, seq_lens, tables = starts[rows], ends[rows], seq_lens[rows], tables[rows]
    return starts, ends - starts, seq_lens, tables
