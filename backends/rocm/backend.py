"""ROCmBackend: an AMD GPU through torch's ROCm build.

HIP sits behind torch's `cuda` device type and API, so this is the CUDA backend with AMD's facts:
bf16 support by GPU architecture, and RCCL behind torch.distributed's "nccl" name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from textgen.backends.cuda.backend import CUDABackend

if TYPE_CHECKING:
    from textgen.core.config import EngineConfig

# Architectures without bf16 matrix instructions (Vega/MI50-MI60 and older).
NO_BF16_ARCH_PREFIXES = ("gfx8", "gfx900", "gfx906")


class ROCmBackend(CUDABackend):
    name = "rocm"

    def arch(self) -> str:
        """The GPU's gfx target, e.g. "gfx942" (MI300X)."""
        return torch.cuda.get_device_properties(self.device).gcnArchName.split(":")[0]

    def has_native_bf16(self) -> bool:
        return not self.arch().startswith(NO_BF16_ARCH_PREFIXES)

    def distributed_backend(self) -> str:
        return "nccl"  # RCCL, registered by torch's ROCm build under the nccl name

    def config_reasons(self, config: EngineConfig) -> list[str]:
        if config.dtype == "bfloat16" and not self.has_native_bf16():
            return [f"--dtype bfloat16 needs bf16 matrix instructions ({self.arch()} has none); use --dtype float16"]
        return []

    def describe(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        return (
            f"rocm: {props.name} ({self.device}), {self.arch()}, {props.total_memory / 2**30:.1f} GiB, "
            f"HIP {torch.version.hip}"
        )
