"""Shared helpers for the benchmark scripts: a ~100M-parameter Llama-shaped model with random
weights written in Hugging Face format (so textgen and transformers load the same files)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# ~100M parameters: 14 layers x 6.3M + a tied 8k x 768 embedding.
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=True)


def build_random_llama(out: str | os.PathLike, vocab_size: int = 8192, **overrides: object) -> Path:
    """Write a random-weight Llama (LLAMA_100M unless overridden) and a BPE tokenizer to `out`."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from textgen.testing.tiny_models import make_tokenizer

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, vocab_size=vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                   **{**LLAMA_100M, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")


def build_never_eos_llama(out: str | os.PathLike, base: str | os.PathLike) -> Path:
    """`build_random_llama(base)` copied to `out` with the EOS row of the (tied) embedding zeroed:
    the EOS logit is then exactly 0 while the largest of the other 8k random logits is positive,
    so greedy decoding never stops early and every server generates exactly max_new_tokens (the
    TGI API has no ignore_eos). Same weights otherwise, for textgen, transformers and llama.cpp."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    base = build_random_llama(base)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    eos = int(__import__("json").loads((tmp / "config.json").read_text())["eos_token_id"])
    weights["model.embed_tokens.weight"][eos] = 0.0
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def describe_machine() -> dict[str, object]:
    """The machine description every benchmark report carries (CPU, cores, torch, load average,
    whether the CPU multiplies bfloat16 natively)."""
    from textgen.api.bench import describe_machine as describe
    from textgen.backends.cpu.backend import native_bf16

    return {**describe(), "native_bf16": native_bf16()}


def speed_probe_ms(repeats: int = 5) -> float:
    """Best time of a fixed fp32 GEMM workload ([64, 768] x [768, 4096], 20 times): how fast the
    machine is right now. Shared machines drift by up to 2x over minutes; a report that measures
    servers one after the other records this next to each so the reader can see the drift."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 768, generator=gen), torch.randn(4096, 768, generator=gen)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best * 1e3
