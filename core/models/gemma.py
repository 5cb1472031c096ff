"""Gemma, Gemma 2 and Gemma 3 (text).

Gemma: Llama with RMSNorms that scale by (1 + weight) in float32, embeddings scaled by
sqrt(hidden_size) (rounded to the model dtype, as transformers does), a gelu-tanh gated MLP and
tied embeddings.

Gemma 2 adds: a norm after attention and around the MLP (four per layer), attention scale
`query_pre_attn_scalar ** -0.5`, attention logit soft-capping (in each layer's AttentionSpec),
sliding windows on the layers `layer_types` marks (alternating, by default), and soft-capped final
logits: cap * tanh(logits / cap).

Gemma 3 adds per-head q/k norms and rotates local (sliding) and global layers with their own rope
parameters (`rope_parameters[layer_type]`); soft-capping is off by default.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.norm import GemmaRMSNorm
from textgen.core.layers.rotary import get_rope
from textgen.core.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel,
                                       head_size_of, typed_sliding_windows)
from textgen.core.models.qwen3 import per_head

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class GemmaDecoderLayer(LlamaDecoderLayer):
    norm_cls = GemmaRMSNorm


class GemmaModel(LlamaModel):
    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: Any, build: ModelBuildContext, windows: list[int | None]) -> None:
        super().__init__(cfg, build, windows)
        self.embed_scale = cfg.hidden_size ** 0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    model_cls = GemmaModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers


class Gemma2Attention(LlamaAttention):
    def spec_scale(self, cfg: Any, head_size: int) -> float:
        return cfg.query_pre_attn_scalar ** -0.5

    def spec_soft_cap(self, cfg: Any) -> float | None:
        return getattr(cfg, "attn_logit_softcapping", None)


class Gemma2MLP(LlamaMLP):
    activation_key = "hidden_activation"


class Gemma2DecoderLayer(nn.Module):
    """Sandwich norms: x + post_attn(attn(in(x))), then + post_ff(mlp(pre_ff(.))); the residual
    adds are deferred into the next norm as in Llama."""

    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Gemma2Attention(cfg, layer_idx, build, sliding_window)
        self.mlp = Gemma2MLP(cfg, build)
        size, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps, build.dtype)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, build.dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, build.dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos_sin, rotary, ctx))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(GemmaModel):
    layer_cls = Gemma2DecoderLayer


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return typed_sliding_windows(cfg)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Attention(Gemma2Attention):
    """Gemma 2's attention with Gemma RMSNorms over each head of q and k before rotary."""

    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.q_norm = GemmaRMSNorm(self.head_size, cfg.rms_norm_eps, build.dtype)
        self.k_norm = GemmaRMSNorm(self.head_size, cfg.rms_norm_eps, build.dtype)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        return per_head(self.q_norm, q, self.head_size), per_head(self.k_norm, k, self.head_size), v


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.self_attn = Gemma3Attention(cfg, layer_idx, build, sliding_window)
        self.layer_type = cfg.layer_types[layer_idx]


class Gemma3Model(GemmaModel):
    """Local (sliding) and global layers each rotate with their own rope parameters
    (`rope_parameters[layer_type]`: a lower base for the local ones, scaling for the global)."""

    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg: Any, build: ModelBuildContext, windows: list[int | None]) -> None:
        super().__init__(cfg, build, windows)
        del self.rotary_emb
        head_size = head_size_of(cfg)
        self.rotary = nn.ModuleDict({
            kind: get_rope(SimpleNamespace(rope_parameters=cfg.rope_parameters[kind],
                                           max_position_embeddings=cfg.max_position_embeddings), head_size)
            for kind in sorted(set(cfg.layer_types))})

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed(input_ids)
        cos_sin = {kind: rotary.cos_sin(positions, hidden.dtype) for kind, rotary in self.rotary.items()}
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos_sin[layer.layer_type], self.rotary[layer.layer_type], ctx)
        return self.norm(hidden, residual)[0]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model (`Gemma3ForCausalLM`, model_type gemma3_text)."""

    model_cls = Gemma3Model
