"""Mixture of experts: a softmax top-k router and a fused expert layer.

`FusedMoE` holds every expert's weights stacked: `gate_up_proj` [E, 2 * I, H] ([gate; up] per
expert, transformers 5's own layout) and `down_proj` [E, H, I]. Checkpoints that store one tensor
per expert (Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down_proj) load through the shard ids
(expert, part) of the parameters' `weight_loader`; a parameter is complete once every expert came
(`required_shards`). The parameters, their loaders and the grouped GEMM (no Python loop over
tokens) come from the layer's MoE quantization method, `textgen.core.quantization.moe`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.layers.activation import activation
from textgen.core.quantization.moe import moe_method_for

if TYPE_CHECKING:
    from textgen.core.quantization import Quantizer


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax (float32) -> top-k -> optional renormalisation over the k chosen, as Mixtral and
    Qwen-MoE do. Returns (weights [T, k] float32, expert ids [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """[T, H] tokens, their top-k (weights, expert ids) -> [T, H] = sum_k w_k * expert_k(x).

    Tensor parallelism shards every expert's intermediate axis: gate/up column-parallel, down
    row-parallel, so with `tp_size` > 1 the output is this rank's partial sum; the caller
    all-reduces it (once per layer, together with a shared expert's partial).

    The stacked expert weights, their loaders and the grouped GEMM belong to the MoE method the
    quantizer gives (`textgen.core.quantization.moe`): unquantized without one."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str,
                 dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1, quantizer: Quantizer | None = None) -> None:
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"expert intermediate size {intermediate_size} is not divisible by the "
                             f"tensor-parallel size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.act = activation(act)
        self.method = moe_method_for(quantizer)
        self.method.create_weights(self, num_experts, hidden_size, intermediate_size // tp_size, dtype)

    def process_after_loading(self) -> None:
        self.method.process_after_loading(self)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, weights, ids)
