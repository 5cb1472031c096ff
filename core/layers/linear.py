"""Linear layers with per-parameter weight loaders and a quantizer hook.

Every parameter carries `weight_loader(param, loaded_tensor, shard_id=None)`; the model's
`load_weights` only maps checkpoint names to parameters and calls it. Parameters may carry
`output_dim` / `input_dim` attributes (a quantizer sets them for its own tensors) telling the
loaders which axis is sharded or fused; scalar parameters (no such axis) are copied as they are.
A quantizer's packed tensors also carry `packed_dim` / `packed_factor` (several values per stored
element along that axis): fused offsets along a packed axis are divided by the factor.
The quantization contract (create_weights, process_after_loading, apply) is in
`textgen.core.quantization.base`.

Tensor parallelism: column layers split the output axis across ranks, row layers the input axis
(and sum the partial outputs through the communicator). The loaders narrow the checkpoint tensor
to this rank's slice; under `--num-shard` > 1 it is a `loader.lazy_slice.LazySlice`, so only that
slice is read from the file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from textgen.core.backend import DenseLinearKernel
    from textgen.core.distributed import Communicator
    from textgen.core.quantization import Quantizer


class LinearBase(nn.Module):
    """y = x @ W.T + b, with W [out_features, in_features] on this rank. Unquantized, through the
    backend's `dense_linear` kernel when it has one (the loader sets `dense_kernel`), else F.linear."""

    dense_kernel: DenseLinearKernel | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quantizer: Quantizer | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.compute_dtype = dtype
        self.quantizer = quantizer
        if quantizer is not None:
            quantizer.create_weights(self, in_features, out_features, dtype)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            self.weight.output_dim, self.weight.input_dim = 0, 1
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        if self.bias is not None:
            self.bias.output_dim = 0
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        _copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantizer is not None:
            return self.quantizer.apply(self, x, bias)
        if self.dense_kernel is not None:
            return self.dense_kernel.apply(self, x, bias)
        return F.linear(x, self.weight, bias)

    def process_after_loading(self) -> None:
        if self.quantizer is not None:
            self.quantizer.process_after_loading(self)


class Linear(LinearBase):
    """Replicated linear: every rank holds the whole weight."""


