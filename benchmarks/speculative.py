"""Speculative decoding: tokens/s at batch 1 with n-gram speculation (`--speculate K`) against
the same engine without it, in one run, on two workloads; with `--medusa`, Medusa heads too.

    python benchmarks/speculative.py [--speculate 4] [--new-tokens 96] [--reps 2] [--dtype bfloat16] [--threads 1]
    python benchmarks/speculative.py --medusa      # also a Medusa repo over the same model (below)

Model: the ~100M-parameter random-weight Llama of `common.py` (tied embeddings). Workloads:
- repetitive: greedy decoding of prompts made of a repeated phrase. A random model with tied
  embeddings copies: its continuation falls into repeating what is already in the context (a
  cycle of a few tokens), which is the case n-gram prompt lookup is for (edits, quoting,
  extraction, structured repeats). The acceptance rate is printed so the reader sees how
  repetitive the output really was.
- random: temperature-1 sampling (seeded) from prompts of random tokens: the output seldom
  repeats, so drafts are rare and mostly rejected. This measures the cost of speculation when it
  does not pay (lookups, longer verify forwards on misses).
One engine serves both sides: the baseline is the same engine with its SpecDecoder detached
(`engine.spec = None`, exactly the state of an engine started without --speculate), so weights and
KV memory are the same objects (two engine instances differed by up to 15% on identical work
here). Each prompt runs without then with speculation, --reps times, so the machine's drift (2x
within minutes on a shared VM) hits both alike; tokens/s are totals over all runs. Single requests, one at a time. `verify_steps` is the fraction of the speculating engine's
request-steps that verified drafts (what speculation costs when drafts are rejected).

--medusa: no trained heads exist for a random model, so the repo holds K heads at the Medusa
paper's initialization (one residual block with zero weights and bias, projected by the base LM
head: TGI's shared-head layout), i.e. each head proposes the base model's next token at the same
position again. That predicts well only where the output repeats one token (the repetitive
workload, on this random model); on the random workload it measures the heads' cost per step (K
LM-head projections) and the rejected verifies. It shows the machinery's cost and ceiling, not
what trained heads would accept on real text.

Why bfloat16 and one thread by default: verification is a forward over 1 + k positions, which
pays only where a forward's cost barely grows from 1 to 5 rows (decode is weight-bandwidth bound).
On a CPU with native bf16 (AVX512-BF16/AMX) and one thread that holds (a 2048x2048 linear: 1.5 ms
at 1 row, 2.0 ms at 5); in float32, or with 2 threads on a shared 2-core VM (spinning OpenMP
threads), 5 rows cost 3-10x one row and speculation loses on CPU. A GPU is the intended target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, describe_machine  # noqa: E402

REPETITIVE = ["the quick brown fox jumps over the lazy dog. " * 6, "for i in range(10): print(i)\n" * 6,
              "alpha beta gamma delta, " * 8]


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab - 10, length).tolist() for _ in range(n)]


def timed(llm, prompts: list[list[int]], params: dict) -> tuple[float, int, list[list[int]]]:
    """Seconds and generated tokens for the prompts run one at a time (batch 1)."""
    tokens, outputs = 0, []
    start = time.perf_counter()
    for ids in prompts:
        out = llm.generate_ids([ids], **params)[0]
        tokens += len(out.token_ids)
        outputs.append(out.token_ids)
    return time.perf_counter() - start, tokens, outputs


def write_medusa_repo(out: Path, base: Path, num_heads: int) -> Path:
    """A Medusa repo in TGI's shared-head layout with the paper's initialization (see above)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        hidden = f.get_slice("model.embed_tokens.weight").get_shape()[1]
    import torch

    tensors = {}
    for i in range(num_heads):
        tensors[f"{i}.0.linear.weight"] = torch.zeros((hidden, hidden))
        tensors[f"{i}.0.linear.bias"] = torch.zeros((hidden,))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "medusa_lm_head.safetensors"))
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": 1,
                                                 "base_model_name_or_path": str(base)}))
    return out


