"""CPU backend plugin: hook implementations only; imports nothing heavy."""
from __future__ import annotations

import os
import platform

from textgen.core.backend import BackendCandidate
from textgen.core.hookspecs import hookimpl
from textgen.core.registry import AttentionBackendInfo, QuantizerInfo

PRIORITY = 0  # lowest: any available accelerator wins over the CPU


@hookimpl
def textgen_probe_backend(config: object) -> BackendCandidate:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    detail = f"{platform.machine()} CPU, {cores} cores"
    return BackendCandidate("cpu", True, PRIORITY, detail, "textgen.backends.cpu.backend:CPUBackend")


@hookimpl
def textgen_attention_backends(backend: object) -> list[AttentionBackendInfo]:
    # cpu_fused: textgen's C++ kernel, built at first use; cpu_paged (portable torch) where it cannot be
    return [AttentionBackendInfo("cpu_fused", "textgen.backends.cpu.fused_attention:CPUFusedPagedAttention", 10),
            AttentionBackendInfo("cpu_paged", "textgen.backends.cpu.attention:CPUPagedAttention", 0)]


CPU_KERNELS = "textgen.backends.cpu.quant_kernels:CPUKernels"


@hookimpl
def textgen_quantizers(backend: object) -> list[QuantizerInfo]:
    from textgen.core.quantization.catalog import builtin_quantizers

    return builtin_quantizers(CPU_KERNELS)
