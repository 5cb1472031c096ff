"""Decode throughput of the transformers fallback against the native Llama, same weights, same run.

    python benchmarks/fallback.py [--batch-sizes 1 32] [--new-tokens 64] [--prompt-len 64]

Both engines load the ~100M Llama of common.py; the second is forced through the transformers
fallback (`TEXTGEN_MODEL_IMPL=transformers`: transformers' LlamaForCausalLM with textgen's paged
attention as its attention function). Decode tokens/s is measured as in decode_throughput.py
(total minus a 1-token run, best of --repeats alternating runs), and the ratio fallback / native
printed per batch size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, describe_machine, machine  # noqa: E402
from decode_throughput import best_rates, time_textgen  # noqa: E402


def build_engines(path: Path, dtype: str, num_kv_blocks: int) -> dict[str, object]:
    from textgen.core import LLM

    engines = {}
    for name, impl in (("native", "native"), ("fallback", "transformers")):
        os.environ["TEXTGEN_MODEL_IMPL"] = impl
        try:
            engines[name] = LLM(str(path), backend="cpu", dtype=dtype, num_kv_blocks=num_kv_blocks)
        finally:
            del os.environ["TEXTGEN_MODEL_IMPL"]
        line = next(line for line in engines[name].engine.startup_lines if "model path:" in line)
        print(f"# {name}: {line}")
    return engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-kv-blocks", type=int, default=512, help="per engine (two engines share the memory)")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama-100m"))
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    path = build_random_llama(args.model_dir)
    engines = build_engines(path, args.dtype, args.num_kv_blocks)
    vocab = engines["native"].engine.runner.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(f"# fallback vs native decode, ~100M-param Llama (random weights), {args.dtype}, {machine()}")
    print(f"# prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print("| batch | native tok/s | fallback tok/s | fallback / native |")
    print("|---:|---:|---:|---:|")
    rows = []
    for bsz in args.batch_sizes:
        prompts = torch.randint(10, vocab, (bsz, args.prompt_len), generator=gen).tolist()
        rates = best_rates({name: (time_textgen, llm) for name, llm in engines.items()}, prompts,
                           args.new_tokens, args.repeats)
        native, fallback = rates["native"], rates["fallback"]
        print(f"| {bsz} | {native:.1f} | {fallback:.1f} | {fallback / native:.2f}x |", flush=True)
        rows.append({"batch_size": bsz, "native_tokens_per_s": native, "fallback_tokens_per_s": fallback})
    if args.out is not None:
        from report import write_json

        write_json(args.out, {"machine": describe_machine(), "settings": vars(args) | {"out": str(args.out)},
                              "results": rows})


if __name__ == "__main__":
    main()
