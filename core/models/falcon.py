"""Falcon, both decoder architectures.

Old (Falcon-7B, Falcon-RW): one LayerNorm; attention and MLP in parallel on it (`parallel_attn`)
or sequential with a second LayerNorm; `query_key_value` is [q heads | k | v] with one KV head
(`multi_query`) or per head [q | k | v]. Falcon-RW uses ALiBi (`alibi`) instead of rotary;
Falcon adds ALiBi before the 1/sqrt(d) scaling, so the spec's slopes carry that factor.
New (Falcon-40B/180B, `new_decoder_architecture`): `num_kv_heads` KV groups, each stored as
[its q heads | k | v]; two LayerNorms (ln_attn, ln_mlp) unless `num_ln_in_parallel_attn` is 1.
Every variant: x + attn + mlp (parallel) or the sequential residuals; gelu MLP; biases with `bias`.

Tensor parallelism: multi-query's [q heads | k | v] is a `QKVLinear` (each rank its q heads, the
one KV head replicated); the per-head and per-group layouts are column layers whose rank slice is
whole heads or whole KV groups (the new architecture needs `num_kv_heads` divisible by the ranks);
ALiBi slopes are the rank's heads'."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.activation import activation
from textgen.core.layers.attention import Attention
from textgen.core.layers.embedding import VocabEmbedding
from textgen.core.layers.linear import ColumnLinear, QKVLinear, RowLinear
from textgen.core.layers.norm import LayerNorm
from textgen.core.layers.rotary import RotaryEmbedding, get_rope
from textgen.core.models.bloom import alibi_slopes
from textgen.core.models.causal_lm import CausalLM

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


class FalconAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        hidden, heads, rank, tp = cfg.hidden_size, cfg.num_attention_heads, build.tp_rank, build.tp_size
        self.new_arch = bool(cfg.new_decoder_architecture)
        kv_heads = cfg.num_kv_heads if self.new_arch else (1 if cfg.multi_query else heads)
        if heads % tp:
            raise ValueError(f"Falcon's {heads} attention heads cannot be split over {tp} shards: "
                             f"use a --num-shard that divides {heads}")
        if self.new_arch and kv_heads > 1 and kv_heads % tp:
            raise ValueError(f"Falcon's {kv_heads} query/key/value groups cannot be split over {tp} shards: "
                             f"use a --num-shard that divides {kv_heads}")
        self.head_size, self.num_heads, self.num_kv_heads = hidden // heads, heads // tp, max(1, kv_heads // tp)
        self.grouped = self.new_arch or kv_heads == 1  # [q heads | k | v] per KV group, else [q | k | v] per head
        if kv_heads == 1:  # one group: [q heads | k | v], as QKVLinear lays it out
            self.query_key_value = QKVLinear(hidden, self.head_size, heads, 1, cfg.bias, build.dtype,
                                             build.quantizer, rank, tp)
        else:
            out = (2 * kv_heads + heads) * self.head_size
            self.query_key_value = ColumnLinear(hidden, out, cfg.bias, build.dtype, build.quantizer, rank, tp)
        self.dense = RowLinear(hidden, hidden, cfg.bias, build.dtype, build.quantizer, rank, tp)
        scale = self.head_size ** -0.5
        slopes = None
        if cfg.alibi:
            slopes = tuple(s * scale for s in alibi_slopes(heads)[rank * self.num_heads: (rank + 1) * self.num_heads])
        spec = AttentionSpec(self.num_heads, self.num_kv_heads, self.head_size, build.dtype, scale=scale,
                             alibi_slopes=slopes)
        self.attn = Attention(spec, layer_idx)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's fused projection -> flat q [T, H*D], k and v [T, Hkv*D] (its own heads)."""
        tokens, d = qkv.shape[0], self.head_size
        if self.grouped:  # per KV group: [q heads of the group | k | v]
            groups = qkv.view(tokens, self.num_kv_heads, -1, d)
            q, k, v = groups[:, :, :-2], groups[:, :, -2], groups[:, :, -1]
        else:  # per head: [q | k | v]
            heads = qkv.view(tokens, self.num_heads, 3, d)
            q, k, v = heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]
        return q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
                rotary: RotaryEmbedding | None, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.split(self.query_key_value(hidden))
        if rotary is not None:
            q, k = rotary(q, k, *cos_sin)
        return self.dense(self.attn(q, k, v, ctx))


class FalconMLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        rank, tp = build.tp_rank, build.tp_size
        self.dense_h_to_4h = ColumnLinear(cfg.hidden_size, cfg.ffn_hidden_size, cfg.bias, build.dtype,
                                          build.quantizer, rank, tp)
        self.dense_4h_to_h = RowLinear(cfg.ffn_hidden_size, cfg.hidden_size, cfg.bias, build.dtype,
                                       build.quantizer, rank, tp)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        size, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.new_arch, self.parallel = bool(cfg.new_decoder_architecture), bool(cfg.parallel_attn)
        self.two_norms = self.new_arch and (cfg.num_ln_in_parallel_attn or 2) == 2
        self.self_attention = FalconAttention(cfg, layer_idx, build)
        self.mlp = FalconMLP(cfg, build)
        if self.two_norms:
            self.ln_attn = LayerNorm(size, eps, build.dtype)
            self.ln_mlp = LayerNorm(size, eps, build.dtype)
        else:
            self.input_layernorm = LayerNorm(size, eps, build.dtype)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(size, eps, build.dtype)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
                rotary: RotaryEmbedding | None, ctx: ForwardContext) -> torch.Tensor:
        residual = hidden
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self.self_attention(attn_in, cos_sin, rotary, ctx)
        if not self.new_arch and not self.parallel:
            residual = attn + residual
            mlp_in = self.post_attention_layernorm(residual)
        out = self.mlp(mlp_in)
        if self.new_arch or self.parallel:
            out = out + attn
        return out + residual


class FalconModel(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.word_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype, build.tp_rank,
                                              build.tp_size)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, i, build) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)
        self.rotary_emb = None if cfg.alibi else get_rope(cfg, cfg.hidden_size // cfg.num_attention_heads)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        cos_sin = None if self.rotary_emb is None else self.rotary_emb.cos_sin(positions, hidden.dtype)
        for layer in self.h:
            hidden = layer(hidden, cos_sin, self.rotary_emb, ctx)
        return self.ln_f(hidden)


class FalconForCausalLM(CausalLM):
    trunk_cls = FalconModel
