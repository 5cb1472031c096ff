"""The quantization interface of fused MoE layers: stacked expert weights and the grouped GEMM.

A fused MoE layer (`textgen.core.layers.moe.FusedMoE`) holds E experts' gate/up and down
projections stacked, as transformers 5 does: `gate_up_proj` [E, 2 * I, H] ([gate; up] per
expert) and `down_proj` [E, H, I]. Its method, chosen by `moe_method_for(quantizer)`:
1. `create_weights(layer, num_experts, hidden_size, intermediate_size, dtype)` registers them
   (`intermediate_size` is this rank's share under tensor parallelism: the layer's `tp_rank` /
   `tp_size` pick which slice of each expert's intermediate axis the loaders keep),
   each with `weight_loader(param, loaded, shard_id)`: shard id None for a stacked tensor, or
   (expert, part) with part 0 = gate, 1 = up, 2 = down for checkpoints with one tensor per
   expert (Mixtral's `experts.E.w1/w3/w2`, Qwen-MoE's gate/up/down_proj; see
   `textgen.core.models.weights.per_expert_rules`), and `required_shards` (every expert's parts);
2. `process_after_loading(layer)`;
3. `apply(layer, x [T, H], topk_weights [T, k], topk_ids [T, k]) -> [T, H]`: the router-weighted
   sum of each token's chosen experts, down(act(gate) * up).

The grouped GEMM is the one implementation for every method: no Python loop over tokens. The
(token, expert) pairs are sorted by expert, so each expert's tokens form one contiguous slice;
each expert that received tokens runs two GEMMs on its slice with the weights `expert_weights`
gives (dequantized for a quantized method); the outputs are weighted by the router and summed back
per token with one `index_add_`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.base import QuantizationError
from textgen.core.quantization.kernels import quantize_int8_channels

if TYPE_CHECKING:
    from textgen.core.quantization.base import Quantizer

STACKED = ("gate_up_proj", "down_proj")


class FusedMoEMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype) -> None:
        """Register the stacked expert parameters (see the module docstring)."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded experts (default: nothing to do)."""

    @abstractmethod
    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert in `dtype`."""

    def describe(self) -> str:
        return type(self).__name__

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        top_k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)
        order = flat_ids.argsort(stable=True)  # pairs grouped by expert, token order kept within
        token_of = order // top_k
        counts = torch.bincount(flat_ids, minlength=layer.num_experts).tolist()
        xs = x.index_select(0, token_of)
        out = torch.empty_like(xs)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                gate_up, down = self.expert_weights(layer, expert, x.dtype)
                gate, up = F.linear(xs[start: start + n], gate_up).chunk(2, dim=-1)
                out[start: start + n] = F.linear(layer.act(gate) * up, down)
                start += n
        out = out * topk_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)


def _copy_checked(target: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"{what} of shape {tuple(loaded.shape)} does not fit {tuple(target.shape)}")
    target.copy_(loaded)


def _tp(layer: nn.Module) -> tuple[int, int]:
    """(rank, size) of the layer's tensor-parallel group; a layer without them is unsharded."""
    return getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)


def _rank_part(layer: nn.Module, loaded: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's slice of one part along the intermediate axis `dim` (gate/up rows, down
    columns): column-parallel gate/up, row-parallel down, as the dense MLP shards them."""
    (rank, tp), size = _tp(layer), layer.intermediate_size
    if loaded.shape[dim] != size * tp:
        raise ValueError(f"expert tensor of shape {tuple(loaded.shape)} does not have {size * tp} "
                         f"entries on axis {dim}")
    return loaded.narrow(dim, rank * size, size)


def stacked_loader(layer: nn.Module, name: str):  # noqa: ANN202 - a weight_loader closure
    """Loads a whole stacked tensor (shard id None) or one expert's part (expert, part), keeping
    this rank's slice of the intermediate axis (a `LazySlice` reads only that slice)."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size, full = layer.intermediate_size, layer.intermediate_size * _tp(layer)[1]
        if shard_id is None:
            if name == "down_proj":
                loaded = _rank_part(layer, loaded, 2)
            elif full != size:  # [E, 2I, H]: this rank's gate rows, then its up rows
                for part in (0, 1):
                    _copy_checked(param.data.narrow(1, part * size, size),
                                  _rank_part(layer, loaded.narrow(1, part * full, full), 1), f"stacked {name}")
                return
            _copy_checked(param.data, loaded, f"stacked {name}")
            return
        expert, part = shard_id  # type: ignore[misc]
        target = param.data[expert]
        if name == "gate_up_proj":
            target = target.narrow(0, part * size, size)
            loaded = _rank_part(layer, loaded, 0)
        else:
            loaded = _rank_part(layer, loaded, 1)
        _copy_checked(target, loaded, f"expert {expert} part {part}")

    return load


class UnquantizedMoE(FusedMoEMethod):
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       dtype: torch.dtype) -> None:
        layer.num_experts, layer.intermediate_size = num_experts, intermediate_size
        shapes = {"gate_up_proj": (num_experts, 2 * intermediate_size, hidden_size),
                  "down_proj": (num_experts, hidden_size, intermediate_size)}
        parts = {"gate_up_proj": (0, 1), "down_proj": (2,)}
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.weight_loader = stacked_loader(layer, name)
            param.required_shards = frozenset((e, p) for e in range(num_experts) for p in parts[name])
            setattr(layer, name, param)

    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.gate_up_proj[expert].to(dtype), layer.down_proj[expert].to(dtype)

    def describe(self) -> str:
        return "unquantized experts"


class Int8WeightOnlyMoE(UnquantizedMoE):
    """Experts loaded in float, then stored as int8 codes with per-row scales (1 byte per weight,
    as the int8 linear layers); each expert is dequantized to the activation dtype when it
    receives tokens."""

    def process_after_loading(self, layer: nn.Module) -> None:
        for name in STACKED:
            weight = layer._parameters.pop(name).data
            experts, rows, cols = weight.shape
            codes, scales = quantize_int8_channels(weight.reshape(experts * rows, cols))
            layer.register_buffer(f"{name}_codes", codes.reshape(experts, rows, cols), persistent=False)
            layer.register_buffer(f"{name}_scales", scales.reshape(experts, rows).to(weight.dtype), persistent=False)

    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(getattr(layer, f"{n}_codes")[expert].to(dtype) * getattr(layer, f"{n}_scales")[expert]
                     .to(dtype).unsqueeze(-1) for n in STACKED)  # type: ignore[return-value]

    def describe(self) -> str:
        return "int8 experts per row"


def moe_method_for(quantizer: Quantizer | None) -> FusedMoEMethod:
    """The method a fused MoE layer uses: unquantized without a quantizer, else the quantizer's
    own; a method without one for experts is refused with its name."""
    if quantizer is None:
        return UnquantizedMoE()
    method = quantizer.moe_method()
    if method is None:
        raise QuantizationError(f"quantization '{quantizer.name}' has no method for mixture-of-experts weights yet "
                                "(int8 has one): serve this model without it or with --quantize int8")
    return method
