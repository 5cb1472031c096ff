"""Mixture-of-experts families on the Llama attention: Mixtral, Qwen2-MoE and Qwen3-MoE.

Mixtral: every layer's MLP is a top-k MoE (softmax router, top-k renormalised), windows as Mistral.
Qwen2-MoE: a MoE on the layers `decoder_sparse_step` / `mlp_only_layers` select, plus a shared
expert gated by sigmoid(shared_expert_gate(x)); `norm_topk_prob` decides the renormalisation.
Qwen3-MoE: Qwen3 attention (q/k norm), the same MoE without a shared expert.

Both checkpoint layouts load: transformers 5's stacked `experts.gate_up_proj` / `down_proj` and
the per-expert tensors of published checkpoints (`block_sparse_moe.experts.E.w1/w3/w2` for
Mixtral, `mlp.experts.E.gate/up/down_proj` for Qwen).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from textgen.core.layers.linear import Linear
from textgen.core.layers.moe import FusedMoE, route
from textgen.core.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from textgen.core.models.qwen3 import Qwen3Attention
from textgen.core.models.weights import LLAMA_STACKED, WeightMap, per_expert_rules

if TYPE_CHECKING:
    from textgen.core.distributed import Communicator
    from textgen.core.models.base import ModelBuildContext


class SparseMoeBlock(nn.Module):
    """Router `gate` (replicated, unquantized) + `experts`, and optionally a gated shared expert.

    Tensor parallelism: the experts and the shared expert are sharded on their intermediate axis;
    the sigmoid gate is a per-token scalar (replicated), so both partial outputs are summed first
    and reduced with one all-reduce per layer."""

    communicator: Communicator | None = None  # attached by the loader

    def __init__(self, cfg: Any, build: ModelBuildContext, num_experts: int, intermediate_size: int,
                 renormalize: bool, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.tp_size = cfg.num_experts_per_tok, renormalize, build.tp_size
        self.gate = Linear(cfg.hidden_size, num_experts, False, build.dtype)
        self.experts = FusedMoE(num_experts, cfg.hidden_size, intermediate_size, cfg.hidden_act, build.dtype,
                                build.tp_rank, build.tp_size, build.quantizer)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = LlamaMLP(cfg, build, shared_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, False, build.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        shared_bias = None
        if self.shared_expert is not None:
            shared_gate = torch.sigmoid(self.shared_expert_gate(x))
            mlp = self.shared_expert
            out = out + shared_gate * mlp.down_proj.partial(mlp.act_fn(mlp.gate_up_proj(x)))
            if mlp.down_proj.bias is not None:
                shared_bias = shared_gate * mlp.down_proj.bias
        if self.tp_size > 1:
            if self.communicator is None:
                raise RuntimeError("a sharded MoE layer has no communicator (the loader attaches one)")
            self.communicator.all_reduce(out)
        return out if shared_bias is None else out + shared_bias


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> nn.Module:
        return SparseMoeBlock(cfg, build, cfg.num_local_experts, cfg.intermediate_size, renormalize=True)


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers

    @property
    def weight_map(self) -> WeightMap:
        return WeightMap(stacked=LLAMA_STACKED, patterns=per_expert_rules("w1", "w3", "w2"),
                         renames=((".block_sparse_moe.", ".mlp."),),
                         tied_lm_head="lm_head." if self.tie_word_embeddings else None)


def is_sparse_layer(cfg: Any, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(cfg, "mlp_only_layers", None) or []) and cfg.num_experts > 0
            and (layer_idx + 1) % cfg.decoder_sparse_step == 0)


class QwenMoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: Any, layer_idx: int, build: ModelBuildContext) -> nn.Module:
        if not is_sparse_layer(cfg, layer_idx):
            return LlamaMLP(cfg, build, cfg.intermediate_size)
        return SparseMoeBlock(cfg, build, cfg.num_experts, cfg.moe_intermediate_size, bool(cfg.norm_topk_prob),
                              getattr(cfg, "shared_expert_intermediate_size", 0) or 0)


class Qwen2MoeModel(LlamaModel):
    layer_cls = QwenMoeDecoderLayer


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    model_cls = Qwen2MoeModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        if not getattr(cfg, "use_sliding_window", False):
            return [None] * cfg.num_hidden_layers
        window = cfg.sliding_window or None
        return [window if t == "sliding_attention" else None for t in cfg.layer_types]

    @property
    def weight_map(self) -> WeightMap:
        return WeightMap(stacked=LLAMA_STACKED, patterns=per_expert_rules("gate_proj", "up_proj", "down_proj"),
                         tied_lm_head="lm_head." if self.tie_word_embeddings else None)


class Qwen3MoeDecoderLayer(QwenMoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    model_cls = Qwen3MoeModel

    @staticmethod
    def sliding_windows(cfg: Any) -> list[int | None]:
        return [getattr(cfg, "sliding_window", None)] * cfg.num_hidden_layers
