"""OLMo 2: Llama without pre-norms; instead an RMSNorm on each sub-layer's output before its
residual add (x + norm(attn(x)), then + norm(mlp(.))), and RMSNorms over the whole q and k
projections (all heads at once) before rotary. Its RMSNorm multiplies by the weight in float32
before casting back (Llama casts first).

Tensor parallelism: a rank holds some heads of q and k, so their norms sum the squares locally,
all-reduce that [T, 1] sum and scale by the rank's slice of the norm weight (`Olmo2ShardedQKNorm`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.linear import _copy_checked, _rank_slice
from textgen.core.layers.norm import RMSNorm
from textgen.core.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel

if TYPE_CHECKING:
    from textgen.core.distributed import Communicator
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.rotary import RotaryEmbedding
    from textgen.core.models.base import ModelBuildContext


class Olmo2RMSNorm(RMSNorm):
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class Olmo2ShardedQKNorm(Olmo2RMSNorm):
    """The q or k norm of one rank: RMS over the whole projection (every rank's heads), weight
    sliced like the projection. A rank of `replicas` that share one kv head holds the same slice,
    so the all-reduced sum counts it `replicas` times and so does the divisor (width * tp)."""

    communicator: Communicator | None = None  # attached by the loader

    def __init__(self, width: int, full_width: int, eps: float, dtype: torch.dtype, slice_index: int,
                 tp_size: int) -> None:
        super().__init__(width, eps, dtype)
        self.full_width, self.slice_index, self.tp_size = full_width, slice_index, tp_size
        self.weight.weight_loader = self._load

    def _load(self, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        width = param.shape[0]
        _copy_checked(param.data, _rank_slice(loaded, 0, self.slice_index, width, self.full_width))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.communicator is None:
            raise RuntimeError("a sharded q/k norm has no communicator (the loader attaches one)")
        h = x.to(torch.float32)
        squares = self.communicator.all_reduce(h.pow(2).sum(-1, keepdim=True))
        h = h * torch.rsqrt(squares / (h.shape[-1] * self.tp_size) + self.eps)
        return (self.weight * h).to(x.dtype)


class Olmo2Attention(LlamaAttention):
    def __init__(self, cfg: Any, layer_idx: int, build: ModelBuildContext, sliding_window: int | None) -> None:
        super().__init__(cfg, layer_idx, build, sliding_window)
        eps, tp = cfg.rms_norm_eps, build.tp_size
        if tp == 1:
            self.q_norm = Olmo2RMSNorm(self.sizes[0], eps, build.dtype)
            self.k_norm = Olmo2RMSNorm(self.sizes[1], eps, build.dtype)
        else:
            qkv = self.qkv_proj
            kv_rank = build.tp_rank // qkv.kv_replicas
            self.q_norm = Olmo2ShardedQKNorm(self.sizes[0], qkv.num_heads * qkv.head_size, eps, build.dtype,
                                             build.tp_rank, tp)
            self.k_norm = Olmo2ShardedQKNorm(self.sizes[1], qkv.num_kv_heads * qkv.head_size, eps, build.dtype,
                                             kv_rank, tp)

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
