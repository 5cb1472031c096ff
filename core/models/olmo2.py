"""OLMo 2: Llama without pre-norms; instead an RMSNorm on each sub-layer's output before its
residual add (x + norm(attn(x)), then + norm(mlp(.))), and RMSNorms over the whole q and k
projections (all heads at once) before rotary. Its RMSNorm multiplies by the weight in float32
before casting back (Llama casts first)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.norm import RMSNorm
from textgen.core.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class Olmo2RMSNorm(RMSNorm):
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class Olmo2Attention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        if build.tp_size != 1:
            raise ValueError("OLMo 2's q/k norms span all heads: tensor parallelism is not implemented for them")
        self.q_norm = Olmo2RMSNorm(self.sizes[0], cfg.rms_norm_eps, build.dtype)
        self.k_norm = Olmo2RMSNorm(self.sizes[1], cfg.rms_norm_eps, build.dtype)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        return self.q_norm(q), self.k_norm(k), v


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(cfg, layer_idx, build, sliding_window)
        self.mlp = LlamaMLP(cfg, build)
        self.post_attention_layernorm = Olmo2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype)
        self.post_feedforward_layernorm = Olmo2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, None]:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(hidden, cos_sin, rotary, ctx))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden)), None


class Olmo2Model(LlamaModel):
    layer_cls = Olmo2DecoderLayer
    norm_cls = Olmo2RMSNorm


class Olmo2ForCausalLM(LlamaForCausalLM):
    model_cls = Olmo2Model

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers
