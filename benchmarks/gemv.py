"""The CPU backend's small-M linear kernel (backends/cpu/csrc/gemv.cpp) against F.linear (oneDNN).

    python benchmarks/gemv.py [--rows 1 2 4 8] [--dtype bfloat16 float32] [--threads N]

One "step" multiplies M input rows into every linear weight of the ~100M Llama of common.py
(14 layers of q/k/v, o, gate/up and down projections plus the tied 8k x 768 LM head, 190 MB in
bf16), each weight a distinct tensor, so the weights stream from memory as in a decode step and
not from cache. Prints ms per step, the weight bytes streamed per second, and kernel / F.linear
speed; best of --repeats alternating rounds. Sets `MAX_GEMV_ROWS` in backends/cpu/gemv.py: the
largest M where the kernel still wins.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)] * 14 + [(8192, 768)]  # [N, K] per linear


def step_fn(kernel, weights: list[torch.Tensor], rows: int, dtype: torch.dtype):
    inputs = {k: torch.randn(rows, k, dtype=dtype) for k in {w.shape[1] for w in weights}}

    def step() -> None:
        for w in weights:
            kernel(inputs[w.shape[1]], w)

    return step


def main() -> None:
    from textgen.backends.cpu.gemv import build_problem

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (with --threads 1, a fairer figure on a busy machine)")
    args = ap.parse_args()
    problem = build_problem()
    if problem:
        sys.exit(f"the gemv kernel is unavailable: {problem}")
    torch.set_num_threads(args.threads)
    kernels = {"F.linear": F.linear, "gemv": torch.ops.textgen_cpu_gemv.small_m_linear}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"{torch.get_num_threads()} threads, {args.clock} clock; ms per step over {len(SHAPES)} weights (best of {args.repeats})")
    print("| dtype | M | F.linear ms | GB/s | gemv ms | GB/s | gemv / F.linear speed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtype:
        dtype = getattr(torch, name)
        weights = [torch.randn(n, k, generator=gen).to(dtype) for n, k in SHAPES]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for rows in args.rows:
            steps = {label: step_fn(fn, weights, rows, dtype) for label, fn in kernels.items()}
            best = {label: float("inf") for label in kernels}
            for fn in steps.values():
                fn()
            for _ in range(args.repeats):
                for label, fn in steps.items():
                    start = clock()
                    fn()
                    best[label] = min(best[label], clock() - start)
            ref, got = best["F.linear"], best["gemv"]
            print(f"| {name} | {rows} | {ref * 1e3:.2f} | {nbytes / ref / 1e9:.1f} | {got * 1e3:.2f} | "
                  f"{nbytes / got / 1e9:.1f} | {ref / got:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
