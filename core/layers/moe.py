"""Mixture of experts: a softmax top-k router and a fused expert layer (grouped matmul in torch).

`FusedMoE` holds every expert's weights stacked: `gate_up_proj` [E, 2 * I, H] ([gate; up] per
expert, transformers 5's own layout) and `down_proj` [E, H, I]. Checkpoints that store one tensor
per expert (Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down_proj) load through the shard ids
(expert, part) of the parameters' `weight_loader`; a parameter is complete once every expert came
(`required_shards`).

Forward, no Python loop over tokens: the (token, expert) pairs are sorted by expert, so each
expert's tokens form one contiguous slice; each expert runs two matmuls on its slice; the outputs
are weighted by the router and summed back per token with one `index_add_`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.layers.activation import activation
from textgen.core.layers.norm import default_weight_loader


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax (float32) -> top-k -> optional renormalisation over the k chosen, as Mixtral and
    Qwen-MoE do. Returns (weights [T, k] float32, expert ids [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """[T, H] tokens, their top-k (weights, expert ids) -> [T, H] = sum_k w_k * expert_k(x)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str,
                 dtype: torch.dtype, tp_size: int = 1) -> None:
        super().__init__()
        if tp_size != 1:
            raise ValueError("mixture-of-experts layers run on one device only (tensor parallelism "
                             "is not implemented for them yet)")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.act = activation(act)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
                                      requires_grad=False)
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.gate_up_proj.required_shards = frozenset((e, j) for e in range(num_experts) for j in (0, 1))
        self.down_proj.weight_loader = self._load_down
        self.down_proj.required_shards = frozenset((e, 2) for e in range(num_experts))

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        expert, part = shard_id  # type: ignore[misc]
        size = self.intermediate_size
        default_weight_loader(param.data[expert].narrow(0, part * size, size), loaded)

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        default_weight_loader(param.data[shard_id[0]], loaded)  # type: ignore[index]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = ids.shape
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)  # pairs grouped by expert, token order kept within
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        xs = x.index_select(0, token_of)
        out = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                gate, up = F.linear(xs[start: start + n], self.gate_up_proj[expert]).chunk(2, dim=-1)
                out[start: start + n] = F.linear(self.act(gate) * up, self.down_proj[expert])
                start += n
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)

