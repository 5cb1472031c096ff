"""CUDA kernels for quantized linear layers: fp8 weights on `torch._scaled_mm`; int4 and int8
weight-only on the portable dequantize + cuBLAS GEMM.

fp8 (`torch._scaled_mm`, in torch itself): needs compute capability 8.9+ (Ada, Hopper, later),
both operands float8_e4m3fn, the first row-major [M, K], the second column-major [K, N] (the
[N, K] weight's transpose view, no copy), K and N multiples of 16, float32 scales. Activations are
quantized per call (dynamic): per token (row) on the row-wise path, else per tensor. Three paths,
chosen once per layer at pack time and per call by the activation dtype:
- per-tensor weight scale (all rows equal): tensor-wise scales, output in the activation dtype;
- per-channel weight scales, bfloat16 activations: row-wise scales (scale_a [M, 1] per token,
  scale_b [1, N] per channel; torch's row-wise kernel writes bfloat16 only);
- per-channel scales, float16 activations: tensor-wise with a unit weight scale into float32, the
  channel scales applied after (the epilogue torch cannot do for float16 output).
Elsewhere (no CUDA device, capability below 8.9, a torch without `_scaled_mm`, K or N not a
multiple of 16, float32 activations) the layer keeps the portable layout and dequantizes; the
reason is logged once per distinct reason.

int4 / int8: Marlin (GPTQ/AWQ) and exllama kernels are not wired; the weights stay compact
(0.5 / 1 byte each) and are dequantized to the activation dtype before cuBLAS. int8 weight-only
has no int8 x float kernel in torch (`torch._int_mm` multiplies int8 by int8 only, which is the
compressed-tensors W8A8 path, not weight-only).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.kernels import PortableKernels, replace_weight

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
FP8_MIN_CAPABILITY = (8, 9)
SCALED_MM_ALIGNMENT = 16  # K and N of torch._scaled_mm's operands
SCALED_MM_DTYPES = (torch.bfloat16, torch.float16)  # activation (= output) dtypes the fp8 paths serve
ACT_SCALE_FLOOR = 1e-12  # an all-zero row or tensor quantizes with this scale instead of dividing by 0


def fp8_device_reasons(device: torch.device) -> list[str]:
    """Why torch._scaled_mm cannot run on `device` (empty = it can)."""
    if device.type != "cuda":
        return [f"the weight is on {device.type}, not on a CUDA device"]
    if not hasattr(torch, "_scaled_mm"):
        return [f"torch {torch.__version__} has no torch._scaled_mm (fp8 GEMM needs torch >= 2.5)"]
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return [f"CUDA compute capability {major}.{minor} is below 8.9 (fp8 GEMM needs Ada, Hopper or later)"]
    return []


def fp8_shape_reasons(n: int, k: int) -> list[str]:
    """Why torch._scaled_mm cannot hold an [n, k] weight (empty = it can)."""
    return [f"{name} {size} is not a multiple of {SCALED_MM_ALIGNMENT}"
            for name, size in (("output size", n), ("input size", k)) if size % SCALED_MM_ALIGNMENT]


@functools.cache
def report_fallback(what: str, reason: str) -> None:
    """Log one line per distinct (what, reason): a model has many layers of the same shape."""
    logger.warning("%s: dequantize + GEMM instead of torch._scaled_mm: %s", what, reason)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: (codes [M, K] e4m3, scales float32 [M, 1]) with x ~= codes * scales."""
    scales = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=ACT_SCALE_FLOOR)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def quantize_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor fp8: (codes e4m3, scale float32 0-dim)."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=ACT_SCALE_FLOOR)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class CUDAKernels(PortableKernels):
    name = "cuda: fp8 torch._scaled_mm (sm89+); int4/int8 dequantize + GEMM"

    def pack_fp8(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        n, k = codes.shape
        reasons = fp8_device_reasons(codes.device) + fp8_shape_reasons(n, k)
        if reasons:
            for reason in reasons:
                report_fallback(f"fp8 {n}x{k} weight", reason)
            super().pack_fp8(layer, codes, scales)
            return
        scales = scales.float().reshape(-1)
        per_tensor = bool((scales == scales[0]).all())
        replace_weight(layer, fp8_weight_t=codes.contiguous().t(),  # [K, N] column-major: a view
                       fp8_scales=scales, fp8_tensor_scale=scales[0].clone(),
                       fp8_unit_scale=torch.ones((), dtype=torch.float32, device=codes.device))
        layer.weight_format, layer.fp8_per_tensor = "fp8_scaled_mm", per_tensor

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if layer.weight_format != "fp8_scaled_mm":
            return super().dense_weight(layer, dtype)
        return layer.fp8_weight_t.t().to(dtype) * layer.fp8_scales.to(dtype).unsqueeze(-1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight_format != "fp8_scaled_mm" or x.dtype not in SCALED_MM_DTYPES or x.numel() == 0:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1])
        out = self._scaled_mm(layer, flat)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias

    @staticmethod
    def _scaled_mm(layer: nn.Module, flat: torch.Tensor) -> torch.Tensor:
        """[M, K] activations -> [M, N] in their dtype, on the path the module docstring names."""
        weight = layer.fp8_weight_t
        if layer.fp8_per_tensor:
            codes, scale = quantize_fp8_tensor(flat)
            return torch._scaled_mm(codes, weight, scale_a=scale, scale_b=layer.fp8_tensor_scale,
                                    out_dtype=flat.dtype)
        if flat.dtype == torch.bfloat16:
            codes, scales = quantize_fp8_rows(flat)
            return torch._scaled_mm(codes, weight, scale_a=scales, scale_b=layer.fp8_scales.unsqueeze(0),
                                    out_dtype=torch.bfloat16)
        codes, scale = quantize_fp8_tensor(flat)
        out = torch._scaled_mm(codes, weight, scale_a=scale, scale_b=layer.fp8_unit_scale, out_dtype=torch.float32)
        return (out * layer.fp8_scales).to(flat.dtype)
