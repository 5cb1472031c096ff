"""Where a decode step's time goes, by op: the profile issue 13 asks for, before and after a change.

    python benchmarks/step_profile.py [--batch 64] [--context 256] [--dtype bfloat16] [--steps 16]

Starts the engine on the ~100M Llama of common.py, prefills `batch` prompts of `context` tokens,
then profiles `--steps` decode steps with torch.profiler and prints the ops by self CPU time,
grouped as the RESULTS table reports them (linear, attention kernel, the rest of the model, and
everything outside the model forward: scheduling, input preparation, sampling). Wall ms per step
comes from the same steps without the profiler.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, machine  # noqa: E402

GROUPS = (
    ("linear (weights GEMM/GEMV)", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_weight_int",
                                    "mkldnn::_linear_pointwise")),
    ("attention kernel", ("textgen_cpu::", "aten::scaled_dot_product", "aten::_scaled_dot", "aten::_flash")),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama-100m"))
    args = ap.parse_args()
    from textgen.core import LLM

    path = build_random_llama(args.model_dir)
    llm = LLM(str(path), backend="cpu", dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 8000, (args.batch, args.context), generator=gen).tolist()
    new = args.steps + 1

    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate_ids(prompts, max_new_tokens=n, ignore_eos=True)
        return time.perf_counter() - t

    run(2)
    prefill = min(run(1) for _ in range(2))
    total = min(run(new) for _ in range(2))
    step_ms = (total - prefill) / (new - 1) * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof_prefill:
        run(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(new)
    print(f"# decode step profile: batch {args.batch}, context {args.context}, {args.dtype}, {machine()}")
    print(f"# wall ms per decode step (no profiler): {step_ms:.1f}")

    def self_times(p) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in p.key_averages():
            out[e.key] = out.get(e.key, 0.0) + e.self_cpu_time_total
        return out

    full, pre = self_times(prof), self_times(prof_prefill)
    decode = {k: max(v - pre.get(k, 0.0), 0.0) / (new - 1) / 1e3 for k, v in full.items()}  # ms per decode step
    total_ms = sum(v for v in decode.values() if v > 0)
    grouped = {name: 0.0 for name, _ in GROUPS}
    grouped["other ops"] = 0.0
    for key, ms in decode.items():
        for name, prefixes in GROUPS:
            if key.startswith(prefixes):
                grouped[name] += ms
                break
        else:
            grouped["other ops"] += ms
    print(f"# profiled self CPU ms per decode step (all threads' op time on the calling thread): {total_ms:.1f}")
    print("| group | ms/step | share |")
    print("|---|---:|---:|")
    for name, ms in grouped.items():
        print(f"| {name} | {ms:.2f} | {ms / total_ms:.0%} |")
    print(f"\n| op | ms/step | share |\n|---|---:|---:|")
    for key, ms in sorted(decode.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {key} | {ms:.2f} | {ms / total_ms:.0%} |")


if __name__ == "__main__":
    main()
