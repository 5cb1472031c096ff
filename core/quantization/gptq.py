"""GPTQ and AWQ checkpoints: integer codes packed into int32, per-group scales and zero points.

On disk (AutoGPTQ / GPTQModel, `quant_method: gptq`), for a layer W [N, K], G = K / group_size:
- `qweight` int32 [K * bits / 32, N]: 32 / bits codes per word along the input axis, the k-th of a
  word at bit offset bits * (k % (32 / bits));
- `qzeros` int32 [G, N * bits / 32]: zero points packed the same way along the output axis;
  `checkpoint_format: gptq` (v1, the default) stores zero - 1, `gptq_v2` the zero itself;
- `scales` [G, N]; `g_idx` int32 [K]: the group of each input column (desc_act reorders them);
- W[n, k] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n]; sym checkpoints have zero = 2^(bits-1).
AWQ (AutoAWQ GEMM, `quant_method: awq`, 4 bits): `qweight` int32 [K, N / 8] and `qzeros` [G, N / 8]
packed along the output axis in the order 0 2 4 6 1 3 5 7 (nibble i holds column 8c + order[i]),
`scales` [G, N], zero points without offset, no g_idx.

After loading, 4-bit weights become the canonical int4 form (codes, scales, float zeros =
(8 - zero) * scale), with a desc_act layer's input columns sorted by group so that groups are
contiguous (the activations are permuted the same way at each call); 8-bit weights with one group
and symmetric zeros become canonical int8; other 8-bit layouts are dequantized to the compute dtype.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.base import Quantizer
from textgen.core.quantization.kernels import replace_weight

if TYPE_CHECKING:
    from textgen.core.backend import Backend

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> [R * 32 / bits, C]; row r * f + i from bits i*bits.. of word r."""
    factor = 32 // bits
    shifts = torch.arange(factor, dtype=torch.int32, device=packed.device) * bits
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * factor, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> [R, C * 32 / bits]; column c * f + i from bits i*bits.. of word c."""
    factor = 32 // bits
    shifts = torch.arange(factor, dtype=torch.int32, device=packed.device) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], packed.shape[1] * factor)


def _param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, **dims: int) -> None:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    for key, value in dims.items():
        setattr(param, key, value)
    setattr(layer, name, param)


class GPTQ(Quantizer):
    name = "gptq"

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        reasons = []
        if quant_config.get("bits") not in (4, 8):
            reasons.append(f"gptq bits {quant_config.get('bits')!r} are not supported (4 or 8)")
        fmt = quant_config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            reasons.append(f"gptq checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
        if quant_config.get("textgen_on_the_fly"):
            reasons.append("gptq needs a GPTQ checkpoint (quantize it with GPTQModel or llm-compressor)")
        return reasons

    @property
    def bits(self) -> int:
        return int(self.quant_config["bits"])

    def group_size(self, in_features: int) -> int:
        size = int(self.quant_config.get("group_size", 128))
        return in_features if size <= 0 else size

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        factor, groups = 32 // self.bits, -(-in_features // self.group_size(in_features))
        _param(layer, "qweight", (in_features // factor, out_features), torch.int32,
               input_dim=0, output_dim=1, packed_dim=0, packed_factor=factor)
        _param(layer, "qzeros", (groups, out_features // factor), torch.int32,
               input_dim=0, output_dim=1, packed_dim=1, packed_factor=factor)
        _param(layer, "scales", (groups, out_features), dtype, input_dim=0, output_dim=1)
        _param(layer, "g_idx", (in_features,), torch.int32, input_dim=0)
        layer.g_idx.weight_loader = _g_idx_loader(layer)

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [N, K], zeros [G, N], scales [G, N], g_idx [K]) in natural order."""
        codes = unpack_along_rows(layer.qweight.data, self.bits).t()
        zeros = unpack_along_cols(layer.qzeros.data, self.bits)
        if self.quant_config.get("checkpoint_format", "gptq") == "gptq":
            zeros = zeros + 1  # v1 stores zero - 1
        return codes, zeros, layer.scales.data, layer.g_idx.data.long()

    def process_after_loading(self, layer: nn.Module) -> None:
        codes, zeros, scales, g_idx = self.unpacked(layer)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            layer._parameters.pop(name, None)
        canonicalize(self, layer, codes, zeros, scales, g_idx)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight_format == "dense":
            return F.linear(x, layer.dense_weight, bias)
        perm = getattr(layer, "input_perm", None)
        return self.kernels.apply(layer, x if perm is None else x.index_select(-1, perm), bias)

    def describe(self) -> str:
        c = self.quant_config
        return (f"{self.name} {c.get('bits', 4)}-bit group {c.get('group_size')}"
                f"{' desc_act' if c.get('desc_act') else ''}{'' if c.get('sym', True) else ' asym'} "
                f"(kernels: {self.kernels.describe()})")


