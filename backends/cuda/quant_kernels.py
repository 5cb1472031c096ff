"""CUDA kernels for quantized linear layers: fp8 weights on `torch._scaled_mm`; int4 (GPTQ, AWQ)
on Marlin where its package loads (textgen.backends.cuda.quant_marlin); int8 weight-only on the
portable dequantize + cuBLAS GEMM.

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

int4: Marlin (`gptq_marlin_gemm`, any M) when the `kernels` package, capability 8.0+, the shape,
group size, dtype and integer zero points allow (quant_marlin names each requirement); else the
compact portable layout, dequantized before cuBLAS, with the reason logged once. int8 weight-only:
dequantize + cuBLAS; torch has no int8-weight x float kernel (`torch._int_mm` multiplies int8 by
int8 only: the compressed-tensors W8A8 path, not weight-only). exllama kernels are not wired.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from textgen.backends.cuda import quant_marlin as marlin
from textgen.core.quantization.kernels import PortableKernels, dequantize_int4, replace_weight

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
    logger.warning("%s: dequantize + GEMM instead of %s", what, reason)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: (codes [M, K] e4m3, scales float32 [M, 1]) with x ~= codes * scales."""
    scales = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=ACT_SCALE_FLOOR)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def quantize_fp8_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor fp8: (codes e4m3, scale float32 0-dim)."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=ACT_SCALE_FLOOR)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def marlin_reasons(codes: torch.Tensor, group_size: int, dtype: torch.dtype, has_integer_zeros: bool) -> list[str]:
    """Why an int4 weight cannot run on Marlin here (empty = it can), the cheap checks first."""
    n, k = codes.shape
    reasons = marlin.package_reasons() + marlin.device_reasons(codes.device)
    reasons += marlin.shape_reasons(n, k, group_size, dtype)
    if not has_integer_zeros:
        reasons.append("its zero points are not integers (on-the-fly int4's min/max zeros); Marlin takes integer "
                       "zero points (GPTQ / AWQ checkpoints)")
    if reasons:
        return reasons
    try:
        marlin.load_ops()
    except Exception as error:  # the hub download or the kernel's own import: report it, serve on
        return [f"{marlin.HUB_KERNEL} could not be loaded ({type(error).__name__}: {error})"]
    return []


class CUDAKernels(PortableKernels):
    name = "cuda: fp8 torch._scaled_mm (sm89+), int4 Marlin (sm80+), else dequantize + GEMM"

    def pack_int4(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> None:
        n, k = codes.shape
        dtype = layer.compute_dtype
        zero_points = marlin.integer_zero_points(scales, zeros)
        reasons = marlin_reasons(codes, group_size, dtype, zero_points is not None)
        if reasons:
            for reason in reasons:
                report_fallback(f"int4 {n}x{k} weight", f"Marlin: {reason}")
            super().pack_int4(layer, codes, scales, zeros, group_size)
            return
        single_group = group_size == k
        replace_weight(layer, marlin_qweight=marlin.marlin_weight(codes),
                       marlin_scales=marlin.marlin_scales(scales.t().to(dtype).contiguous(), single_group),
                       marlin_zeros=marlin.marlin_zero_points(zero_points.t().contiguous()),
                       marlin_workspace=torch.zeros(marlin.workspace_size(n, codes.device), dtype=torch.int32,
                                                    device=codes.device),
                       marlin_no_act_order=torch.empty(0, dtype=torch.int32, device=codes.device))
        layer.weight_format, layer.marlin_single_group = "int4_marlin", single_group

    def pack_fp8(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        n, k = codes.shape
        reasons = fp8_device_reasons(codes.device) + fp8_shape_reasons(n, k)
        if reasons:
            for reason in reasons:
                report_fallback(f"fp8 {n}x{k} weight", f"torch._scaled_mm: {reason}")
            super().pack_fp8(layer, codes, scales)
            return
        scales = scales.float().reshape(-1)
        per_tensor = bool((scales == scales[0]).all())
        replace_weight(layer, fp8_weight_t=codes.contiguous().t(),  # [K, N] column-major: a view
                       fp8_scales=scales, fp8_tensor_scale=scales[0].clone(),
                       fp8_unit_scale=torch.ones((), dtype=torch.float32, device=codes.device))
        layer.weight_format, layer.fp8_per_tensor = "fp8_scaled_mm", per_tensor

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if layer.weight_format == "fp8_scaled_mm":
            return layer.fp8_weight_t.t().to(dtype) * layer.fp8_scales.to(dtype).unsqueeze(-1)
        if layer.weight_format == "int4_marlin":
            scales = marlin.unmarlin_scales(layer.marlin_scales, layer.marlin_single_group).t()
            zero_points = marlin.unmarlin_zero_points(layer.marlin_zeros).t()
            return dequantize_int4(marlin.unmarlin_weight(layer.marlin_qweight), scales, (8 - zero_points) * scales,
                                   dtype)
        return super().dense_weight(layer, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fmt = layer.weight_format
        fast = (fmt == "fp8_scaled_mm" and x.dtype in SCALED_MM_DTYPES) or (
            fmt == "int4_marlin" and x.dtype == layer.marlin_scales.dtype)
        if not fast or x.numel() == 0:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1])
        out = self._scaled_mm(layer, flat) if fmt == "fp8_scaled_mm" else self._marlin(layer, flat)
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

    @staticmethod
    def _marlin(layer: nn.Module, flat: torch.Tensor) -> torch.Tensor:
        """[M, K] activations -> [M, N]: uint4 codes with integer zero points, contiguous groups
        (act order is already applied to the activations by the GPTQ method), full K on this rank."""
        ops = marlin.load_ops()
        none = layer.marlin_no_act_order
        m, k = flat.shape
        return ops.gptq_marlin_gemm(a=flat.contiguous(), c=None, b_q_weight=layer.marlin_qweight,
                                    b_scales=layer.marlin_scales, global_scale=None, b_zeros=layer.marlin_zeros,
                                    g_idx=none, perm=none, workspace=layer.marlin_workspace,
                                    b_q_type=ops.scalar_types.uint4, size_m=m, size_n=layer.marlin_scales.shape[1],
                                    size_k=k, is_k_full=True, use_atomic_add=False, use_fp32_reduce=True,
                                    is_zp_float=False)
