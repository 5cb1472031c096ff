"""Falcon, both decoder architectures.

Old (Falcon-7B, Falcon-RW): one LayerNorm; attention and MLP in parallel on it (`parallel_attn`)
or sequential with a second LayerNorm; `query_key_value` is [q heads | k | v] with one KV head
(`multi_query`) or per head [q | k | v]. Falcon-RW uses ALiBi (`alibi`) instead of rotary;
Falcon adds ALiBi before the 1/sqrt(d) scaling, so the spec's slopes carry that factor.
New (Falcon-40B/180B, `new_decoder_architecture`): `num_kv_heads` KV groups, each stored as
[its q heads | k | v]; two LayerNorms (ln_attn, ln_mlp) unless `num_ln_in_parallel_attn` is 1.
Every variant: x + attn + mlp (parallel) or the sequential residuals; gelu MLP; biases with `bias`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.activation import activation
from textgen.core.layers.attention import Attention
from textgen.core.layers.embedding import VocabEmbedding
from textgen.core.layers.linear import ColumnLinear, RowLinear
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
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_size, self.num_heads = hidden // heads, heads
        self.new_arch = bool(cfg.new_decoder_architecture)
        self.num_kv_heads = cfg.num_kv_heads if (self.new_arch or not cfg.multi_query) else 1
        out = (2 * self.num_kv_heads + heads) * self.head_size if self.new_arch or cfg.multi_query else 3 * hidden
        self.query_key_value = ColumnLinear(hidden, out, cfg.bias, build.dtype, build.quantizer)
        self.dense = RowLinear(hidden, hidden, cfg.bias, build.dtype, build.quantizer)
        scale = self.head_size ** -0.5
        slopes = tuple(s * scale for s in alibi_slopes(heads)) if cfg.alibi else None
        spec = AttentionSpec(heads, self.num_kv_heads, self.head_size, build.dtype, scale=scale, alibi_slopes=slopes)
        self.attn = Attention(spec, layer_idx)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection -> flat q [T, H*D], k and v [T, Hkv*D]."""
        tokens, d = qkv.shape[0], self.head_size
        if self.new_arch or self.num_kv_heads == 1:  # per KV group: [q heads of the group | k | v]
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
        self.dense_h_to_4h = ColumnLinear(cfg.hidden_size, cfg.ffn_hidden_size, cfg.bias, build.dtype, build.quantizer)
        self.dense_4h_to_h = RowLinear(cfg.ffn_hidden_size, cfg.hidden_size, cfg.bias, build.dtype, build.quantizer)
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
        self.word_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype)
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

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        if build.tp_size != 1:
            raise ValueError("Falcon runs on one device only (its grouped query_key_value is not sharded yet)")
        super().__init__(hf_config, build)
