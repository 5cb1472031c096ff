"""XPUBackend: an Intel GPU (Data Center GPU Max, Arc) through torch's native XPU device.

Imported only once xpu has been chosen. Each worker computes on the XPU given by LOCAL_RANK.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from textgen.core.backend import Backend, BackendCandidate, MemoryInfo

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig


class XPUBackend(Backend):
    name = "xpu"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        super().__init__(config, candidate)
        self._device = torch.device("xpu", int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def device(self) -> torch.device:
        return self._device

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if torch.xpu.is_bf16_supported():
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.float16, torch.float32)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.xpu.is_bf16_supported() else torch.float16

    def memory_info(self) -> MemoryInfo:
        if hasattr(torch.xpu, "mem_get_info"):
            free, total = torch.xpu.mem_get_info(self._device)
            return MemoryInfo(total_bytes=total, available_bytes=free)
        total = torch.xpu.get_device_properties(self._device).total_memory
        return MemoryInfo(total_bytes=total, available_bytes=total - torch.xpu.memory_reserved(self._device))

    def distributed_backend(self) -> str:
        """torch's own XCCL where this XPU build has it, else oneCCL's bindings, registered as "ccl"."""
        import torch.distributed as dist

        if getattr(dist, "is_xccl_available", lambda: False)():
            return "xccl"
        import oneccl_bindings_for_pytorch  # noqa: F401  registers the "ccl" process-group backend

        return "ccl"

    def synchronize(self) -> None:
        torch.xpu.synchronize(self._device)

    def describe(self) -> str:
        props = torch.xpu.get_device_properties(self._device)
        return f"xpu: {props.name} ({self._device}), {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}"
