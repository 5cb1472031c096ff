"""CPU kernels for quantized linear layers, chosen by the rows M of each call.

int4 (`--quantize int4` and every int4 checkpoint format) and int8 layers take, by M:
- M <= `GEMV_ROWS[fmt]`: the backend's own C++ kernels (backends/cpu/quant_gemv.py,
  csrc/quant_gemv.cpp), which stream the packed codes once per step and decode them in registers;
  int4 is stored in their layout (uint8 [N, K/2] plus [N, G, 2] scales and zeros).
- larger M: the weight is dequantized to the activation dtype by the same extension and oneDNN's
  GEMM runs (compute-bound there; the dequantize is one pass over the weight). torch's packed
  kernels lost to it from M = 16 to 256 (int8 `_weight_int8pack_mm` 11.7 vs 7.2 ms per layer at
  M = 64, int4 12.8 vs 7.1; bf16 `F.linear` 6.1), and so did dequantizing in L2-sized row tiles.
Where the extension cannot be built (or TEXTGEN_CPU_QUANT_GEMV=0), or a shape or dtype is outside
it (int4 group size not a multiple of 32, fp16 activations), the layers keep torch's packed
kernels as before: `aten._weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` up to
`MAX_PACKED_ROWS` rows, dequantize + GEMM above.

The thresholds come from `python benchmarks/quantization_crossover.py` (best of alternating runs
per (shape, M) over the ~100M Llama's four projection shapes; figures beside `GEMV_ROWS`).
Rerun it on the serving machine and set them from the first M where the GEMV kernel loses.

torch's int4 packing (`_convert_weight_to_int4pack_for_cpu`, uint8 [N, K/2]) stores blocks of B output
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

from textgen.backends.cpu import quant_gemv
from textgen.core.quantization.kernels import PortableKernels, dequantize_int4, replace_weight

MAX_PACKED_ROWS = 512  # rows per call up to which torch's packed kernels run (where they serve)
# Rows per call up to which the C++ GEMV kernels run, per weight format. Measured (crossover
# script, 1 thread, 2026-12-02, load average ~9, us per layer): int4 M=12 1664 vs dequantize + GEMM
# 2432 (bf16 2049), M=16 3167 vs 2367; int8 M=8 1840 vs 1980 (bf16 1998), M=12 3174 vs 3072.
GEMV_ROWS = {"int4_gemv": 12, "int8": 8}
GEMV_DTYPES = (torch.bfloat16, torch.float32)
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
    name = "cpu"

    def describe(self) -> str:
        problem = quant_gemv.build_problem()
        if problem is None:
            rows = ", ".join(f"{fmt.split('_')[0]} up to {m} rows" for fmt, m in GEMV_ROWS.items())
            return f"cpu {quant_gemv.isa()} GEMV ({rows}), dequantize + GEMM above"
        return f"cpu packed int4/int8 up to {MAX_PACKED_ROWS} rows (GEMV kernel off: {problem})"

    def pack_int4(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> None:
        n, k = codes.shape
        dtype = layer.compute_dtype
        if dtype in GEMV_DTYPES and quant_gemv.int4_packable(k, group_size) and quant_gemv.available():
            # scales and zeros in bf16 beside bf16 activations (half the bytes), fp32 beside fp32
            sz_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
            replace_weight(layer, int4_packed=quant_gemv.pack_int4(codes, group_size),
                           int4_scales_zeros=torch.stack((scales, zeros), dim=-1).to(sz_dtype).contiguous())
            layer.weight_format, layer.int4_group_size = "int4_gemv", group_size
            return
        if int4_reasons(n, k, group_size) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            super().pack_int4(layer, codes, scales, zeros, group_size)
            return
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()  # [G, N, 2]
        buffers = {"int4_packed": packed, "int4_scales_zeros": scales_zeros}
        if not int4_layout_understood():
            buffers["int4_codes"] = codes
        replace_weight(layer, **buffers)
        layer.weight_format, layer.int4_group_size = "int4_cpu", group_size

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        fmt = layer.weight_format
        if fmt in ("int4_gemv", "int8") and (fmt == "int4_gemv" or quant_gemv.available()):
            out_dtype = dtype if dtype in GEMV_DTYPES else torch.float32
            if fmt == "int4_gemv":
                packed = layer.int4_packed
                out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=out_dtype)
                quant_gemv.int4_dequantize(packed, layer.int4_scales_zeros, layer.int4_group_size, out)
            else:
                out = quant_gemv.int8_dequantize(layer.int8_codes, layer.int8_scales,
                                                 torch.empty(layer.int8_codes.shape, dtype=out_dtype))
            return out.to(dtype)
        if fmt != "int4_cpu":
            return super().dense_weight(layer, dtype)
        codes = getattr(layer, "int4_codes", None)
        codes = _unpack_int4(layer.int4_packed, int4_block_n()) if codes is None else codes
        sz = layer.int4_scales_zeros
        return dequantize_int4(codes, sz[..., 0].t(), sz[..., 1].t(), dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fmt = layer.weight_format
        rows = x.numel() // x.shape[-1]
        if fmt not in ("int4_gemv", "int4_cpu", "int8") or x.dtype != layer.compute_dtype:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        gemv = x.dtype in GEMV_DTYPES and quant_gemv.available()
        if rows > (GEMV_ROWS.get(fmt, 0) if gemv else MAX_PACKED_ROWS) or (fmt == "int4_gemv" and not gemv):
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)  # many rows: compute-bound GEMM
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        if fmt == "int4_gemv":
            out = quant_gemv.int4_linear(flat, layer.int4_packed, layer.int4_scales_zeros, layer.int4_group_size)
        elif gemv:
            out = quant_gemv.int8_linear(flat, layer.int8_codes, layer.int8_scales)
        elif fmt == "int4_cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.int4_packed, layer.int4_group_size,
                                                              layer.int4_scales_zeros)
        else:
            out = torch._weight_int8pack_mm(flat, layer.int8_codes, layer.int8_scales)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
