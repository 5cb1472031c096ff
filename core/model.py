"""The Model interface every native (and wrapped) causal LM implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from textgen.core.attention import AttentionSpec
    from textgen.core.forward_context import ForwardContext
    from textgen.core.layers.attention import Attention


class Model(ABC, torch.nn.Module):
    """A causal LM over the flat token layout of `ForwardContext`.

    Contract:
    - `forward(input_ids [T], positions [T], ctx)` returns hidden states [T, hidden_size]; attention
      layers read and write `ctx.kv_caches[layer_index]` through the chosen AttentionBackend.
    - `compute_logits(hidden [N, hidden_size])` returns float32 logits [N, vocab_size] (the
      sampler's dtype), only for the rows that are sampled.
    - `load_weights(iterable of (hf_name, tensor))` consumes checkpoint tensors by their Hugging
      Face names; each parameter's own `weight_loader` shards/fuses it.
    - every attention layer is a `textgen.core.layers.attention.Attention` built with its own
      `AttentionSpec` (per-layer window, soft-cap, ALiBi) and `layer_idx` 0..N-1; the engine reads
      them through `attention_layers()` to negotiate the kernel and size the cache, then binds it.
    """

    def attention_layers(self) -> list[Attention]:
        from textgen.core.layers.attention import attention_layers

        return attention_layers(self)

    def attention_specs(self) -> list[AttentionSpec]:
        """Each attention layer's spec, in layer order (completed once the kernel is bound)."""
        return [layer.spec for layer in self.attention_layers()]

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states for every input token."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given hidden rows."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors; return the parameter names that were filled."""
