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
    from contextlib import AbstractContextManager

    import torch

    from textgen.core.config import EngineConfig
    from textgen.core.distributed import Communicator
    from textgen.core.graphs import GraphRunner


class DenseLinearKernel(ABC):
    """A backend's GEMM for unquantized linear layers and LM heads (`Backend.dense_linear`).

    After loading, the loader calls `prepare(layer, shared)` once per layer, then the layer calls
    `apply(layer, x, bias)` every forward instead of F.linear (same contract: x [..., K], weight
    [N, K], bias [N] or None -> [..., N]). `prepare` may replace `layer.weight` by the kernel's own
    layout (keeping its `.shape`) unless `shared`: then other modules read the same tensor (an LM
    head tied to the embedding) and it must stay as it is."""

    name: ClassVar[str]

    def prepare(self, layer: torch.nn.Module, shared: bool) -> None:
        """Repack the layer's weight for `apply` (default: keep it)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ layer.weight.T + bias."""


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
class BackendIdentity:
    """What every probe answer of one plugin shares, so a plugin states it once:
    `_candidate = BackendIdentity("acme", 80, "textgen_acme.backend:AcmeBackend").candidate`."""

    name: str
    priority: int
    backend_class: str

    def candidate(self, available: bool, reason: str) -> BackendCandidate:
        return BackendCandidate(self.name, available, self.priority, reason, self.backend_class)


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Device memory in bytes: the device's total and what is free right now."""

    total_bytes: int
    available_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """What the profile run measured, for KV cache sizing (see `Backend.kv_cache_budget_bytes`).

    `free_bytes`/`total_bytes`: the device after the weights were loaded, before the profile run;
    `peak_bytes`: the most memory the profile run (a forward at max_batch_prefill_tokens plus the
    sampler at max_batch_size) held above what was allocated before it; None when the backend
    cannot measure it."""

    total_bytes: int
    free_bytes: int
    peak_bytes: int | None


class Backend(ABC):
    """One accelerator. Instantiated once, after selection, with the engine config.

    Contract for vendors (what core calls, in startup order):
    - `device`: the torch device that weights, activations and the KV cache live on;
      `supported_dtypes` / `default_dtype` (`--dtype auto`).
    - `memory_info()` before and `reset_peak_memory()` / `peak_memory_bytes()` around the profile
      run; `kv_cache_budget_bytes(config, profile)` turns them into the KV cache's bytes.
    - `allocate_kv_cache(shape, dtype, num_layers)` in the chosen kernel's `kv_cache_shape`.
    - `graph_runner(config)`: the graph rule for decode steps (None: always eager).
    - `inference_mode()`: the context every forward runs under.
    - `pin_memory`: whether host staging buffers are pinned (async host-to-device copies).
    - `communicator(group)`: collectives for tensor parallelism (`distributed_backend` names the
      torch.distributed backend the process group is created with).
    - `synchronize()`: wait for queued device work (timing, profiling).
    """

    name: ClassVar[str]
    pin_memory: ClassVar[bool] = False

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

    def wants_memory_profile(self, config: EngineConfig) -> bool:
        """Whether startup runs the profile step (the default rule needs its peak)."""
        return True

    def reset_peak_memory(self) -> None:
        """Start measuring the peak for `peak_memory_bytes` (no-op when the device cannot)."""

    def peak_memory_bytes(self) -> int | None:
        """Bytes allocated at the peak since `reset_peak_memory`, above what was allocated at the
        reset; None when the device cannot tell (the budget then ignores activations)."""
        return None

    def kv_cache_budget_bytes(self, config: EngineConfig, profile: MemoryProfile) -> int:
        """Bytes the KV cache may take: what `--cuda-memory-fraction` of the device leaves after
        the weights, everything else on the device and the profiled activation peak (TGI's and
        vLLM's rule): free - total * (1 - fraction) - peak."""
        fraction = 1.0 if config.memory_fraction is None else config.memory_fraction
        reserved = int(profile.total_bytes * (1.0 - fraction))
        return max(0, profile.free_bytes - reserved - (profile.peak_bytes or 0))

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, num_layers: int
    ) -> list[torch.Tensor]:
        import torch

        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def graph_runner(self, config: EngineConfig) -> GraphRunner | None:
        """The object that captures or compiles decode steps for `config.graph_batch_sizes`; None
        keeps every step eager."""
        return None

    def dense_linear(self, dtype: torch.dtype) -> DenseLinearKernel | None:
        """The GEMM for unquantized linear layers and LM heads of a model in `dtype` (see
        `DenseLinearKernel`); None keeps F.linear. A quantized layer uses its method's kernels."""
        return None

    def inference_mode(self) -> AbstractContextManager[object]:
        import torch

        return torch.inference_mode()

    def distributed_backend(self) -> str:
        return "gloo"

    def communicator(self, group: object = None) -> Communicator:
        """Collectives over `group` (None: the default process group) for this device."""
        from textgen.core.distributed import TorchDistributedCommunicator

        return TorchDistributedCommunicator(self.distributed_backend(), group)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on synchronous devices)."""

    def describe(self) -> str:
        return f"{self.name}: {self.candidate.reason}"
