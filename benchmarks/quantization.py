"""Quantization methods against bf16 in one run: batch-1 decode speed, or the sustained rate of a
real server under many streaming clients; weight bytes either way.

`python benchmarks/quantization.py [--tokens 32] [--threads 1] [--repeats 3]` builds the ~100M Llama
of benchmarks/common.py (random weights, cached under /tmp), loads it three ways through the CPU
backend's registry (bf16, --quantize int8, --quantize int4, all bf16 activations), decodes
`--tokens` greedy tokens at batch 1 (one prefill of 8 tokens, then one step per token through the
paged model), the three alternating `--repeats` times, and prints the best tokens/s by wall time
and by CPU time, weight MiB, their ratios to bf16, and the weight bytes read per CPU-second (a
lower bound of the kernels' own rate: the step's attention, norms and Python count too).
Targets: int4 >= 2x bf16 tokens/s, weights <= 0.3x.

`python benchmarks/quantization.py --step-rows 64 [--threads 1]` times one decode step of 64
sequences per method in CPU time (the batch the serving target is about, free of a loaded
machine's scheduling noise).

`python benchmarks/quantization.py --serving [--clients 64] [--methods none int8 int4 fp8
bitsandbytes bitsandbytes-nf4] [--time-limit 60]` starts `textgen serve --dtype bfloat16
[--quantize M]` once per method on the same model (its EOS row zeroed, so every request generates
exactly its max_new_tokens), drives it with `--clients` closed-loop streaming clients on the
seeded chat-like workload of benchmarks/serving.py (--input-median / --output-median tokens),
and prints the sustained output tokens/s (while every client had a request in flight), TTFT p50,
the weight MiB the server reports in GET /info, and both ratios to bf16 (`none`). A shared
machine drifts: compare the ratios of one run, not figures across runs; the load average is
printed before and after."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchmarks.common import build_never_eos_llama, build_random_llama, machine  # noqa: E402
from tests.quantization.helpers import greedy, load_quantized  # noqa: E402

TMP = Path(tempfile.gettempdir())
SERVING_METHODS = ["none", "int8", "int4", "fp8", "bitsandbytes", "bitsandbytes-nf4"]


def decode_main(args: argparse.Namespace) -> None:
    """Loads bf16, int8 and int4 once each, then alternates them `--repeats` times (a shared
    machine's load drifts alike over all three) and keeps each one's best run, by wall time and
    by this process's CPU time (with `--threads 1` the CPU time is the step's own compute)."""
    path = str(build_random_llama(args.model_dir))
    torch.set_num_threads(args.threads)
    print(machine(), f"{args.threads} thread(s), load average before {os.getloadavg()}", flush=True)
    models = {m or "bf16": load_quantized(path, m, dtype="bfloat16") for m in (None, "int8", "int4")}
    prompt = list(range(10, 18))
    best = {name: [float("inf"), float("inf")] for name in models}
    for _ in range(args.repeats):
        for name, loaded in models.items():
            greedy(loaded.model, prompt, 2)  # warm-up: prefill and first decode shapes
            wall, cpu = time.perf_counter(), time.process_time()
            greedy(loaded.model, prompt, args.tokens)
            best[name][0] = min(best[name][0], time.perf_counter() - wall)
            best[name][1] = min(best[name][1], time.process_time() - cpu)
    print(f"load average after {os.getloadavg()}; {args.tokens} tokens, best of {args.repeats}")
    base_wall, base_cpu = best["bf16"]
    base_bytes = models["bf16"].weight_bytes
    print("method  tok/s  x bf16  tok/CPU-s  x bf16  weights MiB  x bf16  GB/CPU-s (weight bytes per token / CPU time)")
    for name, (wall, cpu) in best.items():
        size = models[name].weight_bytes
        print(f"{name:6} {args.tokens / wall:6.1f} {base_wall / wall:6.2f}x {args.tokens / cpu:9.1f} "
              f"{base_cpu / cpu:6.2f}x {size / 2**20:11.1f} {size / base_bytes:6.2f}x {size * args.tokens / cpu / 1e9:6.1f}")


def step_main(args: argparse.Namespace) -> None:
    """CPU time of one decode step of `--step-rows` sequences (32-token prompts prefilled first)
    through the paged model, per method, best of `--repeats` alternating steps: the linear layers
    at the serving batch without a server's scheduling and clients, so it holds on a loaded machine."""
    from textgen.testing.paged_model import PagedModel, Seq

    path, rows = str(build_random_llama(args.model_dir)), args.step_rows
    torch.set_num_threads(args.threads)
    print(machine(), f"{args.threads} thread(s), load average before {os.getloadavg()}", flush=True)
    state = {}
    for method in (None, "int8", "int4"):
        paged = PagedModel(load_quantized(path, method, dtype="bfloat16").model, num_blocks=rows * 4 + 8,
                           max_tokens=max(512, rows * 32), max_seqs=rows)
        seqs = [Seq(list(range(10 + i, 42 + i))) for i in range(rows)]
        paged.step([(seq, len(seq.tokens)) for seq in seqs])
        state[method or "bf16"] = (paged, seqs)
    best = dict.fromkeys(state, float("inf"))
    for _ in range(args.repeats + 1):
        for name, (paged, seqs) in state.items():
            for seq in seqs:
                seq.tokens.append(5)
            start = time.process_time()
            paged.step([(seq, 1) for seq in seqs])
            best[name] = min(best[name], time.process_time() - start)
    print(f"load average after {os.getloadavg()}; one decode step of {rows} sequences, best of {args.repeats + 1}")
    print("method  CPU ms/step  tokens/CPU-s  x bf16")
    for name, seconds in best.items():
        print(f"{name:6} {seconds * 1e3:11.1f} {rows / seconds:13.1f} {best['bf16'] / seconds:7.2f}x")


