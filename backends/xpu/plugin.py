"""XPU backend plugin: hook implementations only. Imports no torch and no IPEX at module import.

Since torch 2.5 Intel GPUs are a native torch device ("xpu"); intel_extension_for_pytorch (the
[xpu] extra) adds optimized kernels on top of torch's XPU build, never in place of it. The probe
never initializes the device: it reads torch's build without importing torch, and only then asks
`torch.xpu.device_count()`, which queries Level Zero Sysman first.
"""
from __future__ import annotations

import os
from glob import glob
from importlib import metadata
from importlib.util import find_spec
from types import ModuleType
from typing import TYPE_CHECKING

from textgen.backends.torch_build import torch_build
from textgen.core.backend import BackendCandidate, BackendIdentity
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import TORCH_PAGED, AttentionBackendInfo

# vllm-xpu-kernels where installed; the portable kernel (SDPA on stock torch's XPU) otherwise
XPU_FLASH_ATTN = AttentionBackendInfo("xpu_flash_attn", "textgen.backends.xpu.attention:XPUFlashAttentionPaged", 10)

if TYPE_CHECKING:
    from textgen.core.backend import Backend
    from textgen.core.config import EngineConfig

PRIORITY = 90
BACKEND_CLASS = "textgen.backends.xpu.backend:XPUBackend"
RENDER_NODES = "/dev/dri/renderD*"
IPEX = "intel_extension_for_pytorch"
OTHER_BUILD_LABELS = ("+cpu", "+cu", "+rocm")  # local version labels of torch's other wheels


_candidate = BackendIdentity("xpu", PRIORITY, BACKEND_CLASS).candidate


def _ipex_note() -> str:
    """What to install: textgen runs on stock torch's XPU build; a leftover IPEX on another build
    is named, since it is the usual sign of that mix-up."""
    if find_spec(IPEX) is None:
        return "install PyTorch's XPU build"
    return f"{IPEX} {metadata.version(IPEX)} is installed but needs torch's XPU build"


def _built_with_xpu(build: ModuleType) -> bool:
    """From torch/version.py's `xpu` (the SYCL toolchain) or the wheel's local label; some +xpu
    wheels leave `xpu` None. Only a build that says neither (a source build) imports torch."""
    version = build.__version__
    if getattr(build, "xpu", None) or "+xpu" in version:
        return True
    if any(label in version for label in OTHER_BUILD_LABELS):
        return False
    import torch

    return hasattr(torch, "xpu") and torch.xpu._is_compiled()


def probe() -> BackendCandidate:
    build = torch_build()
    if build is None:
        return _candidate(False, "torch is not installed (install torch's XPU build)")
    if not _built_with_xpu(build):
        return _candidate(False, f"torch {build.__version__} was built without XPU support ({_ipex_note()})")
    if not glob(RENDER_NODES):
        return _candidate(False, f"no Intel GPU driver: no {RENDER_NODES} device node")
    import torch

    count = torch.xpu.device_count()
    if count == 0:
        mask = os.environ.get("ZE_AFFINITY_MASK")
        hint = f" (ZE_AFFINITY_MASK={mask!r})" if mask is not None else ""
        return _candidate(False, f"torch reports 0 XPU devices{hint}")
    ipex = f", IPEX {metadata.version(IPEX)}" if find_spec(IPEX) is not None else ""
    return _candidate(True, f"{count} x Intel XPU, torch {torch.__version__}{ipex}")


@hookimpl
def textgen_probe_backend(config: EngineConfig | None) -> BackendCandidate:
    return probe()


@hookimpl
def textgen_attention_backends(backend: Backend) -> list[AttentionBackendInfo]:
    return [XPU_FLASH_ATTN, TORCH_PAGED]