class ColumnLinear(LinearBase):
    """Output axis split across ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quantizer: Quantizer | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        _check_divisible(out_features, tp_size, "output features")
        super().__init__(in_features, out_features // tp_size, bias, dtype, quantizer, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dim = getattr(param, "output_dim", None)
        if dim is not None:
            size = param.shape[dim]
            loaded = _rank_slice(loaded, dim, self.tp_rank, size, size * self.tp_size)
        _copy_checked(param.data, loaded)


class RowLinear(LinearBase):
    """Input axis split across ranks; partial outputs are summed over the group by the backend's
    communicator (`Backend.communicator()`, attached by the loader)."""

    communicator: Communicator | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quantizer: Quantizer | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        _check_divisible(in_features, tp_size, "input features")
        super().__init__(in_features // tp_size, out_features, bias, dtype, quantizer, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dim = getattr(param, "input_dim", None)
        if dim is not None and loaded.dim() > dim:
            size = param.shape[dim]
            loaded = _rank_slice(loaded, dim, self.tp_rank, size, size * self.tp_size)
        _copy_checked(param.data, loaded)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's unreduced share of x @ W.T, without the bias: for a caller that sums it
        with other partials and reduces them all at once (a MoE layer's shared expert)."""
        return self._linear(x, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._linear(x, self.bias)
        out = self.partial(x)  # the bias is added once, after the reduction
        if self.communicator is None:
            raise RuntimeError("a row-parallel layer with tp_size > 1 has no communicator (the loader attaches one)")
        self.communicator.all_reduce(out)
        return out if self.bias is None else out + self.bias


class MergedColumnLinear(ColumnLinear):
    """Several column layers over the same input fused along the output axis (e.g. gate and up).

    Shard ids are integer indices into `output_sizes` (full, unsharded sizes).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 quantizer: Quantizer | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        for size in output_sizes:
            _check_divisible(size, tp_size, "fused output size")
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, quantizer, tp_rank, tp_size)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        """(offset, size) of one fused part in this rank's output axis."""
        index = int(shard_id)  # type: ignore[call-overload]
        sizes = [s // self.tp_size for s in self.output_sizes]
        return sum(sizes[:index]), sizes[index]

    def fused_parts(self) -> list[tuple[object, int]]:
        """(shard id, full unsharded size) of each fused part, in checkpoint order."""
        return list(enumerate(self.output_sizes))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None and dim is not None and self.tp_size > 1:
            self._load_prefused(param, loaded, dim)
            return
        if shard_id is None or dim is None:
            _copy_checked(param.data, loaded)  # already fused in the checkpoint, or a scalar
            return
        offset, size = _packed(param, dim, *self.shard_range(shard_id))
        target = param.data.narrow(dim, offset, size)
        _copy_checked(target, _rank_slice(loaded, dim, self.tp_rank, size, size * self.tp_size))


    def _load_prefused(self, param: nn.Parameter, loaded: torch.Tensor, dim: int) -> None:
        """A checkpoint that stores the parts already fused (Phi-3's qkv_proj, gate_up_proj):
        split it into its parts and load each as its shard (this rank's slice of each)."""
        offset = 0
        for shard_id, full in self.fused_parts():
            start, size = _packed(param, dim, offset, full)
            self.weight_loader(param, loaded.narrow(dim, start, size), shard_id)
            offset += full


class QKVLinear(MergedColumnLinear):
    """q, k and v projections fused along the output axis; shard ids "q", "k", "v".

    With more ranks than kv heads the kv heads are replicated (each rank keeps one).
    """

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, quantizer: Quantizer | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.head_size, self.num_heads, self.num_kv_heads = head_size, num_heads, num_kv_heads
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        kv_total = num_kv_heads * self.kv_replicas * head_size
        super().__init__(hidden_size, [num_heads * head_size, kv_total, kv_total], bias, dtype,
                         quantizer, tp_rank, tp_size)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        return super().shard_range({"q": 0, "k": 1, "v": 2}[str(shard_id)])

    def fused_parts(self) -> list[tuple[object, int]]:
        kv = self.num_kv_heads * self.head_size
        return [("q", self.num_heads * self.head_size), ("k", kv), ("v", kv)]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None and dim is not None and self.tp_size > 1:
            self._load_prefused(param, loaded, dim)
            return
        if shard_id is None or dim is None:
            _copy_checked(param.data, loaded)
            return
        offset, size = _packed(param, dim, *self.shard_range(shard_id))
        if shard_id == "q":
            rank, full = self.tp_rank, self.num_heads * self.head_size
        else:
            rank, full = self.tp_rank // self.kv_replicas, self.num_kv_heads * self.head_size
        full = _packed(param, dim, 0, full)[1]
        target = param.data.narrow(dim, offset, size)
        _copy_checked(target, _rank_slice(loaded, dim, rank, size, full))


def _packed(param: nn.Parameter, dim: int, offset: int, size: int) -> tuple[int, int]:
    """(offset, size) in stored elements when `dim` is the parameter's packed axis."""
    if getattr(param, "packed_dim", None) != dim:
        return offset, size
    factor = param.packed_factor
    if offset % factor or size % factor:
        raise ValueError(f"a fused part at offset {offset} of size {size} does not align with {factor} values "
                         f"packed per element")
    return offset // factor, size // factor


def _rank_slice(loaded: torch.Tensor, dim: int, rank: int, size: int, full: int) -> torch.Tensor:
    """This rank's `size` entries of a checkpoint tensor whose axis `dim` must hold `full`."""
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not have {full} entries "
                         f"on axis {dim}")
    return loaded.narrow(dim, rank * size, size)


def _copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                         f"slice of shape {tuple(target.shape)}")
    target.copy_(loaded)


def _check_divisible(size: int, tp_size: int, what: str) -> None:
    if size % tp_size:
        raise ValueError(f"{what} {size} is not divisible by the tensor-parallel size {tp_size}")
