"""`textgen bench` flags (TGI's text-generation-benchmark names) -> api/bench.py -> table + JSON.

    textgen bench --model-id llama-100m --batch-size 1 8 32 --sequence-length 128 --decode-length 32 \
        --runs 5 --output bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Prefill and per-token decode latency/throughput for a grid of batch sizes and prompt "
                          "lengths, through the engine on any backend. --model-id may name a configuration kept in "
                          "benchmarks/configs (random weights), a config.json, a model folder or a Hub id.")
    parser.add_argument("--model-id", default="llama-100m",
                        help="configuration name (e.g. llama-100m, qwen2.5-0.5b, llama-3.2-1b), config.json, folder or Hub id")
    parser.add_argument("--batch-size", type=int, nargs="+", action="extend", dest="batch_size",
                        help="batch sizes (repeatable or a list; default 1 2 4 8 16 32)")
    parser.add_argument("--sequence-length", type=int, nargs="+", action="extend", dest="sequence_length",
                        help="prompt lengths in tokens (repeatable or a list; default 10)")
    parser.add_argument("--decode-length", type=int, default=8, help="tokens generated per request (default 8)")
    parser.add_argument("--runs", type=int, default=10, help="measured runs per grid point (default 10)")
    parser.add_argument("--warmups", type=int, default=1, help="unmeasured runs per grid point first (default 1)")
    parser.add_argument("--backend", default=None, help="force a backend (default: the best available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                        help="dummy: random weights from config.json (the default for configurations)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--output", type=Path, default=None, help="write the full report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from textgen.api.bench import BenchSettings, format_table, run_bench

    settings = BenchSettings(
        model_id=args.model_id, batch_sizes=args.batch_size or [1, 2, 4, 8, 16, 32],
        sequence_lengths=args.sequence_length or [10], decode_length=args.decode_length, runs=args.runs,
        warmups=args.warmups, backend=args.backend, dtype=args.dtype, load_format=args.load_format, seed=args.seed,
    )
    reasons = settings.problems()
    if reasons:
        print(f"textgen bench: error: {reasons[0]}", file=sys.stderr)
        return 2
    try:
        report = run_bench(settings, progress=not args.no_progress)
    except ValueError as exc:  # a model id that resolves to nothing, an unsupported dtype...
        print(f"textgen bench: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
