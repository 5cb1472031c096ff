"""The CPU backend's weight-only int8 / int4 kernels for few rows (C++, built at first use).

torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are written for
many rows; at decode (one to a few rows per step) they read the weight well below memory
bandwidth. csrc/quant_gemv.cpp streams each output row's codes once per step, decodes them in
registers (int4: one zero-extending load, a mask and a shift per 64 codes) and multiplies them with
up to 4 activation rows at a time: AVX512-BF16 `dpbf16` for bf16 activations, AVX512 FMA for
fp32, plain loops elsewhere. Rows of the weight are split over ATen's thread pool.

Ops (torch.ops.textgen_quant, with fake implementations so they trace under torch.compile):
- `int4_linear(x, packed, scales_zeros, group_size)`: x [M, K] bf16/fp32 -> [M, N] in x's dtype;
- `int8_linear(x, codes, scales)`: codes int8 [N, K], scales [N] (bf16/fp32);
- `int4_dequantize(packed, scales_zeros, group_size, out)`, `int8_dequantize(codes, scales, out)`:
  the dense weight (bf16 or fp32), for large M.
The int4 layout (`pack_int4`) is described at the top of the C++ file.

Built with torch.utils.cpp_extension and `-march=native` into torch's extension cache
(TORCH_EXTENSIONS_DIR): the first start on a machine compiles it (about a minute on 2 cores).
Where it cannot be built (no C++ compiler or ninja) or `TEXTGEN_CPU_QUANT_GEMV=0`, `build_problem()`
says why and the CPU kernels keep torch's packed kernels.
"""
from __future__ import annotations

import functools

import torch

from textgen.backends.cpu import cpp_build

ENV_SWITCH = "TEXTGEN_CPU_QUANT_GEMV"


@functools.cache
def build_problem() -> str | None:
    """None once the ops are loaded (built if needed); else why they cannot be."""
    problem = cpp_build.build_problem("textgen_cpu_quant_gemv", "quant_gemv.cpp", ENV_SWITCH)
    if problem is None:
        _register_fakes()
    return problem


def available() -> bool:
    return build_problem() is None


def isa() -> str:
    """The instruction path the build compiled: avx512-bf16, avx512 or portable."""
    return torch.ops.textgen_quant.isa()


def _register_fakes() -> None:
    @torch.library.register_fake("textgen_quant::int4_linear")
    def _int4_linear(x, packed, scales_zeros, group_size):
        return x.new_empty((x.shape[0], packed.shape[0]))

    @torch.library.register_fake("textgen_quant::int8_linear")
    def _int8_linear(x, codes, scales):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("textgen_quant::int4_dequantize")
    def _int4_dequantize(packed, scales_zeros, group_size, out):
        return None

    @torch.library.register_fake("textgen_quant::int8_dequantize")
    def _int8_dequantize(codes, scales, out):
        return None


def int4_block(group_size: int) -> int:
    """Codes per packed block: 64 when the group size allows, else 32 (see csrc/quant_gemv.cpp)."""
    return 64 if group_size % 64 == 0 else 32


def int4_packable(k: int, group_size: int) -> bool:
    return group_size > 0 and group_size % 32 == 0 and k % group_size == 0


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> the kernel's uint8 [N, K / 2]: per block of B codes, byte j
    holds code j (low nibble) and code j + B/2 (high nibble)."""
    n, k = codes.shape
    block = int4_block(group_size)
    blocks = codes.to(torch.uint8).reshape(n, k // block, 2, block // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """`pack_int4` reversed: uint8 codes [N, K]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    block = int4_block(group_size)
    halves = packed.reshape(n, k // block, 1, block // 2)
    return torch.cat((halves & 0xF, halves >> 4), dim=2).reshape(n, k)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.textgen_quant.int4_linear(x, packed, scales_zeros, group_size)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.textgen_quant.int8_linear(x, codes, scales)


def int4_dequantize(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
                    out: torch.Tensor) -> torch.Tensor:
    torch.ops.textgen_quant.int4_dequantize(packed, scales_zeros, group_size, out)
    return out


def int8_dequantize(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    torch.ops.textgen_quant.int8_dequantize(codes, scales, out)
    return out
