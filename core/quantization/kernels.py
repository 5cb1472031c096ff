"""Canonical quantized weights: quantize / dequantize helpers and the portable kernels.

The portable kernels keep the codes compact (int4: two per byte; int8: one) and dequantize the
whole matrix to the activation dtype before `F.linear` on every call: correct on any torch
device, memory-saving, but not faster. Backends override them with packed kernels
(`textgen.backends.cpu.quant_kernels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.base import WeightKernels


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit quantization of [N, K] in groups of `group_size` along K.
    Returns (codes uint8 [N, K] in 0..15, scales [N, G], zeros [N, G]) with
    W ~= (codes - 8) * scales + zeros, the form the CPU int4 kernel computes."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    codes = ((w - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).round().clamp(0, 15)
    zeros = lo + 8 * scales
    return codes.reshape(n, k).to(torch.uint8), scales, zeros


def quantize_int8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per output channel: (codes int8 [N, K], scales [N])."""
    w = weight.float()
    scales = (w.abs().amax(-1) / 127).clamp(min=1e-8)
    return (w / scales.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(codes [N, K] - 8) * scales + zeros with [N, G] scales and zeros, in `dtype`."""
    n, k = codes.shape
    groups = scales.shape[-1]
    w = (codes.reshape(n, groups, k // groups).to(dtype) - 8) * scales.to(dtype).unsqueeze(-1)
    return (w + zeros.to(dtype).unsqueeze(-1)).reshape(n, k)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 (K even) -> [N, K / 2], even k in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def replace_weight(layer: nn.Module, **buffers: torch.Tensor) -> None:
    """Drop `layer.weight` (the loaded float or checkpoint tensors go with it) and register the
    kernel's buffers in its place."""
    if "weight" in layer._parameters:
        del layer._parameters["weight"]
    for name, value in buffers.items():
        layer.register_buffer(name, value, persistent=False)


class PortableKernels(WeightKernels):
    """Dequantize, then `F.linear`: any device, any M."""

    name = "portable (dequantize + matmul)"

    def pack_int4(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> None:
        dtype = layer.compute_dtype
        replace_weight(layer, int4_nibbles=pack_nibbles(codes), int4_scales=scales.to(dtype),
                       int4_zeros=zeros.to(dtype))
        layer.weight_format = "int4"

    def pack_int8(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        replace_weight(layer, int8_codes=codes.contiguous(), int8_scales=scales.to(layer.compute_dtype))
        layer.weight_format = "int8"

    def pack_fp8(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        replace_weight(layer, fp8_weight=codes.contiguous(), fp8_scales=scales.float())
        layer.weight_format = "fp8"

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The layer's weight dequantized to `dtype` (the large-M path of every kernel set)."""
        if layer.weight_format == "int4":
            codes = unpack_nibbles(layer.int4_nibbles)
            return dequantize_int4(codes, layer.int4_scales, layer.int4_zeros, dtype)
        if layer.weight_format == "fp8":
            return layer.fp8_weight.to(dtype) * layer.fp8_scales.to(dtype).unsqueeze(-1)
        return layer.int8_codes.to(dtype) * layer.int8_scales.to(dtype).unsqueeze(-1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dense_weight(layer, x.dtype), bias)
