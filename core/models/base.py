"""What a native model's constructor receives besides the Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from textgen.core.quantizer import Quantizer


@dataclass(frozen=True, slots=True)
class ModelBuildContext:
    """`quantizer` (None = plain weights) is handed to each quantizable linear layer. Attention
    layers state their own `AttentionSpec`; the kernel is negotiated and bound after the build."""

    dtype: torch.dtype
    device: torch.device
    quantizer: Quantizer | None = None
    tp_rank: int = 0
    tp_size: int = 1
