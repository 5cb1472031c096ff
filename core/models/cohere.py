"""Cohere (Command R): one LayerNorm without bias (mean-subtracted, in float32) feeding attention
and MLP in parallel (x + attn(ln(x)) + mlp(ln(x))), rotary on interleaved pairs (GPT-J style),
optional per-head q/k LayerNorms with one weight row per head (`use_qk_norm`), tied embeddings,
and logits * `logit_scale`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.norm import LayerNorm, PerHeadLayerNorm
from textgen.core.layers.rotary import get_rope
from textgen.core.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel, head_size_of

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class CohereLayerNorm(LayerNorm):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__(hidden_size, eps, dtype, bias=False)


class CohereAttention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.q_norm = self.k_norm = None
        if getattr(cfg, "use_qk_norm", False):
            spec = self.attn.spec
            self.q_norm = PerHeadLayerNorm(spec.num_heads, self.head_size, cfg.layer_norm_eps, build.dtype,
                                            build.tp_rank * spec.num_heads)
            self.k_norm = PerHeadLayerNorm(spec.num_kv_heads, self.head_size, cfg.layer_norm_eps, build.dtype,
                                            build.tp_rank // self.qkv_proj.kv_replicas * spec.num_kv_heads)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class CohereDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = CohereAttention(cfg, layer_idx, build, sliding_window)
        self.mlp = LlamaMLP(cfg, build)
        self.input_layernorm = CohereLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, None]:
        normed = self.input_layernorm(hidden)
        return hidden + self.self_attn(normed, cos_sin, rotary, ctx) + self.mlp(normed), None


class CohereModel(LlamaModel):
    layer_cls = CohereDecoderLayer
    norm_cls = CohereLayerNorm

    def __init__(self, cfg: Any, build: ModelBuildContext, windows: list[int | None]) -> None:
        super().__init__(cfg, build, windows)
        self.rotary_emb = get_rope(cfg, head_size_of(cfg), interleaved=True)


class CohereForCausalLM(LlamaForCausalLM):
    model_cls = CohereModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) * self.config.logit_scale
