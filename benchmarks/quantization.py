"""Batch-1 decode speed and weight bytes of int4 / int8 weight-only against bf16, in one run.

`python benchmarks/quantization.py [--tokens 32]` builds the ~100M Llama of benchmarks/common.py
(random weights, cached under /tmp), loads it three ways through the CPU backend's registry
(bf16, --quantize int8, --quantize int4, all bf16 activations), decodes `--tokens` greedy tokens
at batch 1 (one prefill of 8 tokens, then one step per token through the paged model) and prints
tokens/s and weight MiB with their ratios to bf16. Targets: int4 >= 2x bf16 tokens/s, weights
<= 0.3x. A shared machine drifts: compare the ratios of one run, not figures across runs."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import build_random_llama, machine  # noqa: E402
from tests.quantization.helpers import greedy, load_quantized  # noqa: E402


def run(path: str, method: str | None, tokens: int) -> tuple[float, int]:
    loaded = load_quantized(path, method, dtype="bfloat16")
    prompt = list(range(10, 18))
    greedy(loaded.model, prompt, 2)  # warm-up
    start = time.perf_counter()
    greedy(loaded.model, prompt, tokens)
    return tokens / (time.perf_counter() - start), loaded.weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model-dir", default="/tmp/textgen-bench-llama-100m")
    args = parser.parse_args()
    path = str(build_random_llama(args.model_dir))
    print(machine())
    results = {m or "bf16": run(path, m, args.tokens) for m in (None, "int8", "int4")}
    base_tps, base_bytes = results["bf16"]
    print("method  tok/s   x bf16   weights MiB  x bf16")
    for name, (tps, size) in results.items():
        print(f"{name:6} {tps:7.1f} {tps / base_tps:7.2f}x {size / 2**20:11.1f} {size / base_bytes:7.2f}x")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
