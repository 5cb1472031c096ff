"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorms with bias, one `query_key_value` projection whose
output is laid out per head as [q | k | v] (so it is split after a per-head view), partial rotary
(`partial_rotary_factor`, from v4's `rotary_pct`), a gelu MLP with bias, and the parallel residual
x + attn(ln1(x)) + mlp(ln2(x)) (or the sequential one with `use_parallel_residual=False`)."""
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
from textgen.core.models.causal_lm import CausalLM
from textgen.core.models.weights import ROTARY_BUFFERS

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        hidden, tp = cfg.hidden_size, build.tp_size
        self.head_size = hidden // cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // tp
        bias = bool(getattr(cfg, "attention_bias", True))
        self.query_key_value = ColumnLinear(hidden, 3 * hidden, bias, build.dtype, build.quantizer, build.tp_rank, tp)
        self.dense = RowLinear(hidden, hidden, bias, build.dtype, build.quantizer, build.tp_rank, tp)
        spec = AttentionSpec(self.local_heads, self.local_heads, self.head_size, build.dtype,
                             scale=self.head_size ** -0.5)
        self.attn = Attention(spec, layer_idx)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding,
                ctx: ForwardContext) -> torch.Tensor:
        qkv = self.query_key_value(hidden).view(-1, self.local_heads, 3, self.head_size)
        q, k, v = (qkv[:, :, i].reshape(qkv.shape[0], -1) for i in range(3))
        q, k = rotary(q, k, *cos_sin)
        return self.dense(self.attn(q, k, v, ctx))


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnLinear(cfg.hidden_size, cfg.intermediate_size, True, build.dtype,
                                          build.quantizer, build.tp_rank, build.tp_size)
        self.dense_4h_to_h = RowLinear(cfg.intermediate_size, cfg.hidden_size, True, build.dtype,
                                       build.quantizer, build.tp_rank, build.tp_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        self.parallel = bool(cfg.use_parallel_residual)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)
        self.attention = GPTNeoXAttention(cfg, layer_idx, build)
        self.mlp = GPTNeoXMLP(cfg, build)

    def forward(self, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding,
                ctx: ForwardContext) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(hidden), cos_sin, rotary, ctx)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        attn = attn + hidden
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.embed_in = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype, build.tp_rank, build.tp_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, i, build) for i in range(cfg.num_hidden_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)
        self.rotary_emb = get_rope(cfg, cfg.hidden_size // cfg.num_attention_heads)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        cos_sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos_sin, self.rotary_emb, ctx)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(CausalLM):
    trunk_cls = GPTNeoXModel
    trunk_name, head_name, embedding_name, tied_default = "gpt_neox", "embed_out", "embed_in", False
    # old checkpoints carry the causal-mask buffers attention.bias / attention.masked_bias
    ignored_suffixes = (*ROTARY_BUFFERS, ".attention.bias", ".attention.masked_bias")
