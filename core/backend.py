"""The Backend interface: what an accelerator plugin supplies to the device-agnostic core.

A backend supplies device facts and kernels. It never copies the scheduler or the models: those
live in core and call into the backend through this interface, the AttentionBackend it offers and
the quantizers it registers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from textgen.core.config import EngineConfig


@dataclass(frozen=True, slots=True)
class BackendCandidate:
    """The answer of `textgen_probe_backend`.

    `reason` is the device detail when available ("2 x NVIDIA H100, CUDA 12.4") and the exact
    missing piece otherwise ("torch was built without CUDA (torch.version.cuda is None)").
    `backend_class` is a lazy "module:Class" path of a `Backend` subclass.
    """

    name: str
    available: bool
    priority: int
    reason: str
    backend_class: str
    plugin_name: str = ""
    distribution: str = ""


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Device memory in bytes. `available_bytes` is what the KV cache may take after the weights."""

    total_bytes: int
    available_bytes: int


class Backend(ABC):
    """One accelerator. Instantiated once, after selection, with the engine config.

    Contract for vendors:
    - `device` is the torch device that model weights, activations and the KV cache live on.
    - `supported_dtypes` lists compute dtypes; `default_dtype` is used for `--dtype auto`.
    - `memory_info` reports current total and free memory on the device; the engine sizes the KV
      cache from it after loading the weights.
    - `allocate_kv_cache` allocates one tensor per layer in the shape the chosen AttentionBackend
      asks for (its `kv_cache_shape`).
    - `distributed_backend` names the torch.distributed backend for tensor parallelism.
    - `model_runner_class` may point to a subclass of the core ModelRunner (e.g. to add graph
      capture); it must not change scheduling semantics.
    """

    name: ClassVar[str]

    def __init__(self, config: EngineConfig | None, candidate: BackendCandidate) -> None:
        self.config = config
        self.candidate = candidate

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The torch device this backend computes on."""

    @abstractmethod
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Compute dtypes this device runs well."""

    @abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The dtype `--dtype auto` resolves to on this device (when the checkpoint allows)."""

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and currently available device memory in bytes."""

    def distributed_backend(self) -> str:
        return "gloo"

    def kv_cache_budget_bytes(self, config: EngineConfig) -> int:
        """Bytes the KV cache may take, measured after the weights are loaded."""
        fraction = config.kv_cache_memory_fraction if config is not None else 0.9
        return int(self.memory_info().available_bytes * fraction)

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, num_layers: int
    ) -> list[torch.Tensor]:
        import torch

        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def model_runner_class(self) -> str:
        return "textgen.core.engine.model_runner:ModelRunner"

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on synchronous devices)."""

    def describe(self) -> str:
        return f"{self.name}: {self.candidate.reason}"