def serve_one(model_dir: Path, method: str, workload: list, args: argparse.Namespace, port: int) -> dict[str, float]:
    """Sustained tokens/s, TTFT p50 and /info weight bytes of one `textgen serve` under the load."""
    import httpx
    import servers
    from load_generator import RequestSpec, run_level

    extra = ["--max-batch-size", str(args.clients)] + ([] if method == "none" else ["--quantize", method])
    spec = servers.textgen_spec(model_dir, port, extra, "bfloat16")
    spec.env["OMP_NUM_THREADS"] = str(args.threads)
    with servers.running(spec, args.out / "logs" / method, 600.0):
        info = httpx.get(spec.base_url + "/info", timeout=30).json()
        asyncio.run(run_level(spec.base_url, "tgi", [RequestSpec(workload[0].prompt, 0, 4)] * 2, 1, 120.0))
        level = asyncio.run(run_level(spec.base_url, "tgi", workload, args.clients, args.time_limit))
    return {"tokens_per_s": level["steady_output_tokens_per_s"] or 0.0, "ttft_p50_ms": level["ttft_ms"]["p50"] or 0.0,
            "weight_bytes": info["weight_bytes"], "errors": level["errors"], "quantization": info["quantization"]}


def serving_main(args: argparse.Namespace) -> None:
    from load_generator import synthesize_workload
    from transformers import AutoTokenizer

    model_dir = build_never_eos_llama(TMP / "textgen-bench-llama-100m-never-eos", args.model_dir)
    workload = synthesize_workload(AutoTokenizer.from_pretrained(str(model_dir)), args.requests_per_client * args.clients,
                                   args.seed, args.input_median, args.output_median)
    print(machine(), f"load average before {os.getloadavg()}", flush=True)
    results = {}
    for i, method in enumerate(args.methods):
        started = time.time()
        results[method] = serve_one(model_dir, method, workload, args, args.port + i)
        print(f"  {method}: {results[method]} ({time.time() - started:.0f} s)", flush=True)
    print(f"load average after {os.getloadavg()}")
    base = results.get("none")
    print(f"{args.clients} clients, {len(workload)} requests, bf16 activations")
    print("method              tok/s   x bf16  TTFT p50 ms  weights MiB  x bf16  errors")
    for name, r in results.items():
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else float("nan")
        size = r["weight_bytes"] / base["weight_bytes"] if base else float("nan")
        print(f"{name:18} {r['tokens_per_s']:7.1f} {speed:7.2f}x {r['ttft_p50_ms']:12.0f} "
              f"{r['weight_bytes'] / 2**20:12.1f} {size:6.2f}x {r['errors']:7d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per method (decode mode)")
    parser.add_argument("--model-dir", default=str(TMP / "textgen-bench-llama-100m"))
    parser.add_argument("--serving", action="store_true", help="sustained rate of a real server under --clients")
    parser.add_argument("--step-rows", type=int, default=0, help="CPU time of one decode step of this many sequences")
    parser.add_argument("--methods", nargs="+", default=SERVING_METHODS)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--input-median", type=int, default=64)
    parser.add_argument("--output-median", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quantization")
    args = parser.parse_args()
    if args.serving:
        serving_main(args)
    elif args.step_rows:
        step_main(args)
    else:
        decode_main(args)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
