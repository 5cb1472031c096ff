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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = build_never_eos_llama(TMP / "textgen-bench-model-never-eos", TMP / "textgen-bench-model")
    adapters = make_adapters(model, args.adapters, args.rank)
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
