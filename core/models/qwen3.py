"""Qwen3: Llama with an RMSNorm over each head of q and k before rotary (q/k norm), an explicit
`head_dim`, and sliding windows on the layers `layer_types` marks (only with `use_sliding_window`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from textgen.core.layers.norm import RMSNorm
from textgen.core.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                       typed_sliding_windows)

if TYPE_CHECKING:
    from textgen.core.models.base import ModelBuildContext


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.q_norm = RMSNorm(self.head_size, cfg.rms_norm_eps, build.dtype)
        self.k_norm = RMSNorm(self.head_size, cfg.rms_norm_eps, build.dtype)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        return per_head(self.q_norm, q, self.head_size), per_head(self.k_norm, k, self.head_size), v


def per_head(norm: torch.nn.Module, x: torch.Tensor, head_size: int) -> torch.Tensor:
    """Apply `norm` over each head of a flat [T, H*D] tensor."""
    return norm(x.view(x.shape[0], -1, head_size)).view(x.shape)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        if not getattr(cfg, "use_sliding_window", False):
            return [None] * cfg.num_hidden_layers
        return typed_sliding_windows(cfg)
