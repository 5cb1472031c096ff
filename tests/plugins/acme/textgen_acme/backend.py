"""AcmeBackend: a complete Backend implementation that runs on the host CPU."""
from __future__ import annotations

import torch

from textgen.core.backend import Backend, MemoryInfo

ACME_MEMORY_BYTES = 1 << 30  # the emulated device has 1 GiB


class AcmeBackend(Backend):
    name = "acme"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(ACME_MEMORY_BYTES, ACME_MEMORY_BYTES)

    def distributed_backend(self) -> str:
        return "gloo"
