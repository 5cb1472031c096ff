"""CPU attention kernel: the portable torch paged attention, under the CPU backend's name."""
from __future__ import annotations

from typing import ClassVar

from textgen.core.layers.paged_attention import TorchPagedAttention


class CPUPagedAttention(TorchPagedAttention):
    """Paged attention on the host CPU through torch's SDPA (flash-style CPU kernel for fp32/bf16)."""

    name: ClassVar[str] = "cpu_paged"
