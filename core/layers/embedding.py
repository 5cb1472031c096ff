"""Token embedding and LM head (optionally tied to the embedding)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.layers.norm import default_weight_loader

if TYPE_CHECKING:
    from textgen.core.quantization.base import WeightKernels


class VocabEmbedding(nn.Module):
    """[T] token ids -> [T, hidden]. Replicated (tp_size 1); the loader checks the vocab size."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if "weight" not in self._parameters:  # int8 rows shared with the LM head (core/quantization/vocab.py)
            dtype = self.compute_dtype
            return self.int8_codes[input_ids].to(dtype) * self.int8_scales[input_ids].to(dtype).unsqueeze(-1)
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """[N, hidden] -> float32 logits [N, vocab]. With `tied_to`, shares the embedding's weight
    (then the checkpoint's lm_head.weight, if any, is ignored by the model). A quantization method
    may replace the weight by int8 rows computed through its `kernels` (core/quantization/vocab.py)."""

    kernels: WeightKernels | None = None

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.apply(self, hidden, None).float()
        return F.linear(hidden, self.weight).float()
