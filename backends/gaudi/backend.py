"""GaudiBackend: an Intel Gaudi card through habana_frameworks' "hpu" torch device.

Imported only once gaudi has been chosen; habana_frameworks is imported when the backend is
built, which registers the hpu device with torch.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from textgen.core.backend import Backend, BackendCandidate, MemoryInfo

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.graphs import GraphRunner

FP16_DEVICE_TYPES = ("GAUDI2", "GAUDI3")  # first-generation Gaudi computes in bf16/fp32 only


def _hpu() -> ModuleType:
    import habana_frameworks.torch.core  # noqa: F401  registers the hpu device
    import habana_frameworks.torch.hpu as hthpu

    return hthpu


class GaudiBackend(Backend):
    name = "gaudi"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        super().__init__(config, candidate)
        self._hpu = _hpu()

    @property
    def device(self) -> torch.device:
        return torch.device("hpu")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self._hpu.get_device_name().upper().startswith(FP16_DEVICE_TYPES):
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.bfloat16, torch.float32)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> MemoryInfo:
        if hasattr(self._hpu, "mem_get_info"):
            free, total = self._hpu.mem_get_info()
            return MemoryInfo(total_bytes=total, available_bytes=free)
        stats = self._hpu.memory_stats()  # bytes: "Limit" is what the runtime may hand out
        return MemoryInfo(total_bytes=stats["Limit"], available_bytes=stats["Limit"] - stats["InUse"])

    def graph_runner(self, config: EngineConfig) -> GraphRunner | None:
        """Every step in a shape bucket, each bucket an HPU graph."""
        from textgen.backends.gaudi.graphs import HPUGraphBuckets

        return HPUGraphBuckets()

    def distributed_backend(self) -> str:
        import habana_frameworks.torch.distributed.hccl  # noqa: F401  registers the hccl backend

        return "hccl"

    def synchronize(self) -> None:
        self._hpu.synchronize()

    def describe(self) -> str:
        return f"gaudi: {self._hpu.get_device_name()} ({self._hpu.device_count()} visible), {self.candidate.reason}"
