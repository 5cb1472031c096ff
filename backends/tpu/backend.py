"""XLABackend (any PJRT device through torch_xla) and TPUBackend.

Imported only once an XLA backend has been chosen; torch_xla is imported when the backend is
built. Inferentia's backend reuses XLABackend: torch_neuronx also runs through torch_xla.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from textgen.core.backend import Backend, BackendCandidate, MemoryInfo

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from textgen.core.config import EngineConfig
    from textgen.core.graphs import GraphRunner


def _xla_model() -> ModuleType:
    import torch_xla.core.xla_model as xm

    return xm


def _xla_device(xm: ModuleType) -> torch.device:
    import torch_xla

    # newer torch_xla releases deprecate xm.xla_device() in favour of torch_xla.device()
    return torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()


def xla_memory(info: dict[str, int]) -> MemoryInfo | None:
    """torch_xla's memory report in bytes; its keys changed across releases (bytes_* or kb_*)."""
    if "bytes_limit" in info:
        return MemoryInfo(total_bytes=info["bytes_limit"], available_bytes=info["bytes_limit"] - info["bytes_used"])
    if "kb_total" in info:
        return MemoryInfo(total_bytes=info["kb_total"] * 1024, available_bytes=info["kb_free"] * 1024)
    return None


class XLABackend(Backend):
    """A device torch_xla drives; subclasses set `name` and import their PJRT plugin first."""

    name = "xla"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        super().__init__(config, candidate)
        self._xm = _xla_model()
        self._device = _xla_device(self._xm)

    @property
    def device(self) -> torch.device:
        return self._device

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.bfloat16, torch.float32)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_info(self) -> MemoryInfo:
        memory = xla_memory(dict(self._xm.get_memory_info(self._device)))
        if memory is None:
            raise RuntimeError(f"{self.name}: torch_xla reports no device memory; set --num-kv-blocks")
        return memory

    def inference_mode(self) -> AbstractContextManager[object]:
        """no_grad: torch_xla's lazy tensors cannot be views of tensors made outside
        inference_mode ("Cannot set version_counter for inference tensor"), and the step buffers
        are made at startup."""
        return torch.no_grad()

    def graph_runner(self, config: EngineConfig) -> GraphRunner | None:
        """Every step in a shape bucket: an XLA device compiles per shape."""
        from textgen.backends.tpu.graphs import XLABuckets

        return XLABuckets()

    def distributed_backend(self) -> str:
        import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" process-group backend

        return "xla"

    def synchronize(self) -> None:
        self._xm.wait_device_ops()

    def describe(self) -> str:
        return f"{self.name}: {self._device}, {self.candidate.reason}"


class TPUBackend(XLABackend):
    name = "tpu"
