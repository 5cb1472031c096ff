"""BLOOM: ALiBi instead of rotary (one slope per head, in each layer's AttentionSpec: the kernel
adds slope * key position to the scores), a LayerNorm on the embeddings, per-head fused
query_key_value ([q | k | v] per head), LayerNorm blocks whose residual is the normed input with
`apply_residual_connection_post_layernorm`, Megatron's tanh gelu, tied embeddings."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.attention import AttentionSpec
from textgen.core.layers.attention import Attention
from textgen.core.layers.embedding import VocabEmbedding
from textgen.core.layers.linear import ColumnLinear, RowLinear
from textgen.core.layers.norm import LayerNorm
from textgen.core.models.causal_lm import CausalLM

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi's head slopes, computed in float32 exactly as transformers' BLOOM does."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return tuple(slopes.tolist())


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        hidden, heads, tp = cfg.hidden_size, cfg.n_head, build.tp_size
        self.head_size, self.local_heads = hidden // heads, heads // tp
        self.query_key_value = ColumnLinear(hidden, 3 * hidden, True, build.dtype, build.quantizer, build.tp_rank, tp)
        self.dense = RowLinear(hidden, hidden, True, build.dtype, build.quantizer, build.tp_rank, tp)
        slopes = alibi_slopes(heads)[build.tp_rank * self.local_heads: (build.tp_rank + 1) * self.local_heads]
        spec = AttentionSpec(self.local_heads, self.local_heads, self.head_size, build.dtype,
                             scale=self.head_size ** -0.5, alibi_slopes=slopes)
        self.attn = Attention(spec, layer_idx)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.query_key_value(hidden).view(hidden.shape[0], -1, 3, self.head_size)
        q, k, v = (qkv[:, :, i].reshape(hidden.shape[0], -1) for i in range(3))
        return self.dense(self.attn(q, k, v, ctx))


class BloomMLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        hidden, q, rank, tp = cfg.hidden_size, build.quantizer, build.tp_rank, build.tp_size
        self.dense_h_to_4h = ColumnLinear(hidden, 4 * hidden, True, build.dtype, q, rank, tp)
        self.dense_4h_to_h = RowLinear(4 * hidden, hidden, True, build.dtype, q, rank, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.post_ln_residual = bool(cfg.apply_residual_connection_post_layernorm)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps, build.dtype)
        self.self_attention = BloomAttention(cfg, layer_idx, build)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps, build.dtype)
        self.mlp = BloomMLP(cfg, build)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = (normed if self.post_ln_residual else hidden) + self.self_attention(normed, ctx)
        normed = self.post_attention_layernorm(hidden)
        return (normed if self.post_ln_residual else hidden) + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.word_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype, build.tp_rank, build.tp_size)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)
        self.h = nn.ModuleList(BloomBlock(cfg, i, build) for i in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            hidden = block(hidden, ctx)
        return self.ln_f(hidden)


class BloomForCausalLM(CausalLM):
    trunk_cls = BloomModel
    bare_names = True  # bigscience's own files name tensors without the "transformer." prefix
