"""Loading a model through the CPU backend's quantizer registry, as the engine does."""
from __future__ import annotations

import torch

from textgen.core.config import EngineConfig
from textgen.core.engine.model_runner import bind_attention
from textgen.core.loader import LoadedModel, load_model
from textgen.testing.paged_model import CPU_KERNEL, PagedModel, Seq, cpu_backend


def cpu_quantizers() -> list:
    from textgen.backends.cpu.plugin import textgen_quantizers

    return textgen_quantizers(backend=cpu_backend())


def load_quantized(path: str, quantize: str | None = None, dtype: str = "float32") -> LoadedModel:
    config = EngineConfig(model_id=path, dtype=dtype, quantize=quantize, block_size=16)
    loaded = load_model(config, cpu_backend(), quantizers=cpu_quantizers())
    bind_attention(loaded.model, [CPU_KERNEL], config)
    return loaded


def prefill_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """float32 logits [n, V] of one prompt run as a single prefill step."""
    with torch.inference_mode():
        return PagedModel(model).step([(Seq(list(tokens)), len(tokens))])[0].float()


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens: one prefill, then one decode step per token (M = 1: the packed kernels)."""
    paged, seq = PagedModel(model), Seq(list(prompt))
    out: list[int] = []
    with torch.inference_mode():
        logits = paged.step([(seq, len(prompt))])[0]
        for _ in range(steps):
            token = int(logits[-1].argmax())
            out.append(token)
            seq.tokens.append(token)
            logits = paged.step([(seq, 1)])[0]
    return out
