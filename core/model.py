"""The Model interface every native (and wrapped) causal LM implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from textgen.core.forward_context import ForwardContext


class Model(ABC, torch.nn.Module):
    """A causal LM over the flat token layout of `ForwardContext`.

    Contract:
    - `forward(input_ids [T], positions [T], ctx)` returns hidden states [T, hidden_size]; attention
      layers read and write `ctx.kv_caches[layer_index]` through the chosen AttentionBackend.
    - `compute_logits(hidden [N, hidden_size])` returns float32 logits [N, vocab_size] (the
      sampler's dtype), only for the rows that are sampled.
    - `load_weights(iterable of (hf_name, tensor))` consumes checkpoint tensors by their Hugging
      Face names; each parameter's own `weight_loader` shards/fuses it.
    - `num_attention_layers` and `attention_spec(i)`-level facts come from the config.
    """

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states for every input token."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given hidden rows."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors; return the parameter names that were filled."""
