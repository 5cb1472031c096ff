"""GPT-2 and GPT-BigCode (StarCoder 1, SantaCoder): learned absolute positions (`wpe`), pre-norm
LayerNorm blocks, one fused `c_attn` projection, a c_fc -> act -> c_proj MLP, tied embeddings.

GPT-2 stores its projections as Conv1D ([in, out]): the loaders transpose them. Its c_attn is
[q | k | v]; attention is scaled by head_size ** -0.5 (`scale_attn_weights`) and by 1 / (layer + 1)
with `scale_attn_by_inverse_layer_idx`.
GPT-BigCode uses plain Linear layers; with `multi_query` c_attn is [q (all heads) | k | v] of one
shared KV head, else it is laid out per head as [q | k | v].

Tensor parallelism: a [q | k | v] c_attn is a `QKVLinear` (each rank loads its heads of q, k and
v; BigCode's one KV head is replicated, as GQA with fewer kv heads than ranks); a per-head c_attn
is a plain column layer, whose rank slice is whole heads. Conv1D weights are transposed lazily,
so a rank still reads only its slice."""
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
from textgen.core.models.causal_lm import CausalLM

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.models.base import ModelBuildContext


def _transposed(layer: nn.Module) -> None:
    """Conv1D checkpoints hold W as [in, out]: transpose before the layer's own loader."""
    load = layer.weight.weight_loader
    layer.weight.weight_loader = lambda param, loaded, shard_id=None: load(param, loaded.t(), shard_id)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        hidden, heads, rank, tp = cfg.hidden_size, cfg.num_attention_heads, build.tp_rank, build.tp_size
        self.head_size = hidden // heads
        self.bigcode = cfg.model_type == "gpt_bigcode"
        kv_heads = 1 if self.bigcode and cfg.multi_query else heads
        self.per_head = self.bigcode and not cfg.multi_query
        local_heads, local_kv = heads // tp, max(1, kv_heads // tp)
        self.sizes = [local_heads * self.head_size, local_kv * self.head_size, local_kv * self.head_size]
        if self.per_head:
            self.c_attn = ColumnLinear(hidden, 3 * hidden, True, build.dtype, build.quantizer, rank, tp)
        else:
            self.c_attn = QKVLinear(hidden, self.head_size, heads, kv_heads, True, build.dtype, build.quantizer,
                                    rank, tp)
        self.c_proj = RowLinear(hidden, hidden, True, build.dtype, build.quantizer, rank, tp)
        scale = self.head_size ** -0.5 if cfg.scale_attn_weights else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.attn = Attention(AttentionSpec(local_heads, local_kv, self.head_size, build.dtype, scale=scale), layer_idx)
        if not self.bigcode:
            _transposed(self.c_attn)
            _transposed(self.c_proj)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.c_attn(hidden)
        if self.per_head:
            qkv = qkv.view(qkv.shape[0], -1, 3, self.head_size)
            q, k, v = (qkv[:, :, i].reshape(qkv.shape[0], -1) for i in range(3))
        else:
            q, k, v = qkv.split(self.sizes, dim=-1)
        return self.c_proj(self.attn(q, k, v, ctx))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.hidden_size
        rank, tp = build.tp_rank, build.tp_size
        self.c_fc = ColumnLinear(cfg.hidden_size, inner, True, build.dtype, build.quantizer, rank, tp)
        self.c_proj = RowLinear(inner, cfg.hidden_size, True, build.dtype, build.quantizer, rank, tp)
        self.act = activation(cfg.activation_function)
        if cfg.model_type != "gpt_bigcode":
            _transposed(self.c_fc)
            _transposed(self.c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)
        self.attn = GPT2Attention(cfg, layer_idx, build)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)
        self.mlp = GPT2MLP(cfg, build)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.attn(self.ln_1(hidden), ctx) + hidden
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, build.dtype, build.tp_rank, build.tp_size)
        self.wpe = VocabEmbedding(cfg.max_position_embeddings, cfg.hidden_size, build.dtype)
        self.h = nn.ModuleList(GPT2Block(cfg, i, build) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, build.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden, ctx)
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    """GPT2LMHeadModel and GPTBigCodeForCausalLM."""

    trunk_cls = GPT2Model
    embedding_name = "wte"
    bare_names = True  # the original GPT-2 files name tensors without "transformer."
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")  # their causal-mask buffers

