"""Multi-LoRA serving cost: 64 clients spread over 8 adapters against the same 64 clients on the
base model alone, on one `textgen serve` (same process, same run), as a throughput ratio.

    python benchmarks/lora.py [--clients 64] [--adapters 8] [--rank 16] [--requests-per-client 2]
                              [--input-tokens 64] [--output-tokens 32] [--rounds 1] [--out benchmarks/results/lora]

The model is the ~100M-parameter random Llama of benchmarks/common.py with its EOS row zeroed (every
request generates exactly --output-tokens; LoRA does not touch the tied head, so the EOS logit
stays 0 with any adapter). The adapters are made with `peft` (random non-zero A and B, every
linear: q/k/v/o/gate/up/down) and served with `--lora-adapters a0=...,a7=... --max-loras 8`.
Each level runs closed-loop clients sending POST /generate (client i uses adapter a{i % 8} in
the LoRA level, none in the base level); output tokens/s is generated tokens over the level's
wall time. Levels alternate base, LoRA for --rounds rounds; the ratio is LoRA / base of the
medians. Target: >= 0.8.

`--engine` measures the same mix in-process instead (EngineCore, no HTTP): the median forward
time of the decode steps of --clients requests, base and LoRA levels interleaved for --rounds
rounds, with --threads intra-op threads. On a shared machine this is the steadier number (a level
of the HTTP run lasts minutes, over which other load comes and goes).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_never_eos_llama, describe_machine  # noqa: E402
from report import markdown_table, write_json  # noqa: E402
import servers  # noqa: E402

TMP = Path(tempfile.gettempdir())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--out", default="benchmarks/results/lora")
    ap.add_argument("--engine", action="store_true", help="in-process decode-step comparison (see above)")
    ap.add_argument("--threads", type=int, default=None, help="--engine: torch intra-op threads")
    return ap.parse_args(argv)


def make_adapters(model: Path, count: int, rank: int) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from textgen.testing.lora_adapters import make_lora_adapter

    out = {}
    for i in range(count):
        folder = TMP / f"textgen-bench-lora-r{rank}-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            make_lora_adapter(model, folder, rank=rank, alpha=2 * rank, seed=100 + i)
        out[f"a{i}"] = folder
    return out


def prompts(model: Path, n: int, tokens: int) -> list[str]:
    """n distinct prompts of about `tokens` tokens (distinct: no prefix-cache hits between them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    vocab = len(tok)
    return [tok.decode([(7 + i * 31 + j * 17) % (vocab - 4) + 4 for j in range(tokens)]) for i in range(n)]


async def run_level(base_url: str, texts: list[str], clients: int, adapters: list[str | None],
                    output_tokens: int) -> dict[str, Any]:
    """`clients` closed-loop clients; client i sends its share of `texts` with adapters[i % len]."""
    import aiohttp

    generated: list[int] = []
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        adapter = adapters[index % len(adapters)]
        for text in texts[index::clients]:
            params: dict[str, Any] = {"max_new_tokens": output_tokens, "details": True}
            if adapter is not None:
                params["adapter_id"] = adapter
            async with session.post(base_url + "/generate", json={"inputs": text, "parameters": params}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {body}")
                    continue
                generated.append(body["details"]["generated_tokens"])

    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"requests": len(generated), "output_tokens": sum(generated), "seconds": round(elapsed, 2),
            "output_tokens_per_s": round(sum(generated) / elapsed, 1)}


def engine_levels(model: Path, adapters: dict[str, Path], args: argparse.Namespace) -> dict[str, list[float]]:
    """Median decode-step forward seconds per level, base and LoRA interleaved."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from textgen.core.config import EngineConfig
    from textgen.core.engine.engine_core import EngineCore
    from textgen.core.engine.types import EngineRequest
    from textgen.core.sampling_params import SamplingParams

    core = EngineCore(EngineConfig(
        model_id=str(model), backend="cpu", dtype="float32", enable_prefix_caching=False, max_loras=args.adapters,
        max_lora_rank=args.rank, lora_adapters=tuple(f"{n}={p}" for n, p in adapters.items())))
    if args.threads:
        torch.set_num_threads(args.threads)
    records: list[Any] = []
    core.step_observers.append(records.append)
    names = list(adapters)

    def level(lora: bool, seed: int) -> float:
        records.clear()
        for i in range(args.clients):
            ids = [1] + [(seed * 7919 + i * 31 + j * 17) % 8000 + 4 for j in range(args.input_tokens)]
            params = SamplingParams(max_new_tokens=args.output_tokens, ignore_eos=True)
            core.add_request(EngineRequest(f"{seed}-{i}", ids, params, adapter_id=names[i % len(names)] if lora else None),
                             lambda event: None)
        while core.has_work():
            core.step()
        return statistics.median(r.forward_s for r in records if r.method == "decode")

    levels: dict[str, list[float]] = {"base": [], "lora": []}
    for k in range(args.rounds):
        levels["base"].append(level(False, 2 * k))
        levels["lora"].append(level(True, 2 * k + 1))
    return levels


def main_engine(model: Path, adapters: dict[str, Path], args: argparse.Namespace) -> int:
    levels = engine_levels(model, adapters, args)
    base, lora = statistics.median(levels["base"]), statistics.median(levels["lora"])
    write_json(Path(args.out) / "lora_engine.json", {"machine": describe_machine(), "args": vars(args),
                                                     "decode_step_s": levels, "ratio": round(base / lora, 3)})
    rows = [["base model only", args.clients, f"{base * 1e3:.0f}", "1.00"],
            [f"{args.adapters} adapters (rank {args.rank})", args.clients, f"{lora * 1e3:.0f}", f"{base / lora:.2f}"]]
    print(markdown_table(["level", "requests", "decode step ms (median)", "throughput vs base"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = build_never_eos_llama(TMP / "textgen-bench-model-never-eos", TMP / "textgen-bench-model")
    adapters = make_adapters(model, args.adapters, args.rank)
    if args.engine:
        return main_engine(model, adapters, args)
    texts = prompts(model, args.clients * args.requests_per_client, args.input_tokens)
    flags = ["--lora-adapters", ",".join(f"{n}={p}" for n, p in adapters.items()), "--max-loras", str(args.adapters),
             "--max-lora-rank", str(args.rank), "--prefix-caching", "false"]
    spec = servers.textgen_spec(model, args.port, flags)
    levels: dict[str, list[dict[str, Any]]] = {"base": [], "lora": []}
    out = Path(args.out)
    with servers.running(spec, out / "logs"):
        warm = [None] + list(adapters)
        asyncio.run(run_level(spec.base_url, texts[: len(warm)], len(warm), warm, 4))
        for _ in range(args.rounds):
            levels["base"].append(asyncio.run(run_level(spec.base_url, texts, args.clients, [None],
                                                        args.output_tokens)))
            levels["lora"].append(asyncio.run(run_level(spec.base_url, texts, args.clients, list(adapters),
                                                        args.output_tokens)))
    base = statistics.median(level["output_tokens_per_s"] for level in levels["base"])
    lora = statistics.median(level["output_tokens_per_s"] for level in levels["lora"])
    result = {"machine": describe_machine(), "args": vars(args), "levels": levels,
              "base_tokens_per_s": base, "lora_tokens_per_s": lora, "ratio": round(lora / base, 3)}
    write_json(out / "lora.json", result)
    rows = [["base model only", args.clients, base, "1.00"],
            [f"{args.adapters} adapters (rank {args.rank})", args.clients, lora, f"{lora / base:.2f}"]]
    print(markdown_table(["level", "clients", "output tok/s (median)", "vs base"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
