"""Engine overhead at serving load, without HTTP: where a step's time goes besides the model forward.

    python benchmarks/engine_overhead.py [--clients 64] [--steps 150] [--threads 1] [--dtype bfloat16] [--profile]

Drives an EngineCore in this process the way benchmarks/serving.py drives the server: `--clients`
closed-loop clients, each sending its next request as soon as the last one finishes, with the
serving benchmark's seeded length distribution (lognormal prompt and output lengths around
--input-median / --output-median, greedy, EOS ignored). Each request's events go to a sink that
keeps them, as the HTTP layer's queue does. The first requests get a uniform share of their output
length (clients met mid-request), so new prompts arrive from the first steps on as they do in a
long serving run. After the batch is full it records `--steps` steps
(the engine's own StepRecords: see core/engine/types.py) and prints the engine overhead share
(step - model forward) / step, per step kind, and the overhead's parts. `--profile` adds a
cProfile of the same steps: the functions outside the model with the most own time.

With `--threads 1` (the default) every op runs on the calling thread, so the figures are that
thread's work, much less sensitive to other load on the machine than a multi-threaded run.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--input-median", type=int, default=128)
    ap.add_argument("--output-median", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-args", default="", help="EngineConfig fields, e.g. 'max_batch_prefill_tokens=512'")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=40, help="functions listed by --profile")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "textgen-bench-llama-100m"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from textgen.core.config import EngineConfig
    from textgen.core.engine.engine_core import EngineCore
    from textgen.core.engine.types import EngineRequest
    from textgen.core.sampling_params import SamplingParams

    extra = dict(kv.split("=", 1) for kv in args.engine_args.split())
    extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
    core = EngineCore(EngineConfig(model_id=str(build_random_llama(args.model_dir)), backend="cpu",
                                   dtype=args.dtype, **extra))
    rng = np.random.default_rng(args.seed)
    vocab = core.runner.vocab_size
    counter = iter(range(10**9))
    inbox: list[object] = []

    def submit(first: bool = False) -> None:
        n_in = int(np.clip(rng.lognormal(np.log(args.input_median), 0.6), 16, 1024))
        n_out = int(np.clip(rng.lognormal(np.log(args.output_median), 0.5), 8, 512))
        if first:  # a client met mid-request: the batch starts in its steady mix of finishing and new requests
            n_out = int(rng.integers(1, n_out + 1))
        ids = rng.integers(10, vocab - 10, n_in).tolist()
        params = SamplingParams(max_new_tokens=n_out, ignore_eos=True)
        core.add_request(EngineRequest(f"r{next(counter)}", ids, params), sink)

    def sink(event: object) -> None:
        inbox.append(event)
        if event.finished:
            submit()  # the closed-loop client sends its next request

    records: list = []
    core.step_observers.append(records.append)
    for _ in range(args.clients):
        submit(first=True)
    while len(core.scheduler.running) < args.clients or core.scheduler.num_waiting:
        core.step()  # fill the batch
    records.clear()
    profiler = cProfile.Profile() if args.profile else None
    cpu, wall = time.thread_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    while len(records) < args.steps:
        core.step()
        inbox.clear()
    if profiler:
        profiler.disable()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    tokens = sum(r.batch_size for r in records)  # every scheduled row of a full batch samples or prefills
    prefill_tokens = sum(r.num_tokens - r.batch_size for r in records)  # beyond one token per row
    print(f"# engine overhead: {args.clients} clients, {args.steps} steps, {args.dtype}, {args.threads} thread(s), "
          f"{machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"# wall {wall:.2f} s, thread CPU {cpu:.2f} s, {tokens / wall:.1f} scheduled rows/s "
          f"({tokens / cpu:.1f} per thread-CPU s), {sum(r.num_tokens for r in records) / wall:.1f} tokens/s "
          f"({prefill_tokens} extra prompt tokens)")
    print("| steps | n | ms/step | model ms | overhead ms | overhead share | loop | schedule | inputs+sampling "
          "| update | events |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("decode", "prefill", "all"):
        rs = [r for r in records if kind == "all" or r.method == kind]
        if not rs:
            continue
        n = len(rs)
        ms = lambda f: sum(f(r) for r in rs) / n * 1e3  # noqa: E731
        step, model = ms(lambda r: r.step_s), ms(lambda r: r.model_s)
        print(f"| {kind} | {n} | {step:.1f} | {model:.1f} | {step - model:.2f} | {(step - model) / step:.1%} "
              f"| {ms(lambda r: r.loop_s):.2f} | {ms(lambda r: r.schedule_s):.2f} "
              f"| {ms(lambda r: r.forward_s - r.model_s):.2f} | {ms(lambda r: r.update_s):.2f} "
              f"| {ms(lambda r: r.emit_s):.2f} |")
    if profiler:
        stats = pstats.Stats(profiler)
        rows = []
        for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():
            if any(part in file for part in OUTSIDE_MODEL):
                rows.append((cum, own, calls, f"{'/'.join(Path(file).parts[-2:])}:{line}:{name}"))
        print("\n| function outside the model (cProfile) | cum ms/step | own ms/step | calls/step |")
        print("|---|---:|---:|---:|")
        for cum, own, calls, name in sorted(rows, reverse=True)[:args.top]:
            print(f"| {name} | {cum / args.steps * 1e3:.2f} | {own / args.steps * 1e3:.2f} | {calls / args.steps:.0f} |")


# the engine's own code and the tokenizer: where the time outside the model forward goes
OUTSIDE_MODEL = ("core/engine/", "core/sampling/", "core/scheduler/", "core/kv_cache/", "core/attention",
                 "core/forward_context", "transformers/tokenization", "backends/cpu/fused_attention.py:1")

if __name__ == "__main__":
    main()
