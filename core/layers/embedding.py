"""Token embedding and LM head (optionally tied to the embedding), vocab-parallel across ranks.

With `tp_size` ranks each holds `ceil(vocab / tp_size)` consecutive rows of the table (the last
rank's tail past the vocabulary is zero padding). The embedding looks up the ids it owns, zeros
the others and all-reduces (sum) the [T, hidden] result; the LM head computes its slice of the
logits and all-gathers them along the vocabulary axis (padding columns dropped), so every rank
ends with the same full logits. One rank: a plain lookup and a plain matmul, no collective.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from textgen.core.layers.norm import default_weight_loader

if TYPE_CHECKING:
    from textgen.core.backend import DenseLinearKernel
    from textgen.core.distributed import Communicator
    from textgen.core.quantization.base import WeightKernels


class VocabEmbedding(nn.Module):
    """[T] token ids -> [T, hidden]; the loader checks the vocab size."""

    communicator: Communicator | None = None  # attached by the loader

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.rows = -(-vocab_size // tp_size)
        self.start = tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader if tp_size == 1 else self.shard_loader

    def shard_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Rows [start, start + rows) of the [vocab, hidden] checkpoint table; zeros past the vocab."""
        if loaded.dim() != 2 or tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit an embedding of "
                             f"{self.vocab_size} x {self.hidden_size}")
        n = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.zero_()
        if n:
            param.data[:n].copy_(loaded.narrow(0, self.start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        hidden = self._lookup(local.masked_fill(outside, 0))
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        return _communicator(self).all_reduce(hidden)

    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of this rank's table (float, or the int8 rows shared with the LM head)."""
        if "weight" not in self._parameters:  # int8 rows shared with the LM head (core/quantization/vocab.py)
            dtype = self.compute_dtype
            return self.int8_codes[rows].to(dtype) * self.int8_scales[rows].to(dtype).unsqueeze(-1)
        return F.embedding(rows, self.weight)


class LMHead(nn.Module):
    """[N, hidden] -> float32 logits [N, vocab]. With `tied_to`, shares the embedding's weight
    (then the checkpoint's lm_head.weight, if any, is ignored by the model) and its sharding. A
    quantization method may replace the weight by int8 rows computed through its `kernels`
    (core/quantization/vocab.py), its rank's rows only under tensor parallelism."""

    kernels: WeightKernels | None = None
    communicator: Communicator | None = None  # attached by the loader
    dense_kernel: DenseLinearKernel | None = None  # the backend's GEMM for an unquantized head (the loader)

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 tied_to: VocabEmbedding | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        if tied_to is not None:
            self.tp_size = tied_to.tp_size
            self.weight = tied_to.weight
        else:
            shard = VocabEmbedding(vocab_size, hidden_size, dtype, tp_rank, tp_size)
            self.tp_size = tp_size
            self.weight = shard.weight  # the same row split and loader as the embedding's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:  # int8 rows of this rank's vocabulary slice
            logits = self.kernels.apply(self, hidden, None).float()
        elif self.dense_kernel is not None:
            logits = self.dense_kernel.apply(self, hidden, None).float()
        else:
            logits = F.linear(hidden, self.weight).float()
        if self.tp_size == 1:
            return logits
        return _communicator(self).all_gather(logits, dim=-1)[..., : self.vocab_size]


def _communicator(module: nn.Module) -> Communicator:
    if module.communicator is None:
        raise RuntimeError(f"a vocab-parallel {type(module).__name__} has no communicator (the loader attaches one)")
    return module.communicator
