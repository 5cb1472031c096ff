"""Phi (phi-1, phi-1.5, phi-2): one LayerNorm per layer feeding attention and MLP in parallel
(x + attn(ln(x)) + mlp(ln(x))), biases on every projection, partial rotary
(`partial_rotary_factor`, 0.5 by default), an fc1 -> gelu_new -> fc2 MLP, optional q/k
LayerNorms shared by all heads (`qk_layernorm`), a final LayerNorm and an LM head with a bias.

Checkpoint names map onto the Llama layers: `self_attn.dense` -> `o_proj`,
`model.final_layernorm` -> `model.norm`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.activation import activation
from textgen.core.layers.linear import ColumnLinear, Linear, RowLinear
from textgen.core.layers.norm import LayerNorm
from textgen.core.models.llama import LlamaAttention, LlamaForCausalLM, LlamaModel
from textgen.core.models.qwen3 import per_head
from textgen.core.models.weights import LLAMA_STACKED, WeightMap

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class PhiAttention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        self.q_layernorm = self.k_layernorm = None
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(self.head_size, cfg.layer_norm_eps, build.dtype)
            self.k_layernorm = LayerNorm(self.head_size, cfg.layer_norm_eps, build.dtype)

    def biases(self, cfg: Any) -> tuple[bool, bool]:
        return True, True

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(hidden)
        if self.q_layernorm is not None:
            q, k = per_head(self.q_layernorm, q, self.head_size), per_head(self.k_layernorm, k, self.head_size)
        return q, k, v


class PhiMLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        q, rank, tp = build.quantizer, build.tp_rank, build.tp_size
        self.fc1 = ColumnLinear(cfg.hidden_size, cfg.intermediate_size, True, build.dtype, q, rank, tp)
        self.fc2 = RowLinear(cfg.intermediate_size, cfg.hidden_size, True, build.dtype, q, rank, tp)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = PhiAttention(cfg, layer_idx, build, sliding_window)
        self.mlp = PhiMLP(cfg, build)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, build.dtype)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                rotary: RotaryEmbedding, ctx: ForwardContext) -> tuple[torch.Tensor, None]:
        normed = self.input_layernorm(hidden)
        return self.self_attn(normed, cos_sin, rotary, ctx) + self.mlp(normed) + hidden, None


class PhiModel(LlamaModel):
    layer_cls = PhiDecoderLayer
    norm_cls = LayerNorm


class PhiForCausalLM(LlamaForCausalLM):
    model_cls = PhiModel

    def __init__(self, hf_config: Any, build: ModelBuildContext) -> None:
        if getattr(hf_config, "tie_word_embeddings", False):
            raise ValueError("Phi with tied embeddings is not supported natively (its LM head has a bias)")
        super().__init__(hf_config, build)
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, True, build.dtype)

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [None] * cfg.num_hidden_layers

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @property
    def weight_map(self) -> WeightMap:
        return WeightMap(stacked=LLAMA_STACKED, renames=((".self_attn.dense.", ".self_attn.o_proj."),
                                                         ("model.final_layernorm.", "model.norm.")))
