"""The quantization interface of fused MoE layers: stacked expert weights and their GEMMs.

A fused MoE layer (built by the model) holds E experts' gate/up and down projections stacked:
`w13_weight` [E, 2 * I, H] (gate rows first, then up) and `w2_weight` [E, H, I]. Its method:
1. `create_weights(layer, num_experts, hidden_size, intermediate_size, dtype)` registers them, each
   with `weight_loader(param, loaded, shard_id, expert_id)`; shard ids "w1" (gate), "w3" (up),
   "w2" (down), as in Mixtral checkpoints (`experts.{e}.w1/w2/w3`; Qwen-MoE's
   gate_proj/up_proj/down_proj map onto them);
2. `process_after_loading(layer)`;
3. `apply(layer, x [T, H], topk_weights [T, k], topk_ids [T, k]) -> [T, H]`: the weighted sum of
   each token's chosen experts, SiLU(gate) * up, then down.
The loop over experts only runs the experts that received tokens, each as one GEMM over its tokens.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.kernels import quantize_int8_channels

_W13_PARTS = {"w1": 0, "w3": 1}


class FusedMoEMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype) -> None:
        """Register the stacked expert parameters (see the module docstring)."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded experts (default: nothing to do)."""

    @abstractmethod
    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert in `dtype`."""

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        tokens, slots = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=layer.num_experts).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start:start + count]
            start += count
            rows = picks // slots
            w13, w2 = self.expert_weights(layer, expert, x.dtype)
            gate, up = F.linear(x[rows], w13).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2) * topk_weights.reshape(-1)[picks].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, rows, y)
        return out


def expert_loader(layer: nn.Module):  # noqa: ANN202 - a weight_loader closure
    """Loads one expert's w1 / w3 (into the gate / up half of w13) or w2."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        target = param.data[expert_id]
        if shard_id in _W13_PARTS:
            half = target.shape[0] // 2
            target = target.narrow(0, _W13_PARTS[shard_id] * half, half)
        elif shard_id != "w2":
            raise ValueError(f"unknown MoE shard id {shard_id!r} (w1, w2 or w3)")
        if target.shape != loaded.shape:
            raise ValueError(f"expert {expert_id} {shard_id} of shape {tuple(loaded.shape)} does not fit "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)

    return load


class UnquantizedMoE(FusedMoEMethod):
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype) -> None:
        layer.num_experts = num_experts
        shapes = {"w13_weight": (num_experts, 2 * intermediate_size, hidden_size),
                  "w2_weight": (num_experts, hidden_size, intermediate_size)}
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.weight_loader = expert_loader(layer)
            setattr(layer, name, param)

    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.w13_weight[expert].to(dtype), layer.w2_weight[expert].to(dtype)


class Int8WeightOnlyMoE(UnquantizedMoE):
    """Experts loaded in float, then stored as int8 codes with per-row scales (1 byte per weight);
    each expert is dequantized to the activation dtype when it receives tokens."""

    def process_after_loading(self, layer: nn.Module) -> None:
        for name in ("w13", "w2"):
            weight = layer._parameters.pop(f"{name}_weight").data
            experts, rows, cols = weight.shape
            codes, scales = quantize_int8_channels(weight.reshape(experts * rows, cols))
            layer.register_buffer(f"{name}_codes", codes.reshape(experts, rows, cols), persistent=False)
            layer.register_buffer(f"{name}_scales", scales.reshape(experts, rows), persistent=False)

    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(getattr(layer, f"{n}_codes")[expert].to(dtype) * getattr(layer, f"{n}_scales")[expert]
                     .to(dtype).unsqueeze(-1) for n in ("w13", "w2"))  # type: ignore[return-value]


def moe_method_for(quantizer: object | None) -> FusedMoEMethod:
    """The method a fused MoE layer uses: unquantized without a quantizer, else the quantizer's
    own; a format without expert support is refused with its name."""
    if quantizer is None:
        return UnquantizedMoE()
    method = quantizer.moe_method()  # type: ignore[attr-defined]
    if method is None:
        raise ValueError(f"quantization '{quantizer.name}' has no method for MoE expert weights yet")  # type: ignore[attr-defined]
    return method
