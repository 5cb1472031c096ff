"""The CPU backend's attention kernels on decode-shaped steps, timed in one run.

    python benchmarks/cpu_attention.py [--batch-sizes 1 64] [--context 256 1024] [--dtype bfloat16]

Each step: `batch` requests decoding one token over `context` cached positions, the ~100M
Llama's head shape (12 query heads, 4 KV heads, head size 64), block size 16, shuffled blocks.
Prints ms per layer call (write K/V + attention, the metadata built once per step as the engine
does, so it is amortised over the model's 14 layers) for the portable kernel (`cpu_paged`:
gather + mask + SDPA) and textgen's C++ kernel (`cpu_fused`), and their ratio. Best of
--repeats alternating rounds, so a busy moment of a shared machine hits both.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = 14


def setup(kernel_cls, batch: int, context: int, dtype: torch.dtype, seed: int = 0):
    """(one layer's call, a step's worth of calls): the step builds its metadata once, then runs
    every layer, as the engine does."""
    from textgen.core.attention import AttentionSpec
    from textgen.testing.steps import StepRow, fill_step, kernel_metadata

    heads, kv_heads, d, bs = 12, 4, 64, 16
    spec = AttentionSpec(heads, kv_heads, d, dtype, d ** -0.5, block_size=bs)
    per = -(-context // bs)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = batch * per + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()
    rows = [StepRow(context - 1, 1, order[i * per:(i + 1) * per]) for i in range(batch)]
    cache = torch.randn(kernel_cls.kv_cache_shape(num_blocks, bs, kv_heads, d, dtype), generator=gen).to(dtype)
    q = torch.randn(batch, heads, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, d, generator=gen).to(dtype)
    kernel = kernel_cls(spec)
    step = fill_step(rows, bs)

    def one_layer() -> torch.Tensor:
        return kernel.forward(q, k, v, cache, kernel_metadata(kernel_cls, [spec], step))

    def one_step() -> None:
        meta = kernel_metadata(kernel_cls, [spec], step)
        for _ in range(LAYERS):
            kernel.forward(q, k, v, cache, meta)

    return one_layer, one_step


def main() -> None:
    from textgen.backends.cpu.attention import CPUPagedAttention
    from textgen.backends.cpu.fused_attention import CPUFusedPagedAttention, build_problem

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (with --threads 1, a fairer figure on a busy machine)")
    args = ap.parse_args()
    problem = build_problem()
    if problem:
        sys.exit(f"cpu_fused unavailable: {problem}")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    kernels = {"cpu_paged": CPUPagedAttention, "cpu_fused": CPUFusedPagedAttention}
    print(f"dtype {args.dtype}, {torch.get_num_threads()} threads, {args.clock} clock; ms per layer (write + attend, metadata amortised)")
    print(f"{'batch':>5} {'context':>7} {'cpu_paged':>10} {'cpu_fused':>10} {'ratio':>7}")
    with torch.inference_mode():
        for batch in args.batch_sizes:
            for context in args.context:
                steps = {name: setup(cls, batch, context, dtype)[1] for name, cls in kernels.items()}
                ref = setup(CPUPagedAttention, batch, context, dtype)[0]()
                got = setup(CPUFusedPagedAttention, batch, context, dtype)[0]()
                err = (ref.float() - got.float()).abs().max().item()
                best = {name: float("inf") for name in kernels}
                for name, fn in steps.items():
                    fn()
                for _ in range(args.repeats):
                    for name, fn in steps.items():
                        t = clock()
                        fn()
                        best[name] = min(best[name], (clock() - t) / LAYERS * 1e3)
                print(f"{batch:>5} {context:>7} {best['cpu_paged']:>10.3f} {best['cpu_fused']:>10.3f} "
                      f"{best['cpu_paged'] / best['cpu_fused']:>6.2f}x  (max |diff| {err:.2g})")


if __name__ == "__main__":
    main()
