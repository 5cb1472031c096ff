"""Granite (IBM Granite 3): Llama with its multipliers: embeddings * `embedding_multiplier`,
attention scale `attention_multiplier` (instead of head_size ** -0.5), each sub-layer's output *
`residual_multiplier` before its residual add, and logits / `logits_scaling`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from textgen.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class GraniteAttention(LlamaAttention):
    def spec_scale(self, cfg: Any, head_size: int) -> float:
        return float(cfg.attention_multiplier)


class GraniteDecoderLayer(LlamaDecoderLayer):
    attention_cls = GraniteAttention

    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.residual_multiplier = float(cfg.residual_multiplier)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos_sin, rotary, ctx) * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) * self.residual_multiplier, residual


class GraniteModel(LlamaModel):
    layer_cls = GraniteDecoderLayer

    def __init__(self, cfg: Any, build: ModelBuildContext, windows: list[int | None]) -> None:
        super().__init__(cfg, build, windows)
        self.embedding_multiplier = float(cfg.embedding_multiplier)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embedding_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    model_cls = GraniteModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.config.logits_scaling
