"""Which CPU kernel computes a weight-only int8 / int4 linear layer fastest at each row count M.

`python benchmarks/quantization_crossover.py [--threads 1] [--rows 1 2 4 ...] [--repeats 15]`
times, for one decoder layer of the ~100M Llama of benchmarks/common.py (the projections
1280x768 qkv, 768x768 o, 4096x768 gate_up, 768x2048 down; `--copies` copies of each so the
weights stream from memory as in a real step, not from cache), per M and summed over the four
shapes, in us per layer (best of `--repeats` rounds, the methods alternating inside each round):
- bf16: `F.linear` on the bf16 weight (the unquantized baseline);
- int8 gemv / int4 gemv: textgen's C++ kernels (backends/cpu/quant_gemv.py), int4 group 128;
- int8 torch / int4 torch: `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`;
- int8 deq / int4 deq: dequantize to bf16 with the C++ ops, then `F.linear`.
GB/s columns: the method's weight bytes (codes, scales, zeros) over its time. The first M where a
GEMV kernel loses to the best other path sets `GEMV_ROWS` in backends/cpu/quant_kernels.py; the
faster of torch / deq above it sets the large-M path."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from textgen.backends.cpu import quant_gemv  # noqa: E402
from textgen.core.quantization.kernels import quantize_int4_groups, quantize_int8_channels  # noqa: E402

SHAPES = ((1280, 768), (768, 768), (4096, 768), (768, 2048))
GROUP = 128


def weights(n: int, k: int, copies: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, generator=gen) * 0.02
        codes, scales, zeros = quantize_int4_groups(w, GROUP)
        codes8, scales8 = quantize_int8_channels(w)
        out.append({
            "bf16": w.bfloat16(),
            "int4": quant_gemv.pack_int4(codes, GROUP),
            "int4_sz": torch.stack((scales, zeros), -1).bfloat16().contiguous(),
            "int4_torch": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
            "int4_torch_sz": torch.stack((scales.t(), zeros.t()), -1).bfloat16().contiguous(),
            "int8": codes8, "int8_s": scales8.bfloat16(),
        })
    return out


def methods(x: torch.Tensor, ws: list[dict[str, torch.Tensor]]) -> dict[str, callable]:
    def deq4(w):
        dense = torch.empty(w["int4"].shape[0], w["int4"].shape[1] * 2, dtype=torch.bfloat16)
        return F.linear(x, quant_gemv.int4_dequantize(w["int4"], w["int4_sz"], GROUP, dense))

    def deq8(w):
        dense = torch.empty(w["int8"].shape, dtype=torch.bfloat16)
        return F.linear(x, quant_gemv.int8_dequantize(w["int8"], w["int8_s"], dense))

    return {
        "bf16": lambda: [F.linear(x, w["bf16"]) for w in ws],
        "int8 gemv": lambda: [quant_gemv.int8_linear(x, w["int8"], w["int8_s"]) for w in ws],
        "int8 torch": lambda: [torch._weight_int8pack_mm(x, w["int8"], w["int8_s"]) for w in ws],
        "int8 deq": lambda: [deq8(w) for w in ws],
        "int4 gemv": lambda: [quant_gemv.int4_linear(x, w["int4"], w["int4_sz"], GROUP) for w in ws],
        "int4 torch": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, w["int4_torch"], GROUP,
                                                                          w["int4_torch_sz"]) for w in ws],
        "int4 deq": lambda: [deq4(w) for w in ws],
    }


def bytes_of(name: str, n: int, k: int) -> int:
    if name == "bf16":
        return 2 * n * k
    if name.startswith("int8"):
        return n * k + 2 * n
    return n * k // 2 + 4 * n * (k // GROUP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--copies", type=int, default=6, help="copies of each weight, cycled (defeats caches)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256])
    parser.add_argument("--only", nargs="+", help="method names to time (default: all)")
    args = parser.parse_args()
    problem = quant_gemv.build_problem()
    if problem:
        sys.exit(f"the GEMV kernels are unavailable: {problem}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    per_shape = {(n, k): weights(n, k, args.copies, gen) for n, k in SHAPES}
    print(f"torch {torch.__version__}, {args.threads} thread(s), kernels {quant_gemv.isa()}, "
          f"load average {os.getloadavg()}; us per layer (4 projections), best of {args.repeats}")
    names = None
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=gen).bfloat16() for _, k in SHAPES}
        fns = {shape: methods(xs[shape[1]], ws) for shape, ws in per_shape.items()}
        names = [n for n in fns[SHAPES[0]] if not args.only or n in args.only]
        best = {(name, shape): float("inf") for name in names for shape in SHAPES}
        for _ in range(args.repeats + 1):
            for name in names:
                for shape in SHAPES:
                    start = time.perf_counter()
                    fns[shape][name]()
                    elapsed = (time.perf_counter() - start) / args.copies
                    best[name, shape] = min(best[name, shape], elapsed)
        if m == args.rows[0]:
            print("   M " + "".join(f"{name:>12}" for name in names))
        totals = {name: sum(best[name, shape] for shape in SHAPES) for name in names}
        print(f"{m:4d} " + "".join(f"{totals[name] * 1e6:12.0f}" for name in names))
        if m == 1:
            gbs = {name: sum(bytes_of(name, n, k) for n, k in SHAPES) / totals[name] / 1e9 for name in names}
            print("GB/s " + "".join(f"{gbs[name]:12.1f}" for name in names))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
