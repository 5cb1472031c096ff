"""Decode throughput of textgen against transformers `generate`, same model, same script.

    python benchmarks/decode_throughput.py [--batch-sizes 1 32] [--new-tokens 64] [--prompt-len 64]

Prints decode tokens/s at each batch size for both and their ratio. Decode time is the total time
minus the time of a 1-token run (the prefill), for both engines alike. Each figure is the best of
--repeats runs, the two engines taking turns, so a slow moment of a shared machine hits both.
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
from common import build_random_llama, describe_machine, machine  # noqa: E402


def time_textgen(llm, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    outs = llm.generate_ids(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


def time_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=3)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def decode_rate(timer, engine, prompts, new_tokens: int) -> float:
    prefill = timer(engine, prompts, 1)
    total = timer(engine, prompts, new_tokens)
    return len(prompts) * (new_tokens - 1) / max(total - prefill, 1e-9)


def best_rates(engines: dict[str, tuple], prompts, new_tokens: int, repeats: int) -> dict[str, float]:
    """The best decode rate of each engine over `repeats` alternating runs (after a warm-up)."""
    for timer, engine in engines.values():
        timer(engine, prompts, 2)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, (timer, engine) in engines.items():
            rates[name].append(decode_rate(timer, engine, prompts, new_tokens))
    return {name: max(r) for name, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama-100m"))
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from textgen.core import LLM

    path = build_random_llama(args.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).eval()
    params = sum(p.numel() for p in hf.parameters())
    llm = LLM(str(path), backend="cpu", dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"# decode throughput, {params / 1e6:.0f}M-param Llama (random weights), {args.dtype}, {machine()}")
    print(f"# prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print("| batch | transformers tok/s | textgen tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    rows = []
    for bsz in args.batch_sizes:
        prompts = torch.randint(10, hf.config.vocab_size, (bsz, args.prompt_len), generator=gen).tolist()
        rates = best_rates({"transformers": (time_hf, hf), "textgen": (time_textgen, llm)}, prompts,
                           args.new_tokens, args.repeats)
        hf_rate, tg_rate = rates["transformers"], rates["textgen"]
        print(f"| {bsz} | {hf_rate:.1f} | {tg_rate:.1f} | {tg_rate / hf_rate:.2f}x |", flush=True)
        rows.append({"batch_size": bsz, "transformers_tokens_per_s": hf_rate, "textgen_tokens_per_s": tg_rate})
    if args.out is not None:
        from report import write_json

        write_json(args.out, {"machine": describe_machine(), "params": params, "settings": vars(args) | {"out": str(args.out)},
                              "results": rows})


if __name__ == "__main__":
    main()
