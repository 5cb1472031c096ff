"""CPU kernels for quantized linear layers: torch's packed weight-only GEMMs for small M,
dequantize + GEMM for large M.

`aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` stream 1 or 0.5 byte per weight
and win while a step is bandwidth-bound (decode: M = a few rows); their inner loops are not
blocked for many rows, so above `MAX_PACKED_ROWS` rows the weight is dequantized to the
activation dtype and a regular GEMM runs. Measured with `python benchmarks/quantization_crossover.py
--rows 1 2 4 8 16 32 64 128 256 512` (2026-12-02, AMD EPYC 2 threads, torch 2.13.0, bf16, shared
and loaded machine): the packed kernels beat bf16 `F.linear` at every M up to 512 (2048x768:
M=1 115/147 us int8/int4 vs 209 us; M=512 68/93 ms vs 192 ms) and dequantize + GEMM never won
(its int4 unpack alone costs more than the packed GEMM), so the packed path runs up to 512 rows.
An earlier session on another VM saw the packed kernels lose 3x at M=64 (ENVIRONMENT.md 5b):
rerun the script on the serving machine and set the constant from its first losing M.

int4 packing (`_convert_weight_to_int4pack_for_cpu`, uint8 [N, K/2]) stores blocks of B output
rows as [K, B/2] bytes, rows r < B/2 in the low nibbles and r + B/2 in the high ones, B = 64 on
an AVX-512 build and 32 on AVX2 (a last partial block has yet another layout, so N must be a
multiple of B); `_unpack_int4` reverses that for the dequantize path, with the B found by
probing the kernel once per process.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.quantization.kernels import PortableKernels, dequantize_int4, replace_weight

MAX_PACKED_ROWS = 512  # rows (tokens) per step up to which the packed kernels run; measured, see above
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes the int4 kernel takes
INT4_BLOCK_CANDIDATES = (64, 32)  # rows per packed block: AVX-512, AVX2


def int4_reasons(n: int, k: int, group_size: int) -> list[str]:
    """Why the CPU int4 kernel cannot hold an [n, k] weight with this group size (empty = it can)."""
    reasons = []
    if group_size not in INT4_GROUP_SIZES:
        reasons.append(f"group size {group_size} is not one of {INT4_GROUP_SIZES}")
    if k % group_size:
        reasons.append(f"input size {k} is not a multiple of the group size {group_size}")
    block = int4_block_n() or INT4_BLOCK_CANDIDATES[-1]
    if n % block:
        reasons.append(f"output size {n} is not a multiple of {block}")
    return reasons


def _unpack_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The kernel's uint8 [N, K/2] layout back to codes [N, K] (see the module docstring)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(n // block, k, block // 2)
    codes = torch.cat((blocks & 0xF, blocks >> 4), dim=-1)  # [N/B, K, B]
    return codes.transpose(1, 2).reshape(n, k)


@functools.cache
def int4_block_n() -> int | None:
    """The rows per block of this torch build's int4 packing, None when no known layout matches
    (then the codes are kept beside the packed weight for the dequantize path)."""
    codes = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if packed.shape != (128, 64):
        return None
    return next((b for b in INT4_BLOCK_CANDIDATES if torch.equal(_unpack_int4(packed, b).to(torch.int32), codes)),
                None)


def int4_layout_understood() -> bool:
    return int4_block_n() is not None


class CPUKernels(PortableKernels):
    name = f"cpu packed int4/int8 up to {MAX_PACKED_ROWS} rows"

    def pack_int4(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> None:
        n, k = codes.shape
        if int4_reasons(n, k, group_size) or layer.compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            super().pack_int4(layer, codes, scales, zeros, group_size)
            return
        dtype = layer.compute_dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()  # [G, N, 2]
        buffers = {"int4_packed": packed, "int4_scales_zeros": scales_zeros}
        if not int4_layout_understood():
            buffers["int4_codes"] = codes
        replace_weight(layer, **buffers)
        layer.weight_format, layer.int4_group_size = "int4_cpu", group_size

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        if layer.weight_format != "int4_cpu":
            return super().dense_weight(layer, dtype)
        codes = getattr(layer, "int4_codes", None)
        codes = _unpack_int4(layer.int4_packed, int4_block_n()) if codes is None else codes
        sz = layer.int4_scales_zeros
        return dequantize_int4(codes, sz[..., 0].t(), sz[..., 1].t(), dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_PACKED_ROWS or layer.weight_format not in ("int4_cpu", "int8") or x.dtype != layer.compute_dtype:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        if layer.weight_format == "int4_cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.int4_packed, layer.int4_group_size,
                                                              layer.int4_scales_zeros)
        else:
            out = torch._weight_int8pack_mm(flat, layer.int8_codes, layer.int8_scales)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