def _g_idx_loader(layer: nn.Module):  # noqa: ANN202 - a weight_loader closure
    """Fused parts (q/k/v, gate/up) share their input, hence their act-order g_idx; a part that
    disagrees cannot be served by one fused layer."""
    seen: list[torch.Tensor] = []

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if seen and not torch.equal(seen[0], loaded):
            raise ValueError(f"the fused parts of a {tuple(param.shape)}-input layer have different g_idx "
                             f"(part {shard_id!r} differs): GPTQ act order must be shared by projections of one input")
        seen.append(loaded.clone())
        layer.weight_loader(param, loaded, shard_id)

    return load


class AWQ(GPTQ):
    name = "awq"

    @classmethod
    def check(cls, quant_config: dict[str, Any], backend: Backend, dtype: torch.dtype) -> list[str]:
        reasons = []
        if quant_config.get("bits", quant_config.get("w_bit")) != 4:
            reasons.append("awq supports 4 bits only")
        version = str(quant_config.get("version", "gemm")).lower()
        if version != "gemm":
            reasons.append(f"awq version {version!r} is not supported (gemm)")
        if quant_config.get("textgen_on_the_fly"):
            reasons.append("awq needs an AWQ checkpoint (quantize it with AutoAWQ or llm-compressor)")
        return reasons

    @property
    def bits(self) -> int:
        return 4

    def group_size(self, in_features: int) -> int:
        size = int(self.quant_config.get("group_size", self.quant_config.get("q_group_size", 128)))
        return in_features if size <= 0 else size

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        groups = -(-in_features // self.group_size(in_features))
        _param(layer, "qweight", (in_features, out_features // 8), torch.int32,
               input_dim=0, output_dim=1, packed_dim=1, packed_factor=8)
        _param(layer, "qzeros", (groups, out_features // 8), torch.int32,
               input_dim=0, output_dim=1, packed_dim=1, packed_factor=8)
        _param(layer, "scales", (groups, out_features), dtype, input_dim=0, output_dim=1)

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        order = torch.tensor(AWQ_INVERSE)
        k, n = layer.qweight.shape[0], layer.qweight.shape[1] * 8
        codes = unpack_along_cols(layer.qweight.data, 4).view(k, n // 8, 8)[..., order].reshape(k, n).t()
        groups = layer.qzeros.shape[0]
        zeros = unpack_along_cols(layer.qzeros.data, 4).view(groups, n // 8, 8)[..., order].reshape(groups, n)
        g_idx = torch.arange(k) // self.group_size(k)
        return codes, zeros, layer.scales.data, g_idx

    def process_after_loading(self, layer: nn.Module) -> None:
        codes, zeros, scales, g_idx = self.unpacked(layer)
        for name in ("qweight", "qzeros", "scales"):
            layer._parameters.pop(name, None)
        canonicalize(self, layer, codes, zeros, scales, g_idx)

    def describe(self) -> str:
        size = self.quant_config.get("group_size", self.quant_config.get("q_group_size"))
        return f"awq 4-bit gemm group {size} (kernels: {self.kernels.describe()})"


def canonicalize(method: GPTQ, layer: nn.Module, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor) -> None:
    """Hand the unpacked weight to the kernels in the canonical form (see the module docstring)."""
    n, k = codes.shape
    groups = scales.shape[0]
    size = -(-k // groups)
    perm = None if torch.equal(g_idx, torch.arange(k) // size) else torch.argsort(g_idx, stable=True)
    if perm is not None and torch.bincount(g_idx, minlength=groups).ne(size).any():
        raise ValueError(f"g_idx of a {n}x{k} layer does not put {size} input columns in each of its {groups} groups")
    scales_t, zeros_t = scales.float().t(), zeros.float().t()
    packed = codes if perm is None else codes[:, perm]
    if method.bits == 4 and k % size == 0:
        method.kernels.pack_int4(layer, packed.to(torch.uint8), scales_t, (8 - zeros_t) * scales_t, size)
    elif method.bits == 8 and groups == 1 and bool((zeros == 128).all()):
        method.kernels.pack_int8(layer, (packed - 128).to(torch.int8), scales_t[:, 0])
    else:  # dequantized in natural column order: no activation permutation
        dense = (codes.float() - zeros_t[:, g_idx]) * scales_t[:, g_idx]
        replace_weight(layer, dense_weight=dense.to(layer.compute_dtype))
        layer.weight_format = "dense"
        return
    if perm is not None:
        layer.register_buffer("input_perm", perm, persistent=False)
