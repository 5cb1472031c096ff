"""ROCm backend plugin: hook implementations only. Imports no torch at module import.

A torch build is either CUDA or ROCm, so this backend and cuda are never both available. The probe
never initializes HIP: it reads `torch.version.hip` (without importing torch), the KFD driver node
and only then `torch.cuda.device_count()` (amdsmi, falling back to hipGetDeviceCount).
"""
from __future__ import annotations

import os
from importlib.util import find_spec
from typing import TYPE_CHECKING

from textgen.backends.torch_build import torch_build
from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import TORCH_PAGED, AttentionBackendInfo

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 100
BACKEND_CLASS = "textgen.backends.rocm.backend:ROCmBackend"
DRIVER_NODE = "/dev/kfd"


# AMD's kernels first, torch's portable kernel when neither is installed (or the block size is
# not a multiple of 128).
AITER = AttentionBackendInfo("aiter", "textgen.backends.rocm.attention:AiterPaged", 12)
FLASH_ATTN_CK = AttentionBackendInfo("flash_attn_ck", "textgen.backends.rocm.attention:CKFlashAttentionPaged", 10)

_candidate = BackendIdentity("rocm", PRIORITY, BACKEND_CLASS).candidate


def _visible_devices_hint() -> str:
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            return f" ({var}={os.environ[var]!r})"
    return ""


def _amdsmi_names() -> list[str] | None:
    """GPU marketing names from amdsmi (the [rocm] extra); None when it is unavailable."""
    if find_spec("amdsmi") is None:
        return None
    import amdsmi

    try:
        amdsmi.amdsmi_init()
        try:
            handles = amdsmi.amdsmi_get_processor_handles()
            return [str(amdsmi.amdsmi_get_gpu_asic_info(h)["market_name"]) for h in handles]
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception:  # a detail only: an amdsmi error must not make the device unavailable
        return None


def probe() -> BackendCandidate:
    build = torch_build()
    if build is None:
        return _candidate(False, "torch is not installed (install torch's ROCm build)")
    if not build.hip:
        cuda = f" (a CUDA {build.cuda} build)" if build.cuda else ""
        return _candidate(False, f"torch {build.__version__} was built without ROCm{cuda}")
    if not os.path.exists(DRIVER_NODE):
        return _candidate(False, f"no AMD GPU driver: {DRIVER_NODE} not found (amdgpu kernel driver)")
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return _candidate(False, f"torch reports 0 ROCm devices{_visible_devices_hint()}")
    names = _amdsmi_names()
    if names is not None and len(names) != count:  # visibility variables hide some GPUs from HIP
        names = None
    devices = f"{count} x {names[0]}" if names and len(set(names)) == 1 else f"{count} x AMD GPU"
    return _candidate(True, f"{devices}, HIP {torch.version.hip}, torch {torch.__version__}")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_configure(config: EngineConfig, backend: Backend) -> list[str] | None:
    return backend.config_reasons(config) if getattr(backend, "name", None) == "rocm" else None


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    return [AITER, FLASH_ATTN_CK, TORCH_PAGED]
