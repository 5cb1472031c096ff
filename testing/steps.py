"""Steps as the engine builds them, from plain request descriptions (for kernel tests)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from textgen.core.attention import StepLimits
from textgen.core.engine.step_inputs import StepBuffers

if TYPE_CHECKING:
    from textgen.core.attention import AttentionBackend, AttentionSpec
    from textgen.core.forward_context import AttentionMetadata, StepTensors


@dataclass(slots=True)
class StepRow:
    """One request's share of a step: `num_computed_tokens` already cached, `num_new_tokens`
    computed now, its block table, and the new tokens' ids (zeros when they do not matter)."""

    num_computed_tokens: int
    num_new_tokens: int
    block_ids: list[int]
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = [0] * self.num_new_tokens


def fill_step(rows: list[StepRow], block_size: int, device: torch.device | str = "cpu",
              max_blocks: int | None = None, pad_to: int | None = None, pad_slot: int = 0) -> StepTensors:
    """The step's common tensors through the engine's own `StepBuffers`."""
    widest = max([len(r.block_ids) for r in rows] + [max_blocks or 1])
    tokens = max(sum(r.num_new_tokens for r in rows), pad_to or 0)
    limits = StepLimits(tokens, max(len(rows), pad_to or 0), widest, block_size)
    return StepBuffers(limits, torch.device(device)).fill(rows, pad_to=pad_to, pad_slot=pad_slot)


def kernel_metadata(kernel_cls: type[AttentionBackend], specs: list[AttentionSpec], step: StepTensors,
                    device: torch.device | str = "cpu") -> AttentionMetadata:
    """What the kernel's metadata builder makes of `step` (the engine calls it once per step)."""
    limits = StepLimits(int(step.input_ids.shape[0]), len(step.query_lens), int(step.block_tables.shape[1]),
                        step.block_size)
    return kernel_cls.metadata_builder_cls(kernel_cls, specs, limits, torch.device(device)).build(step)
