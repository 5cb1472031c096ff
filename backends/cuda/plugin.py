"""CUDA backend plugin: hook implementations only. Imports no torch at module import.

The probe never creates a CUDA context: it reads torch's build (`torch.version.cuda`, without
importing torch), the driver's control node, and only then `torch.cuda.device_count()`, which
asks NVML (falling back to cudaGetDeviceCount, which initializes no torch state).
"""
from __future__ import annotations

import os
from importlib.util import find_spec
from typing import TYPE_CHECKING

from textgen.backends.torch_build import torch_build
from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import TORCH_PAGED, AttentionBackendInfo, QuantizerInfo

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 100
BACKEND_CLASS = "textgen.backends.cuda.backend:CUDABackend"
DRIVER_NODE = "/dev/nvidiactl"
WSL_DRIVER_NODE = "/dev/dxg"  # WSL2 exposes the NVIDIA driver through DirectX instead
FLASH_ATTN = AttentionBackendInfo("flash_attn", "textgen.backends.cuda.attention:FlashAttentionPaged", 10)
# any block size: serves when flash-attn is missing or the block size is not a multiple of 256
FLASHINFER = AttentionBackendInfo("flashinfer", "textgen.backends.cuda.flashinfer:FlashInferPaged", 5)
CUDA_KERNELS = "textgen.backends.cuda.quant_kernels:CUDAKernels"


_candidate = BackendIdentity("cuda", PRIORITY, BACKEND_CLASS).candidate


def _visible_devices_hint() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f" (CUDA_VISIBLE_DEVICES={value!r})"


def _visible_indices(count: int) -> list[int] | None:
    """NVML indices of the devices CUDA sees; None when CUDA_VISIBLE_DEVICES uses UUIDs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    return [int(p) for p in parts[:count]] if all(p.isdigit() for p in parts) else None


def _nvml_names(count: int) -> list[str] | None:
    """Device names from NVML (nvidia-ml-py, the [cuda] extra); None when NVML is unavailable."""
    indices = _visible_indices(count)
    if find_spec("pynvml") is None or indices is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # a detail only: an NVML error must not make the device unavailable
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def describe_devices(count: int, names: list[str] | None, fallback: str) -> str:
    """"2 x NVIDIA H100 80GB HBM3" when the names agree, else the names, else "2 x <fallback>"."""
    if names and len(set(names)) == 1:
        return f"{count} x {names[0]}"
    return ", ".join(names) if names else f"{count} x {fallback}"


def probe() -> BackendCandidate:
    build = torch_build()
    if build is None:
        return _candidate(False, "torch is not installed (install torch's CUDA build)")
    if build.cuda is None:
        rocm = f" (a ROCm build, HIP {build.hip})" if build.hip else ""
        return _candidate(False, f"torch {build.__version__} was built without CUDA{rocm}")
    if not (os.path.exists(DRIVER_NODE) or os.path.exists(WSL_DRIVER_NODE)):
        return _candidate(False, f"no NVIDIA driver: {DRIVER_NODE} not found")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return _candidate(False, f"torch reports 0 CUDA devices{_visible_devices_hint()}")
    devices = describe_devices(count, _nvml_names(count), "CUDA device")
    return _candidate(True, f"{devices}, CUDA {torch.version.cuda}, torch {torch.__version__}")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_configure(config: EngineConfig, backend: Backend) -> list[str] | None:
    # ROCmBackend subclasses CUDABackend: answer for this plugin's own backend only.
    return backend.config_reasons(config) if getattr(backend, "name", None) == "cuda" else None


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    return [FLASH_ATTN, FLASHINFER, TORCH_PAGED]


@hookimpl
def textgen_quantizers(backend: Backend) -> list[QuantizerInfo] | None:
    """The built-in formats on the CUDA kernels: fp8 on `torch._scaled_mm` (capability 8.9+), int4
    GPTQ / AWQ on Marlin (capability 8.0+ and the `kernels` package), else dequantize + cuBLAS GEMM
    with the reason logged once. See textgen.backends.cuda.quant_kernels."""
    if getattr(backend, "name", None) != "cuda":
        return None
    from textgen.core.quantization.catalog import builtin_quantizers

    return builtin_quantizers(CUDA_KERNELS)
