"""The CPU backend's dense linear kernel (oneDNN on prepacked weights) against plain F.linear.

    python benchmarks/dense_linear.py [--rows 1 2 4 16 64] [--dtype bfloat16 float32] [--threads N]

One "pass" multiplies M input rows into every linear weight of the ~100M Llama of common.py (14
layers of q/k/v, o, gate/up and down projections plus the 8k x 768 LM head, 190 MB in bf16), each
weight a distinct tensor, so the weights stream from memory as in a decode step. Prints ms per
pass, weight bytes streamed per second, and prepacked / F.linear speed; best of --repeats
alternating rounds (a busy moment of a shared machine hits both).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)] * 14 + [(8192, 768)]  # [N, K] per linear


def layers(dtype: torch.dtype, packed: bool, gen: torch.Generator) -> list[nn.Module]:
    from textgen.backends.cpu.dense_linear import OneDNNPackedLinear

    out = []
    for n, k in SHAPES:
        layer = nn.Module()
        layer.weight = nn.Parameter(torch.randn(n, k, generator=gen).to(dtype), requires_grad=False)
        if packed:
            OneDNNPackedLinear().prepare(layer, shared=False)
        out.append(layer)
    return out


def main() -> None:
    from textgen.backends.cpu.dense_linear import OneDNNPackedLinear, packing_problem

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (with --threads 1, a fairer figure on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    kernel = OneDNNPackedLinear()
    print(f"{torch.get_num_threads()} threads, {args.clock} clock; ms per pass over {len(SHAPES)} weights "
          f"(best of {args.repeats})")
    print("| dtype | M | F.linear ms | GB/s | prepacked ms | GB/s | prepacked / F.linear speed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtype:
        dtype = getattr(torch, name)
        if packing_problem(dtype):
            print(f"| {name} | - | prepacking unavailable: {packing_problem(dtype)} |")
            continue
        plain, packed = layers(dtype, False, gen), layers(dtype, True, gen)
        nbytes = sum(m.weight.shape[0] * m.weight.shape[1] * m.weight.element_size() for m in plain)
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, generator=gen).to(dtype) for _, k in SHAPES}
            passes = {
                "plain": lambda: [F.linear(inputs[m.weight.shape[1]], m.weight) for m in plain],
                "packed": lambda: [kernel.apply(m, inputs[m.weight.shape[1]], None) for m in packed],
            }
            best = {label: float("inf") for label in passes}
            for fn in passes.values():
                fn()
            for _ in range(args.repeats):
                for label, fn in passes.items():
                    start = clock()
                    fn()
                    best[label] = min(best[label], clock() - start)
            ref, got = best["plain"], best["packed"]
            print(f"| {name} | {rows} | {ref * 1e3:.2f} | {nbytes / ref / 1e9:.1f} | {got * 1e3:.2f} | "
                  f"{nbytes / got / 1e9:.1f} | {ref / got:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
