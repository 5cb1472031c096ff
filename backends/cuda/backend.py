"""CUDABackend: device facts for an NVIDIA GPU through torch's CUDA build.

Imported only once the cuda (or rocm) backend has been chosen. Each worker process computes on
the GPU given by LOCAL_RANK (torchrun's convention), GPU 0 when unset.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from textgen.core.backend import Backend, BackendCandidate, MemoryInfo

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig
    from textgen.core.graphs import GraphRunner

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores


class CUDABackend(Backend):
    name = "cuda"

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        super().__init__(config, candidate)
        self._device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def device(self) -> torch.device:
        return self._device

    def has_native_bf16(self) -> bool:
        return torch.cuda.get_device_capability(self._device) >= BF16_MIN_CAPABILITY

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.has_native_bf16():
            return (torch.bfloat16, torch.float16, torch.float32)
        return (torch.float16, torch.float32)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.has_native_bf16() else torch.float16

    def memory_info(self) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(self._device)
        return MemoryInfo(total_bytes=total, available_bytes=free)

    pin_memory = True  # host staging buffers: asynchronous copies to the GPU

    def distributed_backend(self) -> str:
        return "nccl"

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self._device)
        self._allocated_at_reset = torch.cuda.memory_allocated(self._device)

    def peak_memory_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self._device) - getattr(self, "_allocated_at_reset", 0)

    def graph_runner(self, config: EngineConfig) -> GraphRunner | None:
        from textgen.backends.cuda.graphs import CUDAGraphDecode

        return CUDAGraphDecode(self._device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def config_reasons(self, config: EngineConfig) -> list[str]:
        """Why `config` cannot run on this GPU (used by the plugin's `textgen_configure`)."""
        reasons = []
        if config.dtype == "bfloat16" and not self.has_native_bf16():
            reasons.append(f"--dtype bfloat16 needs {self._bf16_requirement()}; use --dtype float16")
        return reasons

    def _bf16_requirement(self) -> str:
        major, minor = torch.cuda.get_device_capability(self._device)
        return f"compute capability >= 8.0 ({torch.cuda.get_device_name(self._device)} is {major}.{minor})"

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self._device)
        return (
            f"{self.name}: {props.name} ({self._device}), compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"
        )
