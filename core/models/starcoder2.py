"""StarCoder2: Llama's attention layout with biases everywhere (`use_bias`), LayerNorms with bias,
a plain (not gated) MLP c_fc -> gelu-tanh -> c_proj, and `sliding_window` on every layer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.activation import activation
from textgen.core.layers.linear import ColumnLinear, RowLinear
from textgen.core.layers.norm import LayerNorm
from textgen.core.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

if TYPE_CHECKING:
    from textgen.core.models.base import ModelBuildContext


class Starcoder2Attention(LlamaAttention):
    def biases(self, cfg: Any) -> tuple[bool, bool]:
        return bool(cfg.use_bias), bool(cfg.use_bias)


class Starcoder2MLP(nn.Module):
    def __init__(self, cfg: Any, build: ModelBuildContext) -> None:
        super().__init__()
        bias, q, rank, tp = bool(cfg.use_bias), build.quantizer, build.tp_rank, build.tp_size
        self.c_fc = ColumnLinear(cfg.hidden_size, cfg.intermediate_size, bias, build.dtype, q, rank, tp)
        self.c_proj = RowLinear(cfg.intermediate_size, cfg.hidden_size, bias, build.dtype, q, rank, tp)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Starcoder2Attention
    mlp_cls = Starcoder2MLP
    norm_cls = LayerNorm


class Starcoder2Model(LlamaModel):
    layer_cls = Starcoder2DecoderLayer
    norm_cls = LayerNorm


class Starcoder2ForCausalLM(LlamaForCausalLM):
    model_cls = Starcoder2Model

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers
