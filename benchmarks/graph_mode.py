"""Graph mode against eager on the CPU backend: decode step time at batch 1 and 64, and the
startup cost of compiling the buckets, same model, same script.

    python benchmarks/graph_mode.py [--batch-sizes 1 64] [--new-tokens 32] [--dtype float32]

Decode step time = (time of a max_new_tokens run - time of a 1-token run) / (max_new_tokens - 1),
best of --repeats runs, the two engines taking turns so a slow moment of a shared machine hits
both. Graph mode compiles one bucket per batch size (`--cuda-graphs` = the batch sizes).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, describe_machine  # noqa: E402


def run_time(llm, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    outs = llm.generate_ids(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return time.perf_counter() - start


def step_ms(llm, batch: int, prompt_len: int, new_tokens: int) -> float:
    prompts = [[(7 * i + j) % 8000 + 4 for j in range(prompt_len)] for i in range(batch)]
    return (run_time(llm, prompts, new_tokens) - run_time(llm, prompts, 1)) / (new_tokens - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "textgen-bench-llama-100m"))
    args = parser.parse_args()

    from textgen.core.llm import LLM

    path = str(build_random_llama(args.model_dir))
    common = dict(backend="cpu", dtype=args.dtype, max_total_tokens=args.prompt_len + args.new_tokens + 8,
                  max_batch_size=max(args.batch_sizes))
    eager = LLM(path, graph_batch_sizes=(), **common)
    started = time.perf_counter()
    graph = LLM(path, graph_batch_sizes=tuple(args.batch_sizes), **common)
    startup = time.perf_counter() - started
    warmup = graph.engine.runner.graphs.warmup_seconds
    print(f"machine: {describe_machine()}")
    print(f"graph mode startup: {startup:.1f} s in all, of which compiling {len(args.batch_sizes)} buckets "
          f"{warmup:.1f} s")
    for batch in args.batch_sizes:
        best = {"eager": float("inf"), "graph": float("inf")}
        for _ in range(args.repeats):
            for name, llm in (("eager", eager), ("graph", graph)):
                best[name] = min(best[name], step_ms(llm, batch, args.prompt_len, args.new_tokens))
        print(f"batch {batch:3d}: eager {best['eager']:7.2f} ms/step, graph {best['graph']:7.2f} ms/step, "
              f"graph/eager speed {best['eager'] / best['graph']:.2f}x ({args.dtype})")


if __name__ == "__main__":
    main()
