"""Where the CPU's packed weight-only kernels stop beating dequantize + bf16 GEMM.

`python benchmarks/quantization_crossover.py` prints, per layer shape and rows M, the best of
`--repeats` timings (us) of: bf16 F.linear, int8 `_weight_int8pack_mm`, int4
`_weight_int4pack_mm_for_cpu` (group 128), and the dequantize + GEMM path; the first M where the
packed kernel loses sets `MAX_PACKED_ROWS` in backends/cpu/quant_kernels.py."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from textgen.backends.cpu.quant_kernels import CPUKernels
from textgen.core.quantization.kernels import quantize_int4_groups, quantize_int8_channels


def best_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    args = parser.parse_args()
    kernels = CPUKernels()
    print("shape       M   bf16_us  int8_us  int4_us  dequant+gemm_int4_us")
    for n, k in ((2048, 768),):
        w = torch.randn(n, k) * 0.02
        l4, l8 = nn.Module(), nn.Module()
        l4.compute_dtype = l8.compute_dtype = torch.bfloat16
        kernels.pack_int4(l4, *quantize_int4_groups(w, 128), 128)
        kernels.pack_int8(l8, *quantize_int8_channels(w))
        wb = w.bfloat16()
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            flat = x.contiguous()
            t_bf16 = best_us(lambda: F.linear(x, wb), args.repeats)
            t8 = best_us(lambda: torch._weight_int8pack_mm(flat, l8.int8_codes, l8.int8_scales), args.repeats)
            t4 = best_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(flat, l4.int4_packed, 128,
                                                                            l4.int4_scales_zeros), args.repeats)
            td = best_us(lambda: F.linear(x, kernels.dense_weight(l4, x.dtype)), args.repeats)
            print(f"{n}x{k:<5} {m:3d} {t_bf16:9.0f} {t8:8.0f} {t4:8.0f} {td:9.0f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