def run_workload(name: str, spec, prompts: list[list[int]], params: dict, reps: int) -> dict:
    accepted: list[int] = []  # per request-step of the speculating engine, over all its runs
    decoder, medusa = spec.engine.spec, spec.engine.runner.medusa
    spec.engine.step_observers.append(lambda record: accepted.extend(record.skipped_tokens))
    with_drafts = [0]
    schedule = spec.engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        with_drafts[0] += sum(1 for s in out.scheduled if s.spec_token_ids)
        return out

    spec.engine.scheduler.schedule = counting_schedule
    totals = {"baseline": [0.0, 0], "speculate": [0.0, 0]}
    outputs: dict[str, list[list[int]]] = {"baseline": [], "speculate": []}
    for _ in range(reps):
        for ids in prompts:
            for label in ("baseline", "speculate"):
                spec.engine.spec = decoder if label == "speculate" else None
                spec.engine.runner.medusa = medusa if label == "speculate" else None  # the heads' cost too
                seconds, tokens, outs = timed(spec, [ids], params)
                totals[label][0] += seconds
                totals[label][1] += tokens
                outputs[label] += outs
    spec.engine.step_observers.clear()
    spec.engine.scheduler.schedule = schedule
    spec.engine.spec, spec.engine.runner.medusa = decoder, medusa
    steps, acc = len(accepted), sum(accepted)
    rate = {label: tokens / seconds for label, (seconds, tokens) in totals.items()}
    same = outputs["baseline"] == outputs["speculate"] if not params.get("do_sample") else None
    return {"workload": name, "baseline_tok_s": round(rate["baseline"], 2), "speculate_tok_s": round(rate["speculate"], 2),
            "ratio": round(rate["speculate"] / rate["baseline"], 3), "accepted_drafts_per_step": round(acc / max(steps, 1), 2),
            "verify_steps": round(with_drafts[0] / max(steps, 1), 3), "greedy_outputs_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama-100m-spec"))
    parser.add_argument("--medusa", action="store_true", help="also Medusa heads at their initialization")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from textgen.core import LLM

    torch.set_num_threads(args.threads)
    path = str(build_random_llama(args.model_dir))
    common = dict(backend="cpu", dtype=args.dtype, num_kv_blocks=64, block_size=16, max_total_tokens=1024)
    engines = [("ngram", LLM(path, speculate=args.speculate, **common))]
    if args.medusa:
        repo = write_medusa_repo(Path(args.model_dir + "-medusa"), Path(path), args.speculate)
        engines.append(("medusa", LLM(str(repo), speculate=args.speculate, **common)))
    n = args.new_tokens
    results = []
    for method, spec in engines:
        vocab = spec.engine.runner.vocab_size
        results += [
            {"method": method, **run_workload("repetitive (greedy)", spec, [spec.tokenizer.encode(p) for p in REPETITIVE],
                                              dict(max_new_tokens=n, ignore_eos=True), args.reps)},
            {"method": method, **run_workload("random (sampled, T=1)", spec, random_prompts(vocab, 3, 64, seed=0),
                                              dict(max_new_tokens=n, ignore_eos=True, do_sample=True, temperature=1.0,
                                                   seed=0), args.reps)},
        ]
    report = {"machine": describe_machine(), "speculate": args.speculate, "new_tokens": n, "dtype": args.dtype,
              "threads": args.threads,
              "load_average": os.getloadavg(), "results": results}
    for r in results:
        print(f"{r['method']:7s}{r['workload']:24s} baseline {r['baseline_tok_s']:7.2f} tok/s  speculate {r['speculate_tok_s']:7.2f} "
              f"tok/s  ratio {r['ratio']:.3f}x  accepted/step {r['accepted_drafts_per_step']}  "
              f"verify steps {r['verify_steps']}  "
              f"identical {r['greedy_outputs_identical']}")
    print("load average", os.getloadavg())
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
