"""What a native model's constructor receives besides the Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from textgen.core.quantizer import Quantizer


@dataclass(frozen=True, slots=True)
class ModelBuildContext:
    """`attention_cls` is the chosen AttentionBackend subclass; every attention layer builds one
    instance from its own AttentionSpec. `quantizer` (None = plain weights) is handed to each
    quantizable linear layer."""

    dtype: torch.dtype
    device: torch.device
    attention_cls: type
    block_size: int
    quantizer: Quantizer | None = None
    tp_rank: int = 0
    tp_size: int = 1
