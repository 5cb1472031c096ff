"""PagedModel: a loaded model driven step by step through the engine's own step path (step
buffers, the kernel's metadata builder, the paged cache), without the scheduler, so a test can
choose exactly which tokens of which sequences share a step and read every token's logits."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from textgen.core.attention import StepLimits
from textgen.core.config import EngineConfig
from textgen.core.engine.model_runner import bind_attention
from textgen.core.engine.step_inputs import StepBuffers
from textgen.core.forward_context import ForwardContext
from textgen.core.registry import AttentionBackendInfo
from textgen.testing.steps import StepRow

if TYPE_CHECKING:
    from textgen.core.backend import Backend

CPU_KERNEL = AttentionBackendInfo("cpu_paged", "textgen.backends.cpu.attention:CPUPagedAttention")


def cpu_backend() -> Backend:
    from textgen.backends.cpu.backend import CPUBackend
    from textgen.backends.cpu.plugin import textgen_probe_backend

    return CPUBackend(None, textgen_probe_backend(None))


def load_bound_model(config: EngineConfig, backend: Backend | None = None,
                     kernels: list[AttentionBackendInfo] | None = None) -> torch.nn.Module:
    """`load_model`, then the kernel negotiated and bound as the engine does."""
    from textgen.core.loader import load_model

    model = load_model(config, backend or cpu_backend()).model
    bind_attention(model, kernels or [CPU_KERNEL], config)
    return model


@dataclass
class Seq:
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedModel:
    """A shuffled block free list, the engine's step buffers and metadata builder, and one
    forward per step returning every token's float32 logits."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", num_blocks: int = 96,
                 max_tokens: int = 512, max_seqs: int = 16, seed: int = 0) -> None:
        self.model, self.device = model, torch.device(device)
        specs = model.attention_specs()
        self.kernel_cls = type(model.attention_layers()[0].impl)
        self.block_size = specs[0].block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.kv_caches = [
            torch.zeros(self.kernel_cls.kv_cache_shape(num_blocks, s.block_size, s.num_kv_heads, s.head_size,
                                                       s.cache_dtype), dtype=s.cache_dtype, device=self.device)
            for s in specs
        ]
        limits = StepLimits(max_tokens, max_seqs, num_blocks, self.block_size)
        self.buffers = StepBuffers(limits, self.device)
        self.builder = self.kernel_cls.metadata_builder_cls(self.kernel_cls, specs, limits, self.device)

    def step(self, work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
        """Run `n` new tokens of each sequence in one flat batch; logits [n, V] per sequence."""
        rows = []
        for seq, n in work:
            start, end = seq.num_computed, seq.num_computed + n
            while len(seq.blocks) * self.block_size < end:
                seq.blocks.append(self.free.pop())
            rows.append(StepRow(start, n, list(seq.blocks), seq.tokens[start:end]))
            seq.num_computed = end
        step = self.buffers.fill(rows)
        with torch.inference_mode():
            ctx = ForwardContext(self.builder.build(step), self.kv_caches)
            hidden = self.model(step.input_ids, step.positions, ctx)
            logits = self.model.compute_logits(hidden)
        return list(logits.float().cpu().split([n for _, n in work]))

    def generate(self, prompt: list[int], chunks: list[int], steps: int) -> tuple[Seq, torch.Tensor]:
        """Prefill in `chunks`, then `steps` greedy decode steps; logits of every position."""
        seq, out = Seq(list(prompt)), []
        for n in chunks:
            out += self.step([(seq, n)])
        for _ in range(steps):
            seq.tokens.append(int(out[-1][-1].argmax()))
            out += self.step([(seq, 1)])
        return seq, torch.cat(out)
