"""Loading a model through the CPU backend's quantizer registry, as the engine does."""
from __future__ import annotations

import os
from unittest import mock

import torch

from textgen.core.config import EngineConfig
from textgen.core.engine.model_runner import bind_attention
from textgen.core.loader import LoadedModel, load_model
from textgen.testing.paged_model import CPU_KERNEL, PagedModel, Seq, cpu_backend


def cpu_quantizers() -> list:
    from textgen.backends.cpu.plugin import textgen_quantizers

    return textgen_quantizers(backend=cpu_backend())


def load_quantized(path: str, quantize: str | None = None, dtype: str = "float32", prepack: bool = False
                   ) -> LoadedModel:
    """`prepack=False` keeps unquantized weights plain (the tests read and copy their values;
    the CPU's prepacked oneDNN layout is opaque)."""
    config = EngineConfig(model_id=path, dtype=dtype, quantize=quantize, block_size=16)
    with mock.patch.dict(os.environ, {"TEXTGEN_CPU_ONEDNN_PACK": "1" if prepack else "0"}):
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


def copy_dequantized(quantized: torch.nn.Module, plain: torch.nn.Module) -> None:
    """plain's weights := quantized's weights dequantized (linear layers through their kernels,
    fused MoE experts through their method, an int8 LM head and the embedding tied to it), so
    that plain is the float model the quantized one must compute."""
    from textgen.core.layers.embedding import LMHead
    from textgen.core.layers.moe import FusedMoE
    from textgen.core.quantization.moe import STACKED

    modules = dict(quantized.named_modules())
    for name, module in plain.named_modules():
        source = modules[name]
        if isinstance(module, FusedMoE):
            experts = [source.method.expert_weights(source, e, torch.float32) for e in range(source.num_experts)]
            for index, stacked in enumerate(STACKED):
                getattr(module, stacked).data.copy_(torch.stack([pair[index] for pair in experts]))
        elif getattr(source, "quantizer", None) is not None:
            module.weight.data.copy_(source.quantizer.kernels.dense_weight(source, torch.float32))
        elif isinstance(module, LMHead) and getattr(source, "kernels", None) is not None:
            module.weight.data.copy_(source.kernels.dense_weight(source, torch.float32))  # tied: the embedding too


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """A transformers model's float32 logits [n, V] for one prompt."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens of a transformers model, one full forward per token (no cache)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(hf_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]
