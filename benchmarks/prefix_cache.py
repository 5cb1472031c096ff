"""Prefix caching: time to first token of a 2,000-token prompt, cold and warm.

    python benchmarks/prefix_cache.py [--prefix-tokens 2000] [--suffix-tokens 32] [--reps 3] [--server]

Three cases, each repeated --reps times with a fresh random prefix (median reported):
- cold: the prefix alone, never seen before (after an unrelated warm-up request);
- warm, same prompt: the same prompt again (all but the last block come from the cache);
- warm, new suffix: the cached prefix followed by --suffix-tokens new tokens, against a cold
  prompt of the same total length.
TTFT is measured through the engine (`LLM.generate_ids(..., max_new_tokens=1)`: scheduling,
prefill, sampling, detokenization), and with --server also through `textgen serve` over HTTP
(POST /generate_stream, time to the first SSE token event; prompts are text there).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_random_llama, describe_machine  # noqa: E402
from report import markdown_table, write_json  # noqa: E402

CASES = ("cold", "warm_same", "cold_long", "warm_suffix")


def engine_ttft(llm: Any) -> Callable[[list[int]], tuple[float, int]]:
    def measure(ids: list[int]) -> tuple[float, int]:
        start = time.perf_counter()
        out = llm.generate_ids([ids], max_new_tokens=1)[0]
        return time.perf_counter() - start, out.num_cached_tokens
    return measure


def run_cases(measure: Callable[[Any], tuple[float, int]], prompts: Callable[[int], dict[str, Any]],
              reps: int) -> dict[str, dict[str, float]]:
    """prompts(rep) -> {case: prompt}; the cases run in CASES order (cold before warm)."""
    times: dict[str, list[float]] = {c: [] for c in CASES}
    cached: dict[str, list[int]] = {c: [] for c in CASES}
    for rep in range(reps):
        p = prompts(rep)
        for case in CASES:
            seconds, hit = measure(p[case])
            times[case].append(seconds)
            cached[case].append(hit)
    return {c: {"ttft_ms": statistics.median(times[c]) * 1e3, "all_ms": [t * 1e3 for t in times[c]],
                "cached_tokens": statistics.median(cached[c])} for c in CASES}


def id_prompts(vocab: int, prefix: int, suffix: int, seed: int) -> Callable[[int], dict[str, list[int]]]:
    def make(rep: int) -> dict[str, list[int]]:
        rng = np.random.default_rng(seed + rep)
        a = rng.integers(10, vocab, prefix).tolist()
        return {"cold": a, "warm_same": a, "cold_long": rng.integers(10, vocab, prefix + suffix).tolist(),
                "warm_suffix": a + rng.integers(10, vocab, suffix).tolist()}
    return make


def text_prompts(tokenizer: Any, prefix: int, suffix: int, seed: int) -> Callable[[int], dict[str, str]]:
    """Text whose tokenization is about `prefix` tokens: decoded slices of the stdlib's sources."""
    from load_generator import _corpus_ids

    corpus = _corpus_ids(tokenizer)

    def make(rep: int) -> dict[str, str]:
        rng = np.random.default_rng(seed + rep)
        cut = lambda n: tokenizer.decode(corpus[(s := int(rng.integers(0, len(corpus) - n))): s + n])  # noqa: E731
        a = cut(prefix)
        return {"cold": a, "warm_same": a, "cold_long": cut(prefix + suffix), "warm_suffix": a + cut(suffix)}
    return make


def server_ttft(base_url: str) -> Callable[[str], tuple[float, int]]:
    import json

    import aiohttp

    async def once(text: str) -> tuple[float, int]:
        body = {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True}}
        async with aiohttp.ClientSession() as session:
            start = time.perf_counter()
            async with session.post(base_url + "/generate_stream", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data:") and json.loads(line[5:]).get("token"):
                        return time.perf_counter() - start, -1
        raise RuntimeError("no token event")

    return lambda text: asyncio.run(once(text))


def summarize(cases: dict[str, dict[str, float]]) -> dict[str, float]:
    return {"warm_same_over_cold": cases["warm_same"]["ttft_ms"] / cases["cold"]["ttft_ms"],
            "warm_suffix_over_cold_long": cases["warm_suffix"]["ttft_ms"] / cases["cold_long"]["ttft_ms"]}


def table(results: dict[str, Any]) -> str:
    rows = []
    for where, res in results.items():
        c, r = res["cases"], res["ratios"]
        rows.append([where, c["cold"]["ttft_ms"], c["warm_same"]["ttft_ms"], f"{r['warm_same_over_cold']:.3f}",
                     c["cold_long"]["ttft_ms"], c["warm_suffix"]["ttft_ms"], f"{r['warm_suffix_over_cold_long']:.3f}"])
    return markdown_table(["path", "cold ms", "warm same ms", "warm/cold", "cold +suffix ms", "warm +suffix ms",
                           "warm/cold (+suffix)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", action="store_true", help="also measure through `textgen serve` over HTTP")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "textgen-bench-llama-100m")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "prefix_cache")
    args = ap.parse_args()
    from textgen.core import LLM

    path = build_random_llama(args.model_dir)
    results: dict[str, Any] = {}
    report: dict[str, Any] = {"machine_before": describe_machine(), "command": " ".join([sys.executable, *sys.argv]),
                              "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    llm = LLM(str(path), backend="cpu", dtype="float32")
    llm.generate_ids([list(range(10, 200))], max_new_tokens=2)  # first-call overheads out of "cold"
    cases = run_cases(engine_ttft(llm), id_prompts(llm.engine.runner.vocab_size, args.prefix_tokens,
                                                    args.suffix_tokens, args.seed), args.reps)
    results["engine"] = {"cases": cases, "ratios": summarize(cases)}
    tokenizer = llm.tokenizer
    del llm
    if args.server:
        import servers

        spec = servers.textgen_spec(path, args.port, [])
        with servers.running(spec, args.out / "logs"):
            measure = server_ttft(spec.base_url)
            measure("warm-up request")
            cases = run_cases(measure, text_prompts(tokenizer, args.prefix_tokens, args.suffix_tokens, args.seed + 100),
                              args.reps)
        results["server"] = {"cases": cases, "ratios": summarize(cases)}
    report["machine_after"] = describe_machine()
    write_json(args.out / "prefix_cache.json", report)
    text = table(results)
    (args.out / "prefix_cache.md").write_text(text + "\n")
    print(f"# TTFT, {args.prefix_tokens}-token prefix (+{args.suffix_tokens} new tokens), median of {args.reps}")
    print(text)


if __name__ == "__main__":
    main()
